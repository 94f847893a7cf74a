#!/usr/bin/env bash
# session 7 round D: mm_p / mm_pt config sweep at M = 16, 64, 8 (warps, stages, splits) with the in-kernel split-K sum.
set -u
export PYTHONUNBUFFERED=1 VBHAL_SKIP_INTERPRET=1
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
timeout 200 python3 gpu/s7_mmsweep.py 2>&1 | grep -v "^$" | tail -40
