#!/usr/bin/env bash
# split-K finalize at large M (session 3): the diagnostic, then the t16 path tests that found the bug
set -u
export PYTHONUNBUFFERED=1 VBHAL_SKIP_INTERPRET=1
RES=${RES:-/tmp/splitkdiag}; mkdir -p "$RES"
timeout 50 python3 gpu/splitk_diag2.py 2>&1 | grep -v Warn | tee "$RES/diag.txt"
T=tests/backends/cuda/test_fp4_gpu.py
timeout 100 python3 -m pytest -v -p no:cacheprovider -W ignore "$T::test_gpu_linear_paths" -k "t16" > "$RES/tests.txt" 2>&1
echo "rc=$?"; grep -E "PASSED|FAILED|^E  " "$RES/tests.txt" | sed 's/.*:://' | cut -c1-110 | head -8
