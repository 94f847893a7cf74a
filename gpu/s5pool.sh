#!/usr/bin/env bash
# session 5 (the private pool was tried and removed: no fewer retries, OOM at 64k): the streamed buffers in a private allocator pool.
# 16k under the 8 GB cap with the shared pool (stream_pool=0) and with the default; then 64k with the default.
set -u
export PYTHONUNBUFFERED=1 TORCHINDUCTOR_COMPILE_THREADS=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
RES=${RES:-/tmp/s5pool}; mkdir -p "$RES"
echo "== hybrid test"
timeout 80 python3 tests/nn/test_offload_hybrid.py 2>&1 | grep -v "Warning\|warn(" | tail -n 6
echo "== speed 16k, 8 GB cap, stream_pool=0"
VBHAL_BENCH_STREAM_POOL=0 timeout 135 python3 benchmarks/bench_offload.py speed --steps 3 --tokens 16384 \
   --host-only-tokens "" --out "$RES/offload-sharedpool.json" 2>&1 | grep -E "status=|device:|Error|error" | cut -c1-600
echo "== speed 16k + 64k, 8 GB cap, defaults"
timeout 320 python3 benchmarks/bench_offload.py speed --steps 3 --tokens 16384,65536 \
   --host-only-tokens "" --out "$RES/offload-final.json" 2>&1 | grep -E "status=|device:|Error|error" | cut -c1-600
