#!/usr/bin/env bash
set -u
export PYTHONUNBUFFERED=1 VBHAL_SKIP_INTERPRET=1
RES=${RES:-/tmp/eagerprof}; mkdir -p "$RES"
timeout 120 python3 gpu/eager_prof.py 2>&1 | tee "$RES/prof.txt" | grep -v "^$" | head -60
