#!/usr/bin/env bash
# session 8, round d: after the event-timed copy rates -- the peers at 0.81B (its first engine is built while the
# host step compiles: where the host-clock rate read 5 GB/s), 16k tokens under the 8 GB cap, the CUDA tier tests.
set -u
export PYTHONUNBUFFERED=1 TORCHINDUCTOR_COMPILE_THREADS=1 VBHAL_DS_TORCH_ADAM=1
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
RES=${RES:-/tmp/s8d}; mkdir -p "$RES"
( python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site-tiers .whl/tiers/*.whl \
    > "$RES/wheels-tiers.txt" 2>&1 || echo "wheel install failed" >> "$RES/wheels-tiers.txt" ) &
F='status=|device:|engine built|bound |pinned copy|Error|error|auto:'
echo "== CUDA tier tests"
timeout 60 python3 -m pytest -q -p no:cacheprovider -W ignore tests/tiers/test_cuda.py 2>&1 | tail -n 3
wait
echo "== peers 0.81B"
PATH="/tmp/site-tiers/bin:$PATH" PYTHONPATH="$PYTHONPATH:/tmp/site-tiers" timeout 130 \
  python3 benchmarks/bench_offload.py peers --blocks 6 --steps 3 --out "$RES/offload-peers.json" 2>&1 \
  | grep -E "$F" | cut -c1-400 | tail -n 12
python3 -c "
import json; d=json.load(open('$RES/offload-peers.json'))
for r in d['peers']['rows']:
    a = r.get('gpu_step_auto') or {}
    print(r['peer'], r.get('step_s'), 'auto bw', a.get('bw_GBps'), 'f', a.get('fraction'), r.get('gpu_step_note'))
"
echo "== speed 16k, 8 GB cap"
timeout 170 python3 benchmarks/bench_offload.py speed --steps 3 --tokens 16384 --host-only-tokens "" \
  --out "$RES/offload-16k.json" 2>&1 | grep -E "$F" | cut -c1-700
python3 -c "
import json; d=json.load(open('$RES/offload-16k.json'))
for r in d['speed']['rows']:
    print(r['peer'], r.get('step_s'), r.get('gpu_step_auto'))
"
ls "$RES"
