#!/usr/bin/env bash
# split-K finalize at large M (session 3): the diagnostic, then the path tests that found it
set -u
export PYTHONUNBUFFERED=1 VBHAL_SKIP_INTERPRET=1
RES=${RES:-/tmp/splitkdiag}; mkdir -p "$RES"
timeout 100 python3 gpu/splitk_diag2.py 2>&1 | grep -v Warn | tee "$RES/diag.txt"
echo "== t16 / split-K tests"
T=tests/backends/cuda/test_fp4_gpu.py
timeout 140 python3 -m pytest -v -p no:cacheprovider -W ignore "$T::test_gpu_linear_paths" -k "t16 or auto" \
  "$T::test_gpu_split_k_workspace_clean_and_graph_capture" "$T::test_gpu_linear_split_k_and_fp32" > "$RES/tests.txt" 2>&1
echo "rc=$?"; grep -E "PASSED|FAILED" "$RES/tests.txt" | sed 's/.*:://' | cut -c1-90
