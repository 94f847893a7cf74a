#!/usr/bin/env bash
# the folded tensor-core kernels at real sizes, by explicit config: mm_w32 (mm16) and mm_t (t16, t128), both formats
set -u
export PYTHONUNBUFFERED=1 VBHAL_SKIP_INTERPRET=1
RES=${RES:-/tmp/final5}; mkdir -p "$RES"
timeout 170 python3 -m pytest -v -p no:cacheprovider -W ignore tests/backends/cuda/test_fp4_gpu.py::test_gpu_linear_paths \
  -k "mm16 or t16 or t128" > "$RES/tests.txt" 2>&1
echo "rc=$?"; grep -E "PASSED|FAILED" "$RES/tests.txt" | sed 's/.*:://' | cut -c1-90
