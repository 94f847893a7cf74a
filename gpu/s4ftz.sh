#!/usr/bin/env bash
# session 4: the host step's FTZ/DAZ (OffloadConfig.host_flush_denormal, default on): the GPU offload tests that
# compare the engine bit for bit with plain training (normal values: flushing must change nothing), then the host
# AdamW rates, subnormal-state rows included.
set -u
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" TORCHINDUCTOR_COMPILE_THREADS=1
RES=${RES:-/tmp/s4ftz}; mkdir -p "$RES"
timeout 60 python3 tests/tiers/test_cuda.py 2>&1 | grep -v "Warn\|warn(" | tail -n 6
timeout 90 python3 tests/nn/test_offload_hybrid.py 2>&1 | grep -v "Warn\|warn(" | tail -n 4
timeout 150 python3 benchmarks/bench_offload.py hoststep --hoststep-params 500000000 --out "$RES/offload-hoststep.json" 2>&1 \
  | grep -v "Warning\|warn(" | tail -n 12
