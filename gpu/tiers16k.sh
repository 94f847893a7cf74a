#!/usr/bin/env bash
# Lead's check (final round): the 16k-token speed row without the keep plan (VBHAL_BENCH_KEEP_BYTES=0), to
# compare with the keep-plan row of R5 (1.163 s, allocator retries 9/step) and R4's hybrid without it (1.095 s).
set -u
RES=${RES:-/tmp/tiers16k}; mkdir -p "$RES"
export PYTHONUNBUFFERED=1
VBHAL_BENCH_KEEP_BYTES=0 timeout 150 python3 benchmarks/bench_offload.py speed --tokens 16384 --steps 3 \
  --host-only-tokens "" --out "$RES/offload-16k-nokeep.json" 2>&1 | grep -v "^\s*$" | tail -n 14
