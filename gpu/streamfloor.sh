#!/usr/bin/env bash
set -u
export PYTHONUNBUFFERED=1
RES=${RES:-/tmp/streamfloor}; mkdir -p "$RES"
RES="$RES" timeout 100 python3 gpu/fp4_stream_floor.py 2>&1 | tee "$RES/floor.txt" | tail -20
