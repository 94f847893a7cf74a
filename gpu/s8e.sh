#!/usr/bin/env bash
# session 8, round e: the final engine (GIL fix, event-timed copy rates, one refinement of the auto share) at 16k and
# 64k tokens under the 8 GB cap, one engine, each row planned again.
set -u
export PYTHONUNBUFFERED=1 TORCHINDUCTOR_COMPILE_THREADS=1
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
RES=${RES:-/tmp/s8e}; mkdir -p "$RES"
F='status=|device:|engine built|bound |pinned copy|Error|error'
echo "== speed 16k + 64k, 8 GB cap"
timeout 420 python3 benchmarks/bench_offload.py speed --steps 3 --tokens 16384,65536 --host-only-tokens "" \
  --out "$RES/offload-final.json" 2>&1 | grep -E "$F" | cut -c1-600
python3 -c "
import json; d=json.load(open('$RES/offload-final.json'))
for r in d['speed']['rows']:
    a = r.get('gpu_step_auto') or {}
    print(r['peer'], r['tokens'], r.get('step_s'), r.get('step_times'), r.get('gpu_step_note'), 'f', a.get('fraction'), 'refine', a.get('refine'))
"
ls "$RES"
