#!/usr/bin/env bash
# session 7 final: the FP4 benchmark at K = N = 8192 (JSON into $RES), then the real-size split-K tests of the kinds
# the plans pick (mm_p, mm_pt, GEMVs; in-kernel sum), then the other GPU FP4 tests not run in round C.
set -u
export PYTHONUNBUFFERED=1 VBHAL_SKIP_INTERPRET=1
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
T=tests/backends/cuda/test_fp4_gpu.py
timeout ${BENCH_S:-230} python3 benchmarks/bench_fp4_linear.py --shapes 8192:8192 --out "$RES" > "$RES/bench.txt" 2>&1
echo "bench rc=$?"; tail -n 32 "$RES/bench.txt"
timeout ${SPLIT_S:-165} python3 -m pytest -q -x -p no:cacheprovider -W ignore "$T" -k "split_k_real_size and (mm_p or mm_pt or gemv)" \
  > "$RES/tests_split.txt" 2>&1
echo "split-K real-size tests rc=$? $(tail -1 "$RES/tests_split.txt")"
grep -E "^FAILED|^E  |passed|failed" "$RES/tests_split.txt" | head -12
timeout ${TESTS_S:-140} python3 -m pytest -q -p no:cacheprovider -W ignore "$T" -k "not split_k_real_size and not packed_decode and not huge_block" \
  > "$RES/tests_rest.txt" 2>&1
echo "other GPU fp4 tests rc=$? $(tail -1 "$RES/tests_rest.txt")"
grep -E "^FAILED|^E  |passed|failed" "$RES/tests_rest.txt" | head -12
