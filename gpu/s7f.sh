#!/usr/bin/env bash
# session 7 round F: the split-K stress again for the kinds round E's crash left out (mm_pt at M = 64 -- the config
# that gave NaN once in s7final -- and the split GEMV), in-kernel sum as is and with the per-thread fence.
set -u
export PYTHONUNBUFFERED=1 VBHAL_SKIP_INTERPRET=1
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
C=${CALLS:-6000}
STRESS_KINDS=mm_pt,gemv_pf VBHAL_FP4_SPLITK_WARP_FENCE=0 timeout 80 python3 gpu/s7_stress.py fixup $C 2>&1 | grep -v "^$" | tail -5
STRESS_KINDS=mm_pt,gemv_pf VBHAL_FP4_SPLITK_WARP_FENCE=1 timeout 80 python3 gpu/s7_stress.py fixup_fence $C 2>&1 | grep -v "^$" | tail -5
