#!/usr/bin/env bash
# split-K finalize at large M (session 3): the diagnostic with the direct Triton launches off, then on
set -u
export PYTHONUNBUFFERED=1 VBHAL_SKIP_INTERPRET=1
RES=${RES:-/tmp/splitkdiag}; mkdir -p "$RES"
for d in 0 1; do
  echo "== VBHAL_FP4_DIRECT_LAUNCH=$d"
  VBHAL_FP4_DIRECT_LAUNCH=$d timeout 60 python3 gpu/splitk_diag2.py 2>&1 | grep -v Warn | tee "$RES/diag_$d.txt"
done
