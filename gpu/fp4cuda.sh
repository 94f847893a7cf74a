#!/usr/bin/env bash
# fp4cuda on the GPU machine (budget 240 s): the benchmark (which also checks every vbhal result against
# an fp32 reference and the quantizers bit for bit at real sizes), then the GPU tests in the time left.
set -u
export PYTHONUNBUFFERED=1 VBHAL_SKIP_INTERPRET=1 TRITON_PRINT_AUTOTUNING=1
RES=${RES:-/tmp/fp4cuda}
mkdir -p "$RES"
T0=$(date +%s)
nvidia-smi --query-gpu=name,clocks.max.sm,clocks.max.mem --format=csv,noheader
python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)"
echo "== benchmark"
timeout 165 python3 benchmarks/bench_fp4_linear.py --variants 2>&1
cp benchmarks/results/fp4_linear-*.json "$RES"/ 2>/dev/null
LEFT=$(( 230 - ($(date +%s) - T0) ))
echo "== tests (GPU, bf16, real sizes), ${LEFT}s left"
if [ "$LEFT" -gt 15 ]; then
  timeout "$LEFT" python3 -m pytest -q -x -p no:cacheprovider tests/backends/cuda/test_fp4_gpu.py 2>&1 | tail -25
fi
ls -la "$RES"
