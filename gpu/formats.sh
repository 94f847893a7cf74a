#!/bin/bash
# GPU round for the FP4 formats (budget 60 s; the lead kills it with `timeout` after that).
# 1. the formats/FP4Linear tests on cuda tensors (cuda-parametrized ones: device == CPU bit for bit, vs
#    torchao where its wheel from .whl/ imports), 2. bench_formats.py: bf16 correctness at real layer sizes
#    (device == CPU, == torchao, FP4Linear fwd/bwd vs float64) and speed beside torchao / dense bf16.
START=$(date +%s)
: "${RES:=/tmp/formats-res}"
mkdir -p "$RES"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
echo "== tests (cuda) =="
timeout 26 python3 -m pytest -q -p no:cacheprovider --tb=line tests/formats tests/nn/test_fp4_linear.py -k cuda 2>&1 \
  | tail -n 30 | tee "$RES/tests.txt"
echo "== bench =="
timeout $(( 57 - ($(date +%s) - START) )) python3 benchmarks/bench_formats.py --reps 5 --out "$RES/formats-bench.json" 2>&1 \
  | grep -v "Failed to load\|register_constant" | tail -n 45 | tee "$RES/bench.txt"
echo "total $(( $(date +%s) - START )) s"
