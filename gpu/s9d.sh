#!/usr/bin/env bash
# session 9, round d: where the device's extra compute time in the offloaded step goes (gpu/s9_prof.py), then 16k
# with the host step kept off 3 cores (the training thread and autograd thread launch the GPU's work).
set -u
export PYTHONUNBUFFERED=1 TORCHINDUCTOR_COMPILE_THREADS=1
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
RES=${RES:-/tmp/s9d}; mkdir -p "$RES"
echo "== profile"
RES=$RES timeout 330 python3 gpu/s9_prof.py 2>&1 | grep -v "arn\|USDT" | cut -c1-300
F='status=|device:|engine built|bound |pinned copy|Error|error'
echo "== speed 16k, reserve 3 cores"
VBHAL_BENCH_RESERVE_CORES=3 timeout 170 python3 benchmarks/bench_offload.py speed --steps 3 --tokens 16384 --host-only-tokens "" \
  --out "$RES/offload-16k-reserve3.json" 2>&1 | grep -E "$F" | cut -c1-600
