#!/usr/bin/env bash
# session 3: per-path FP4 probe (gpu/fp4_paths.py): FP4PATHS_ARGS="budget fmts shapes ms"
set -u
export PYTHONUNBUFFERED=1
RES=${RES:-/tmp/fp4paths}; mkdir -p "$RES"
RES="$RES" python3 gpu/fp4_paths.py ${FP4PATHS_ARGS:-200 mxfp4 8192:8192 1,16,64,256,1024,4096} 2>&1 | tee "$RES/paths.txt" | grep -v "^{"
