#!/usr/bin/env bash
# session 8, round f: why the host AdamW runs 4-5x slower inside the engine's step than alone -- (1) alone vs under
# pinned copies both ways; (2) 16k under the cap with the default reserve (1 core) and with 3 cores left to the
# training and autograd threads.
set -u
export PYTHONUNBUFFERED=1 TORCHINDUCTOR_COMPILE_THREADS=1
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
RES=${RES:-/tmp/s8f}; mkdir -p "$RES"
echo "== host AdamW alone / under DMA"
timeout 90 python3 gpu/s8_hostdma.py "$RES/hostdma.json" 2>&1 | tail -n 25
F='status=|device:|bound |Error|error'
for rc in 3 1; do
  echo "== speed 16k, reserve_cores=$rc"
  VBHAL_BENCH_RESERVE_CORES=$rc timeout 150 python3 benchmarks/bench_offload.py speed --steps 3 --tokens 16384 \
    --host-only-tokens "" --out "$RES/offload-16k-r$rc.json" 2>&1 | grep -E "$F" | cut -c1-500
done
ls "$RES"
