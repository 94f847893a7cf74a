#!/bin/bash
# GPU round for the estimator (R3 budget 90 s; the lead kills it with `timeout` after that).
# Predicted vs measured peak memory of real training steps (15 configurations, bf16 among them),
# beside accelerate's and DeepSpeed's estimators, then the planner's batch-size check under caps
# (8 GB among them). The benchmark watches its own clock (--budget) and stops starting new work.
START=$(date +%s)
: "${RES:=/tmp/estimate-res}"
mkdir -p "$RES"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export TRANSFORMERS_VERBOSITY=error
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader > "$RES/gpu.txt" 2>&1
cat "$RES/gpu.txt"
echo "== predicted vs measured =="
timeout 85 python3 benchmarks/bench_estimate.py --budget 76 --out "$RES/estimate-bench.json" 2>&1 \
  | grep -v "Warning\|warn(\|\"\"\"" | tail -n 60
echo "total $(( $(date +%s) - START )) s"
