#!/usr/bin/env bash
set -u
export PYTHONUNBUFFERED=1 VBHAL_SKIP_INTERPRET=1
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
RES=${RES:-/tmp/s6d}; mkdir -p "$RES"
T=tests/backends/cuda/test_fp4_gpu.py
timeout 220 python3 -m pytest -q -p no:cacheprovider -W ignore "$T::test_gpu_linear_paths" "$T::test_gpu_linear_split_k_and_fp32" \
  "$T::test_gpu_fp4_linear_grads" -k "p16 or pt64 or gemv or split_k_and_fp32 or grads" > "$RES/tests.txt" 2>&1
echo "GPU tests rc=$? $(tail -1 "$RES/tests.txt")"
grep -E "^FAILED|^E  " "$RES/tests.txt" | head -12
timeout 200 python3 gpu/eager_m.py 2>&1 | grep -v "^$" | head -70
