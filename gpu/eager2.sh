#!/usr/bin/env bash
# session 3: eager host time with and without the direct Triton launches, then correctness + the K=N=8192 bench
set -u
export PYTHONUNBUFFERED=1 VBHAL_SKIP_INTERPRET=1
RES=${RES:-/tmp/eager2}; mkdir -p "$RES"
for d in 0 1; do
  echo "== eager probe VBHAL_FP4_DIRECT_LAUNCH=$d"
  VBHAL_FP4_DIRECT_LAUNCH=$d timeout 80 python3 gpu/fp4_eager_probe.py > "$RES/eager_$d.txt" 2>&1
  grep "host enqueue" "$RES/eager_$d.txt"
done
T=tests/backends/cuda/test_fp4_gpu.py
echo "== GPU tests (limit 70 s)"
timeout 70 python3 -m pytest -x -q -p no:cacheprovider -W ignore "$T::test_gpu_linear_paths" "$T::test_gpu_split_k_workspace_clean_and_graph_capture" "$T::test_gpu_first_call_inside_graph_capture" "$T::test_gpu_fp4linear_eager_matches_compiled" "$T::test_gpu_fp4_linear_grads" > "$RES/tests.txt" 2>&1
echo "tests rc=$?"; tail -4 "$RES/tests.txt"
echo "== bench K=N=8192"
timeout ${EAGER2_BENCH_S:-170} python3 benchmarks/bench_fp4_linear.py --shapes 8192:8192 > "$RES/bench.txt" 2>&1
grep -E "^  K=|quantize" "$RES/bench.txt" | cut -c1-200
cp benchmarks/results/fp4_linear-*.json "$RES"/ 2>/dev/null
