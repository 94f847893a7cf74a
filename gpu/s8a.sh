#!/usr/bin/env bash
# session 8, round a: the whole FP4 GPU test file on the shipped code, then the benchmark at both shapes
# (JSON into $RES; the committed results are replaced from there).
set -u
export PYTHONUNBUFFERED=1 VBHAL_SKIP_INTERPRET=1
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
RES=${RES:-/tmp/s8a}; mkdir -p "$RES"
timeout 150 python3 -m pytest -q -p no:cacheprovider -W ignore tests/backends/cuda/test_fp4_gpu.py -rfEs > "$RES/tests.txt" 2>&1
echo "GPU tests rc=$?"; tail -n 15 "$RES/tests.txt" | cut -c1-300
timeout 200 python3 benchmarks/bench_fp4_linear.py --shapes 8192:8192 --out "$RES" > "$RES/bench.txt" 2>&1
echo "bench 8192 rc=$?"; grep -E "^K=|auto path|quantize|GB/s|TB/s" "$RES/bench.txt" | cut -c1-420
timeout 190 python3 benchmarks/bench_fp4_linear.py --shapes 4096:14336 --out "$RES" > "$RES/bench2.txt" 2>&1
echo "bench 4096x14336 rc=$?"; grep -E "^K=|auto path|quantize|GB/s|TB/s" "$RES/bench2.txt" | cut -c1-420
ls "$RES"
