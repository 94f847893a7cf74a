#!/usr/bin/env bash
# session 8, round g: is the compiled host step itself slow on the H100 host? 16k under the cap with torch's fused
# host step (pieces of 4M) instead (the device budget left no room for the compiled step alone).
set -u
export PYTHONUNBUFFERED=1 TORCHINDUCTOR_COMPILE_THREADS=1
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
RES=${RES:-/tmp/s8g}; mkdir -p "$RES"
F='status=|device:|bound |Error|error'
echo "== speed 16k, torch host step"
VBHAL_HOST_STEP=torch VBHAL_HOST_STEP_CHUNK=4194304 timeout 135 python3 benchmarks/bench_offload.py speed --steps 3 \
  --tokens 16384 --host-only-tokens "" --out "$RES/offload-16k-torchstep.json" 2>&1 | grep -E "$F" | cut -c1-500
ls "$RES"
