#!/usr/bin/env bash
# session 6: the packed-decode kernels (mm_p / mm_pt). Correctness first (decode bit-exactness, the paths at
# odd sizes in bf16 and fp16, every split-K config of the new kinds at K=N=8192 6x eager + graph), then the
# whole GPU FP4 test file, then the benchmark at K=N=8192 (JSON into $RES), then K=4096 N=14336 if time is left.
set -u
export PYTHONUNBUFFERED=1 VBHAL_SKIP_INTERPRET=1
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
RES=${RES:-/tmp/s6fp4}; mkdir -p "$RES"
T=tests/backends/cuda/test_fp4_gpu.py
T0=$(date +%s)
timeout 150 python3 -m pytest -x -q -p no:cacheprovider -W ignore "$T::test_gpu_packed_decode_bit_exact" \
  "$T::test_gpu_linear_paths" "$T::test_gpu_split_k_real_size_repeated_and_graph" -k "packed or p16 or pt64 or pt128 or mm_p" \
  > "$RES/tests_new.txt" 2>&1
echo "new-kernel tests rc=$? $(tail -1 "$RES/tests_new.txt")"
grep -E "^FAILED|^E  " "$RES/tests_new.txt" | head -12
timeout 170 python3 -m pytest -q -p no:cacheprovider -W ignore "$T" > "$RES/tests_all.txt" 2>&1
echo "all GPU fp4 tests rc=$? $(tail -1 "$RES/tests_all.txt")"
grep -E "^FAILED|^E  " "$RES/tests_all.txt" | head -12
echo "tests took $(( $(date +%s) - T0 )) s"
timeout ${BENCH_S:-200} python3 benchmarks/bench_fp4_linear.py --shapes 8192:8192 --out "$RES" > "$RES/bench.txt" 2>&1
echo "bench rc=$?"; tail -n 24 "$RES/bench.txt"
