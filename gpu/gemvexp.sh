#!/usr/bin/env bash
set -u
export PYTHONUNBUFFERED=1
RES=${RES:-/tmp/gemvexp}; mkdir -p "$RES"
RES="$RES" python3 gpu/fp4_gemv_exp.py ${GEMV_EXP_BUDGET:-150} 2>&1 | tee "$RES/exp.txt" | grep -v "^{"
