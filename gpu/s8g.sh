#!/usr/bin/env bash
# session 8, round g: is the compiled host step itself slow on the H100 host? 16k under the cap with torch's fused
# host step (pieces of 4M), then the host step variants alone at 0.4B, the compiled one included.
set -u
export PYTHONUNBUFFERED=1 TORCHINDUCTOR_COMPILE_THREADS=1
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
RES=${RES:-/tmp/s8g}; mkdir -p "$RES"
F='status=|device:|bound |Error|error'
echo "== speed 16k, torch host step"
VBHAL_HOST_STEP=torch VBHAL_HOST_STEP_CHUNK=4194304 timeout 140 python3 benchmarks/bench_offload.py speed --steps 3 \
  --tokens 16384 --host-only-tokens "" --out "$RES/offload-16k-torchstep.json" 2>&1 | grep -E "$F" | cut -c1-500
echo "== hoststep 0.4B (compiled included)"
timeout 170 python3 benchmarks/bench_offload.py hoststep --hoststep-params 500000000 --out "$RES/offload-hoststep.json" 2>&1 \
  | grep "hoststep" | tail -n 10
ls "$RES"
