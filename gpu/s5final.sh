#!/usr/bin/env bash
# session 5 final offload round: the hybrid bitwise test on the final engine; 16k under the 8 GB cap with the host
# step on every core (reserve_cores=0, as before this session) and with the default (one core left to the training
# thread); then 16k and 64k with the defaults (the table's rows).
set -u
export PYTHONUNBUFFERED=1 TORCHINDUCTOR_COMPILE_THREADS=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
RES=${RES:-/tmp/s5final}; mkdir -p "$RES"
echo "== hybrid test"
timeout 80 python3 tests/nn/test_offload_hybrid.py 2>&1 | grep -v "Warning\|warn(" | tail -n 6
echo "== speed 16k, 8 GB cap, reserve_cores=0"
VBHAL_BENCH_RESERVE_CORES=0 timeout 135 python3 benchmarks/bench_offload.py speed --steps 3 --tokens 16384 \
   --host-only-tokens "" --out "$RES/offload-reserve0.json" 2>&1 | grep -E "status=|device:|Error|error" | cut -c1-600
echo "== speed 16k + 64k, 8 GB cap, defaults (reserve_cores=1)"
timeout 320 python3 benchmarks/bench_offload.py speed --steps 3 --tokens 16384,65536 \
   --host-only-tokens "" --out "$RES/offload-final.json" 2>&1 | grep -E "status=|device:|Error|error" | cut -c1-600
