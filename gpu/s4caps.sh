#!/usr/bin/env bash
# session 4 diagnostic for issue 5's 16k gap: the same engine (auto hybrid share, no keep plan so the caps do not
# change what stays on the device) at GPU caps of 8, 12 and 24 GB, 16k tokens, against the uncapped in-GPU step.
# If the step falls with the cap, memory pressure (allocator retries, buffer reuse waits) is part of the gap.
set -u
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" TORCHINDUCTOR_COMPILE_THREADS=1
RES=${RES:-/tmp/s4caps}; mkdir -p "$RES"
VBHAL_HOST_STEP=torch VBHAL_HOST_STEP_CHUNK=4194304 VBHAL_BENCH_KEEP_BYTES=0 timeout ${CAPS_S:-260} \
  python3 benchmarks/bench_offload.py speed --steps 3 --tokens 16384 --host-only-tokens "" --caps 8,12,24 \
  --out "$RES/offload-caps.json" 2>&1 | grep -v "^\[\|Warning\|warn(\|^W1" | tail -n 30
