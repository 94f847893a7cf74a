#!/usr/bin/env bash
# Bounds behind the FP4 / attention gaps to cuBLAS / cuDNN on the H100 (diagnostics):
# 1. gpu/fp4_bounds.py (<= 150 s): FP4 decode floor at K = N = 8192 (vbhal's own decode, no activations),
#    read-only floor, cuBLAS and vbhal's FP4 linear at M = 16 / 64; Triton's tutorial bf16 GEMM vs cuBLAS
#    (and vbhal mxfp4) at M = 64 / 1024 / 4096. PASS/FAIL checks inside.
# 2. gpu/attn_bound.py (<= 200 s): the Triton tutorial's fused attention vs vbhal's kernel, SDPA cuDNN and
#    SDPA flash, hd128 causal bf16 on bench_attention's shapes (S = 4k/8k/16k), fwd and fwd+bwd TFLOP/s.
#    The tutorial kernel is third-party code kept out of git: it is read from $TUTORIAL_ATTN or
#    output/triton_tutorial_attn.py (git-ignored: pass it in the run's carry list) or
#    gpu/_triton_tutorial_attn.py; without it vbhal / cuDNN / flash are still measured.
# Logs and JSON land in $RES; the JSONs also go to benchmarks/results/<name>-<device>.json.
set -u
export PYTHONUNBUFFERED=1
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
RES=${RES:-/tmp/bounds}; mkdir -p "$RES"
START=$(date +%s)
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, torch.cuda.get_device_name())" \
  2>&1 | tee "$RES/versions.txt"
echo "== fp4_bounds =="
RES="$RES" timeout 150 python3 -W ignore gpu/fp4_bounds.py --budget 105 2>&1 | tee "$RES/fp4_bounds.txt" | tail -40
echo "fp4_bounds exit ${PIPESTATUS[0]} at $(( $(date +%s) - START )) s"
echo "== attn_bound =="
RES="$RES" timeout 200 python3 -W ignore gpu/attn_bound.py --budget 170 2>&1 | tee "$RES/attn_bound.txt" | tail -30
echo "attn_bound exit ${PIPESTATUS[0]} at $(( $(date +%s) - START )) s"
