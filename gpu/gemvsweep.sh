#!/usr/bin/env bash
set -u
export PYTHONUNBUFFERED=1
RES=${RES:-/tmp/gemvsweep}; mkdir -p "$RES"
RES="$RES" python3 gpu/fp4_gemv_sweep.py ${GEMV_SWEEP_ARGS:-150 mxfp4} 2>&1 | tee "$RES/sweep.txt" | grep -v "^{"
