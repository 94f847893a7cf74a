#!/usr/bin/env bash
# fp4cuda on the GPU machine (budget 240 s):
# (1) the kernel-variant sweep at K=N=8192 mxfp4, M in {1,16,64,1024}: every variant in a worker process,
#     a variant that kills the CUDA context is recorded FAILED and a fresh worker goes on (graph-timed,
#     L2 flushed, each checked against the fp32 reference) -> sweep.json / sweep.txt;
# (2) eager host time per call (1024x1024 layer) -> host.json;
# (3) the full benchmark (cuBLAS bf16, torch int4, bitsandbytes fp4/nf4, vbhal MXFP4/NVFP4, eager and
#     graph, both shapes) -> bench.txt, fp4_linear-*.json (incl. the auto path choices + tuned configs);
# (4) the GPU tests (the capture/workspace ones first); a compact table last.
set -u
export PYTHONUNBUFFERED=1 VBHAL_SKIP_INTERPRET=1
RES=${RES:-/tmp/fp4cuda}
BUDGET=${FP4CUDA_BUDGET:-240}
mkdir -p "$RES"
T0=$(date +%s)
left() { echo $(( BUDGET - ($(date +%s) - T0) )); }
nvidia-smi --query-gpu=name,clocks.max.sm,clocks.max.mem --format=csv,noheader
python3 -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)"
echo "== sweep ($(left)s left)"
timeout 95 python3 benchmarks/bench_fp4_linear.py --sweep "$RES/sweep.json" --sweep-budget 68 > "$RES/sweep.txt" 2>&1
grep -E "FAILED|restarting|exited" "$RES/sweep.txt" | head -8
echo "== host time ($(left)s left)"
timeout 15 python3 benchmarks/bench_fp4_linear.py --host "$RES/host.json" 2>&1 | tail -10
echo "== benchmark ($(left)s left)"
B=$(( $(left) - 30 ))
[ "$B" -gt 30 ] && timeout "$B" python3 benchmarks/bench_fp4_linear.py > "$RES/bench.txt" 2>&1
cp benchmarks/results/fp4_linear-*.json "$RES"/ 2>/dev/null
grep -E "^auto path|^tuned configs|^paths that failed" "$RES/bench.txt" | cut -c1-1500
L=$(( $(left) - 3 ))
echo "== tests (GPU, bf16, real sizes), ${L}s left"
if [ "$L" -gt 10 ]; then
  timeout "$L" python3 -m pytest -q -x -p no:cacheprovider tests/backends/cuda/test_fp4_gpu.py \
    -k "capture or workspace or paths" 2>&1 | tail -4
  L=$(( $(left) - 3 ))
  [ "$L" -gt 10 ] && timeout "$L" python3 -m pytest -q -p no:cacheprovider tests/backends/cuda/test_fp4_gpu.py \
    -k "not (capture or workspace or paths)" 2>&1 | tail -4
fi
echo "== compact table"
grep -A16 "^sweep summary" "$RES/sweep.txt" 2>/dev/null
if grep -q "^speed-up vs cuBLAS" "$RES/bench.txt" 2>/dev/null; then
  grep -E "^  K=.*(M=    1|M=   16|M=   64|M= 1024|M= 4096) " "$RES/bench.txt" | head -20
else  # the benchmark was cut short: its rows so far
  grep -E "^K=" "$RES/bench.txt" 2>/dev/null | sed -E 's/torch_int4_g128=[^ ]+ \([^)]*\) g=[^ ]+ +//; s/bnb_nf4=[^ ]+ \([^)]*\) g=[^ ]+ +//' | cut -c1-330
fi
grep -E "M=(1|16) " "$RES/host.json" 2>/dev/null | head -12
ls -la "$RES"
