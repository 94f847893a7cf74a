#!/bin/bash
# GPU round for the attention feature (final round budget 200 s; killed with `timeout` after that).
# 1. correctness at real sizes (bf16 vs float64; --quick skips variants that are off by default),
# 2. the benchmark grid (final table + JSON), 3. the dispatcher table recomputed from this run's
# numbers (for comparison with the committed one). Everything lands in $RES (small: logs and JSON).
START=$(date +%s)
: "${RES:=/tmp/attention-res}"
mkdir -p "$RES"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
BUDGET=${ATTN_BUDGET:-195}
left() { echo $(( BUDGET - ($(date +%s) - START) )); }

nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader > "$RES/gpu.txt" 2>&1
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" | tee -a "$RES/gpu.txt"

echo "== correctness =="
timeout 75 python3 tests/backends/cuda/test_attention_gpu.py --quick 2>&1 | grep -v Warning | tail -n 40 \
  | tee "$RES/check.txt"

echo "== benchmark =="
B=$(( $(left) - 30 )); [ "$B" -gt 100 ] && B=100
timeout $(( B + 22 )) python3 -W ignore benchmarks/bench_attention.py --budget "$B" --out "$RES/attention-bench.json" \
  2>&1 | tail -n 80 | tee "$RES/bench.txt"

echo "== dispatcher table from this run =="
python3 benchmarks/make_attention_table.py "$RES/attention-bench.json" --out "$RES/attention_table.json" 2>&1 | tail -n 5
echo "total $(( $(date +%s) - START )) s"

T=$(( $(left) - 5 ))
if [ "$T" -gt 25 ]; then
  echo "== hd64 config sweep (data for the next tuning pass; not used by this run) =="
  timeout "$T" python3 -W ignore benchmarks/tune_attention.py --head-dims 64 --causal 1 --kernels fwd,dkdv,dq \
    --max-per-kernel 3 --budget $(( T - 8 )) --out "$RES/tune_hd64.json" 2>&1 | grep -v Warning | tail -n 12
fi
echo "end $(( $(date +%s) - START )) s"
