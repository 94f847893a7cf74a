#!/bin/bash
# GPU round for the attention feature (final round budget 150 s; killed with `timeout` after that).
# 1. correctness at real sizes (bf16 vs float64; --minimal: one case of each kind, the full set ran in
# rounds 1-2), 2. the benchmark grid (final table + JSON, providers timed round-robin), 3. the
# dispatcher table recomputed from this run. Everything lands in $RES (small: logs and JSON).
START=$(date +%s)
: "${RES:=/tmp/attention-res}"
mkdir -p "$RES"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
BUDGET=${ATTN_BUDGET:-146}
left() { echo $(( BUDGET - ($(date +%s) - START) )); }

nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader > "$RES/gpu.txt" 2>&1
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" | tee -a "$RES/gpu.txt"

echo "== correctness =="
timeout 45 python3 -W ignore tests/backends/cuda/test_attention_gpu.py --minimal 2>&1 | tail -n 20 | tee "$RES/check.txt"

echo "== benchmark =="
B=$(( $(left) - 22 )); [ "$B" -gt 100 ] && B=100
timeout $(( B + 16 )) python3 -W ignore benchmarks/bench_attention.py --budget "$B" --out "$RES/attention-bench.json" \
  2>&1 | tail -n 80 | tee "$RES/bench.txt"

echo "== dispatcher table from this run =="
python3 benchmarks/make_attention_table.py "$RES/attention-bench.json" --out "$RES/attention_table.json" 2>&1 | tail -n 3
echo "total $(( $(date +%s) - START )) s"
