#!/usr/bin/env bash
set -u
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" VBHAL_HOST_STEP=torch
RES=${RES:-/tmp/alloctrace}; mkdir -p "$RES"
RES="$RES" timeout "${ALLOC_TRACE_S:-200}" python3 gpu/alloc_trace.py 2>&1 | grep -v "Warning\|warn(" | tee "$RES/trace.txt" | tail -n 150
