#!/usr/bin/env bash
# session 7 round E: split-K stress (the NaN seen once in s7final): in-kernel sum as is, with a fence in every
# warp, and the two-step form; then the M = 16 / 64 plan times of the three.
set -u
export PYTHONUNBUFFERED=1 VBHAL_SKIP_INTERPRET=1
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
C=${CALLS:-3000}
VBHAL_FP4_SPLITK_WARP_FENCE=0 timeout 110 python3 gpu/s7_stress.py fixup $C 2>&1 | grep -v "^$" | tail -8
VBHAL_FP4_SPLITK_WARP_FENCE=1 timeout 110 python3 gpu/s7_stress.py fixup_fence $C 2>&1 | grep -v "^$" | tail -8
VBHAL_FP4_SPLITK_FIXUP=0 timeout 110 python3 gpu/s7_stress.py two_step $C 2>&1 | grep -v "^$" | tail -8
for v in "fixup 0 1" "fence 1 1" "two 0 0"; do
  set -- $v
  VBHAL_FP4_SPLITK_WARP_FENCE=$2 VBHAL_FP4_SPLITK_FIXUP=$3 timeout 60 python3 gpu/s7_plan.py $1 16,64 2>&1 | grep -E "mxfp4|cublas" | tail -4
done
