#!/usr/bin/env bash
# fp4cuda on the GPU machine (budget 240 s): FP4 kernel tests at real sizes in bf16, then the benchmark.
set -u
export PYTHONUNBUFFERED=1 VBHAL_SKIP_INTERPRET=1
RES=${RES:-/tmp/fp4cuda}
mkdir -p "$RES"
nvidia-smi --query-gpu=name,clocks.max.sm,clocks.max.mem --format=csv,noheader
python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)"
echo "== tests (GPU, bf16, real sizes)"
timeout 75 python3 -m pytest -q -x -p no:cacheprovider tests/backends/cuda/ -k "fp4 and gpu" 2>&1 | tail -25
echo "== benchmark"
timeout 150 python3 benchmarks/bench_fp4_linear.py --variants 2>&1
cp benchmarks/results/fp4_linear-*.json "$RES"/ 2>/dev/null
ls -la "$RES"
