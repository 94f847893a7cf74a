#!/usr/bin/env bash
# session 9, round c: the engine with the host step on every core and the worker taking ready gradients first:
# the bench's speed part at 16k and 64k tokens under the 8 GB cap (one engine, each row planned again).
set -u
export PYTHONUNBUFFERED=1 TORCHINDUCTOR_COMPILE_THREADS=1
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
RES=${RES:-/tmp/s9c}; mkdir -p "$RES"
F='status=|device:|engine built|bound |pinned copy|Error|error'
echo "== speed 16k + 64k, 8 GB cap"
timeout 440 python3 benchmarks/bench_offload.py speed --steps 3 --tokens 16384,65536 --host-only-tokens "" \
  --out "$RES/offload-s9c.json" 2>&1 | grep -E "$F" | cut -c1-600
python3 -c "
import json; d=json.load(open('$RES/offload-s9c.json'))
for r in d['speed']['rows']:
    print(r['peer'], r['tokens'], r.get('step_s'), r.get('step_times'), r.get('gpu_step_note'))
"
echo "== hybrid test"
timeout 90 python3 tests/nn/test_offload_hybrid.py 2>&1 | grep -v "Warning\|warn(" | tail -n 6
