#!/usr/bin/env bash
# session 8, round c: offload at 64k tokens under the 8 GB cap (this tree), the peers at 0.81B (DeepSpeed ZeRO-3
# offload with torch's CPU AdamW, torchao), the host AdamW variants at 0.5B, then the FP4 benchmark at K=N=8192
# (its JSON; s8a's was overwritten by the second shape).
set -u
export PYTHONUNBUFFERED=1 TORCHINDUCTOR_COMPILE_THREADS=1 VBHAL_DS_TORCH_ADAM=1
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
RES=${RES:-/tmp/s8c}; mkdir -p "$RES"
( python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site-tiers .whl/tiers/*.whl \
    > "$RES/wheels-tiers.txt" 2>&1 || echo "wheel install failed" >> "$RES/wheels-tiers.txt" ) &
F='status=|device:|engine built|bound |pinned copy|Error|error|GB/step'
echo "== speed 64k, 8 GB cap"
timeout 210 python3 benchmarks/bench_offload.py speed --steps 3 --tokens 65536 --host-only-tokens "" \
  --out "$RES/offload-64k.json" 2>&1 | grep -E "$F" | cut -c1-700
wait
echo "== peers 0.81B"
PATH="/tmp/site-tiers/bin:$PATH" PYTHONPATH="$PYTHONPATH:/tmp/site-tiers" timeout 120 \
  python3 benchmarks/bench_offload.py peers --blocks 6 --steps 3 --out "$RES/offload-peers.json" 2>&1 \
  | grep -E "$F|peer|speedup" | cut -c1-500 | tail -n 12
echo "== hoststep 0.5B"
timeout 70 python3 benchmarks/bench_offload.py hoststep --hoststep-params 500000000 --out "$RES/offload-hoststep.json" 2>&1 \
  | grep "hoststep" | tail -n 10
echo "== fp4 bench K=N=8192"
VBHAL_SKIP_INTERPRET=1 timeout 170 python3 benchmarks/bench_fp4_linear.py --shapes 8192:8192 --out "$RES" > "$RES/bench.txt" 2>&1
echo "fp4 bench rc=$?"; grep -E "^K=" "$RES/bench.txt" | cut -c1-120
ls "$RES"
