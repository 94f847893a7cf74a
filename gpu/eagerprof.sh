#!/usr/bin/env bash
set -u
export PYTHONUNBUFFERED=1 VBHAL_SKIP_INTERPRET=1
RES=${RES:-/tmp/eagerprof}; mkdir -p "$RES"
timeout 60 python3 gpu/eager_prof.py 2>&1 | tee "$RES/prof.txt" | grep -v "^$" | head -50
echo "== mm_tb GPU path tests"
timeout 100 python3 -m pytest -x -v -p no:cacheprovider -W ignore tests/backends/cuda/test_fp4_gpu.py::test_gpu_linear_paths -k "tb" > "$RES/tests.txt" 2>&1
echo "rc=$?"; grep -E "PASSED|FAILED|Error" "$RES/tests.txt" | cut -c1-160 | head -12
