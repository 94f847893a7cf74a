#!/usr/bin/env bash
set -u
export PYTHONUNBUFFERED=1 VBHAL_SKIP_INTERPRET=1
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
timeout 520 python3 gpu/gemv_sweep2.py 2>&1 | grep -v "^$" | tail -25
