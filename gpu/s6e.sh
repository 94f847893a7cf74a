#!/usr/bin/env bash
set -u
export PYTHONUNBUFFERED=1 VBHAL_SKIP_INTERPRET=1
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
RES=${RES:-/tmp/s6e}; mkdir -p "$RES"
T=tests/backends/cuda/test_fp4_gpu.py
timeout 200 python3 -m pytest -v -p no:cacheprovider -W ignore \
  "$T::test_gpu_linear_paths[pt64-dtype14-mxfp4]" "$T::test_gpu_linear_paths[pt64-dtype14-nvfp4]" \
  "$T::test_gpu_linear_paths[p16-dtype15-mxfp4]" "$T::test_gpu_linear_paths[p16-dtype15-nvfp4]" \
  "$T::test_gpu_split_k_workspace_clean_and_graph_capture" "$T::test_gpu_linear_split_k_and_fp32" > "$RES/tests.txt" 2>&1
echo "GPU tests rc=$?"; grep -E "PASSED|FAILED|^E  " "$RES/tests.txt" | cut -c1-200 | head -20
timeout 150 python3 gpu/eager_m.py 2>&1 | grep -v "^$" | head -40
