#!/usr/bin/env bash
# session 4: the host's own AdamW rate (hoststep part, 0.5B params), then the 16k speed row with the defaults (auto
# hybrid share, keep plan) on the same machine, so a slow host shows up as such.
set -u
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" TORCHINDUCTOR_COMPILE_THREADS=1
RES=${RES:-/tmp/s4speed}; mkdir -p "$RES"
lscpu | grep -E "Model name|^CPU\(s\)|NUMA node\(s\)|MHz" ; free -g | head -2
timeout 60 python3 benchmarks/bench_offload.py hoststep --hoststep-params 500000000 --out "$RES/offload-speed.json" 2>&1 \
  | grep -v "Warning\|warn(" | tail -n 8
VBHAL_HOST_STEP=torch VBHAL_HOST_STEP_CHUNK=4194304 timeout 120 python3 benchmarks/bench_offload.py speed --steps 3 \
  --tokens 16384 --host-only-tokens "" --out "$RES/offload-speed.json" 2>&1 | grep -E "status=|device:|GB/step" | cut -c1-330
