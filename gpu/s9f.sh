#!/usr/bin/env bash
# session 9, round f: the final engine at 16k and 64k under the 8 GB cap (auto share), then 16k with fixed
# device-stepped shares in the same engine (is the auto share too small now that the host step is parallel?).
set -u
export PYTHONUNBUFFERED=1 TORCHINDUCTOR_COMPILE_THREADS=1
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
RES=${RES:-/tmp/s9f}; mkdir -p "$RES"
F='status=|device:|engine built|bound |pinned copy|Error|error'
echo "== speed 16k + 64k, 8 GB cap; then 16k at fixed shares"
VBHAL_BENCH_GPU_FRACS=0.38,0.46,0.54 timeout 330 python3 benchmarks/bench_offload.py speed --steps 3 --tokens 16384,65536 \
  --host-only-tokens "" --out "$RES/offload-s9f.json" 2>&1 | grep -E "$F" | cut -c1-600
