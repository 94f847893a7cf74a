#!/bin/bash
# GPU round for the attention feature (budget 240 s; the lead kills it with `timeout` after that).
# 1. correctness at real sizes (bf16, float64 reference), 2. benchmark grid, 3. config sweep with the
# time that is left. Everything lands in $RES (small: logs and JSON).
START=$(date +%s)
: "${RES:=/tmp/attention-res}"
mkdir -p "$RES"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
left() { echo $(( 228 - ($(date +%s) - START) )); }

nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader > "$RES/gpu.txt" 2>&1
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" | tee -a "$RES/gpu.txt"

echo "== correctness =="
timeout 100 python3 tests/backends/cuda/test_attention_gpu.py 2>&1 | tail -n 40 | tee "$RES/check.txt"

echo "== benchmark =="
B=$(( $(left) - 55 )); [ "$B" -gt 90 ] && B=90
timeout $(( B + 25 )) python3 benchmarks/bench_attention.py --budget "$B" --out "$RES/attention-bench.json" 2>&1 \
  | tail -n 80 | tee "$RES/bench.txt"

echo "== config sweep =="
T=$(( $(left) - 8 ))
if [ "$T" -gt 15 ]; then
  timeout "$T" python3 benchmarks/tune_attention.py --budget $(( T - 10 )) --max-per-kernel 3 --out "$RES/tune.json" 2>&1 \
    | tail -n 40 | tee "$RES/tune.txt"
fi
echo "total $(( $(date +%s) - START )) s"
