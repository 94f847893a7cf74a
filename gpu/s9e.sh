#!/usr/bin/env bash
# session 9, round e: the backward recompute without its dead ops (recompute_skip): the hybrid bitwise test on CUDA,
# then 16k + 64k under the 8 GB cap with it (default) and without it, then 16k with 3 cores reserved; one machine.
set -u
export PYTHONUNBUFFERED=1 TORCHINDUCTOR_COMPILE_THREADS=1
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
RES=${RES:-/tmp/s9e}; mkdir -p "$RES"
F='status=|device:|engine built|bound |pinned copy|Error|error'
echo "== hybrid test (recompute_skip default on)"
timeout 90 python3 tests/nn/test_offload_hybrid.py 2>&1 | grep -v "Warning\|warn(" | tail -n 6
for v in on off; do
  echo "== speed 16k + 64k, 8 GB cap, recompute_skip $v"
  S=1; [ $v = off ] && S=0
  VBHAL_BENCH_RECOMPUTE_SKIP=$S timeout 200 python3 benchmarks/bench_offload.py speed --steps 3 --tokens 16384,65536 \
    --host-only-tokens "" --out "$RES/offload-skip-$v.json" 2>&1 | grep -E "$F" | cut -c1-600
done
echo "== speed 16k, reserve 3 cores"
VBHAL_BENCH_RESERVE_CORES=3 timeout 120 python3 benchmarks/bench_offload.py speed --steps 3 --tokens 16384 --host-only-tokens "" \
  --out "$RES/offload-16k-reserve3.json" 2>&1 | grep -E "$F" | cut -c1-600
