#!/usr/bin/env bash
# session 9, round g: the final code (recompute_skip opt-in with the review's checks; the bench opts in): the hybrid
# bitwise test on CUDA, then 16k + 64k under the 8 GB cap.
set -u
export PYTHONUNBUFFERED=1 TORCHINDUCTOR_COMPILE_THREADS=1
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
RES=${RES:-/tmp/s9g}; mkdir -p "$RES"
F='status=|device:|engine built|bound |pinned copy|Error|error'
echo "== hybrid test"
timeout 90 python3 tests/nn/test_offload_hybrid.py 2>&1 | grep -v "Warning\|warn(" | tail -n 4
echo "== speed 16k + 64k, 8 GB cap (bench: recompute_skip on)"
timeout 230 python3 benchmarks/bench_offload.py speed --steps 3 --tokens 16384,65536 --host-only-tokens "" \
  --out "$RES/offload-s9g.json" 2>&1 | grep -E "$F" | cut -c1-600
