#!/usr/bin/env bash
# session 5: is the in-step slowdown CPU contention? s5alloc's machine ran the device compute of a 16k step in
# 1.9-3.6 s (in-GPU step 0.67 s) while the host AdamW (15 intra-op threads on 16 cores) ran at 1.5 s per 1e9.
# Same 16k / 8 GB speed row with the host step's intra-op threads at S5_THREADS (default "8 12 15").
set -u
export PYTHONUNBUFFERED=1 TORCHINDUCTOR_COMPILE_THREADS=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
RES=${RES:-/tmp/s5threads}; mkdir -p "$RES"
lscpu | grep -E "^CPU\(s\)|Thread|Core|Socket|Model name|MHz" ; nproc
for th in ${S5_THREADS:-8 12 15}; do
  echo "== speed 16k, 8 GB cap, host step threads $th (${VBHAL_HOST_STEP:-compiled})"
  VBHAL_BENCH_OPT_THREADS=$th timeout "${S5_SPEED_S:-120}" python3 benchmarks/bench_offload.py speed --steps 3 --tokens 16384 \
     --host-only-tokens "" --out "$RES/offload-threads$th.json" 2>&1 | grep -E "status=|device:|Error|error" | cut -c1-600
done
