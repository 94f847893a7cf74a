#!/usr/bin/env bash
# session 6 final: the new/changed GPU tests, then the benchmark at K=N=8192 on the final code (JSON into $RES)
set -u
export PYTHONUNBUFFERED=1 VBHAL_SKIP_INTERPRET=1
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
RES=${RES:-/tmp/s6f}; mkdir -p "$RES"
T=tests/backends/cuda/test_fp4_gpu.py
timeout 230 python3 -m pytest -v -p no:cacheprovider -W ignore "$T::test_gpu_huge_block_scales_bf16" \
  "$T::test_gpu_packed_decode_bit_exact" "$T::test_gpu_split_k_workspace_clean_and_graph_capture" \
  "$T::test_gpu_linear_paths[t16-dtype10-mxfp4]" "$T::test_gpu_linear_paths[t16-dtype8-nvfp4]" \
  "$T::test_gpu_linear_paths[pt64-dtype12-mxfp4]" "$T::test_gpu_linear_paths[p16-dtype11-nvfp4]" \
  "$T::test_gpu_linear_paths[p16-dtype15-mxfp4]" "$T::test_gpu_linear_paths[pt128-dtype13-nvfp4]" \
  "$T::test_gpu_fp4_linear_grads" > "$RES/tests.txt" 2>&1
echo "GPU tests rc=$?"; grep -E "PASSED|FAILED|ERROR|^E  " "$RES/tests.txt" | cut -c1-160 | head -30
timeout ${BENCH_S:-250} python3 benchmarks/bench_fp4_linear.py --shapes 8192:8192 --out "$RES" > "$RES/bench.txt" 2>&1
echo "bench rc=$?"; grep -E "^K=|auto path" "$RES/bench.txt" | cut -c1-400
