#!/usr/bin/env bash
# session 4: is the slower host AdamW in today's 16k rows (0.97-1.75 s/B in the step vs 0.39 in session 3) the
# benchmark's new init (per-block offsets into the random pattern) or the machine? Same machine, same code, the
# 16k defaults row with the old init (identical blocks) and the new one.
set -u
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" TORCHINDUCTOR_COMPILE_THREADS=1
RES=${RES:-/tmp/s4init}; mkdir -p "$RES"
for roll in 0 1; do
  echo "== VBHAL_BENCH_INIT_ROLL=$roll"
  VBHAL_BENCH_INIT_ROLL=$roll VBHAL_HOST_STEP=torch VBHAL_HOST_STEP_CHUNK=4194304 timeout 110 python3 \
    benchmarks/bench_offload.py speed --steps 3 --tokens 16384 --host-only-tokens "" --out "$RES/offload-init$roll.json" \
    2>&1 | grep -E "status=|device:" | cut -c1-300
  python3 -c "
import json; r=json.load(open('$RES/offload-init$roll.json'))['speed']['rows'][-1]
print('losses', r.get('losses'), 'auto', {k: r['gpu_step_auto'][k] for k in ('host_s_per_Bparams', 'fraction')} if r.get('gpu_step_auto') else None)"
done
