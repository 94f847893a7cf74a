#!/usr/bin/env bash
# session 7 round C: the in-kernel split-K sum -- GPU split-K tests, config timings fixup vs two-step, the plan.
set -u
export PYTHONUNBUFFERED=1 VBHAL_SKIP_INTERPRET=1
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
timeout 230 python3 gpu/s7_fixup.py 2>&1 | grep -v "^$" | tail -60
timeout 280 python3 -m pytest -q -x -p no:cacheprovider tests/backends/cuda/test_fp4_gpu.py \
  -k "split_k or packed_decode or huge_block" 2>&1 | tail -15
