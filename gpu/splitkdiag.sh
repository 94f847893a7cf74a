#!/usr/bin/env bash
set -u
export PYTHONUNBUFFERED=1
RES=${RES:-/tmp/splitkdiag}; mkdir -p "$RES"
timeout 200 python3 gpu/splitk_diag2.py 2>&1 | tee "$RES/diag.txt" | grep -v Warn | tail -20
