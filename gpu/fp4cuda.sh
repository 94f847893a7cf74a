#!/usr/bin/env bash
# fp4cuda on the GPU machine (final round budget 200 s): the benchmark -- which also checks every vbhal
# result against an fp32 reference of the same quantized weight and the codecs bit for bit at real
# sizes -- then the GPU tests in whatever time is left.
set -u
export PYTHONUNBUFFERED=1 VBHAL_SKIP_INTERPRET=1 TRITON_PRINT_AUTOTUNING=1
RES=${RES:-/tmp/fp4cuda}
BUDGET=${FP4CUDA_BUDGET:-200}
mkdir -p "$RES"
T0=$(date +%s)
nvidia-smi --query-gpu=name,clocks.max.sm,clocks.max.mem --format=csv,noheader
python3 -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)"
echo "== benchmark"
timeout $(( BUDGET - 25 )) python3 benchmarks/bench_fp4_linear.py 2>&1
cp benchmarks/results/fp4_linear-*.json "$RES"/ 2>/dev/null
LEFT=$(( BUDGET - 8 - ($(date +%s) - T0) ))
echo "== tests (GPU, bf16, real sizes), ${LEFT}s left"
if [ "$LEFT" -gt 20 ]; then
  timeout "$LEFT" python3 -m pytest -q -x -p no:cacheprovider tests/backends/cuda/test_fp4_gpu.py 2>&1 | tail -25
fi
ls -la "$RES"
