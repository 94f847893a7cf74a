#!/usr/bin/env bash
# fp4cuda on the GPU machine (budget 200 s): (1) the kernel-variant sweep at K=N=8192, M in {1,16,64,1024}
# (graph-timed, L2 flushed, each checked against the reference) -> sweep.json; (2) eager host time per
# call -> host.json; (3) the full benchmark (cuBLAS bf16, torch int4, bitsandbytes fp4/nf4, vbhal MXFP4/
# NVFP4, eager and graph, both shapes) -> fp4_linear-*.json; (4) the GPU tests if time is left; a compact
# table last.
set -u
export PYTHONUNBUFFERED=1 VBHAL_SKIP_INTERPRET=1
RES=${RES:-/tmp/fp4cuda}
BUDGET=${FP4CUDA_BUDGET:-200}
mkdir -p "$RES"
T0=$(date +%s)
left() { echo $(( BUDGET - ($(date +%s) - T0) )); }
nvidia-smi --query-gpu=name,clocks.max.sm,clocks.max.mem --format=csv,noheader
python3 -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)"
echo "== sweep ($(left)s left)"
timeout 75 python3 benchmarks/bench_fp4_linear.py --sweep "$RES/sweep.json" --sweep-budget 55 2>&1 | tee "$RES/sweep.txt" \
  | grep -v "^sweep M=" || true
echo "== host time ($(left)s left)"
timeout 20 python3 benchmarks/bench_fp4_linear.py --host "$RES/host.json" 2>&1 | tail -12
echo "== benchmark ($(left)s left)"
B=$(( $(left) - 20 ))
[ "$B" -gt 30 ] && timeout "$B" python3 benchmarks/bench_fp4_linear.py 2>&1 | tee "$RES/bench.txt" | tail -45
cp benchmarks/results/fp4_linear-*.json "$RES"/ 2>/dev/null
L=$(( $(left) - 5 ))
echo "== tests (GPU, bf16, real sizes), ${L}s left"
if [ "$L" -gt 20 ]; then
  timeout "$L" python3 -m pytest -q -x -p no:cacheprovider tests/backends/cuda/test_fp4_gpu.py 2>&1 | tail -8
fi
echo "== compact table"
grep -A12 "^sweep summary" "$RES/sweep.txt" 2>/dev/null
grep -E "^  K=.*(M=    1|M=   16|M=   64|M= 1024|M= 4096) " "$RES/bench.txt" 2>/dev/null | head -20
grep -E "M=1 |M=16 " "$RES/host.json" 2>/dev/null | head -12
ls -la "$RES"
