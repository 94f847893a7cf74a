#!/usr/bin/env bash
# session 7 round A: streaming floor v2 + quantize parts (new tree), then the plan at M = 1/16/64 for the old (HEAD
# before session 7) and new trees, alternating twice; and whether ncu/nsys exist on this image.
set -u
export PYTHONUNBUFFERED=1 VBHAL_SKIP_INTERPRET=1
(which ncu nsys; ncu --version) > "$RES/tools.txt" 2>&1
PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" timeout 150 python3 gpu/s7_probe.py 2>&1 | grep -v "^$" | tail -40
for spec in "old 1,16,64" "new 1,16,64" "old 1" "new 1"; do
  t=${spec% *}; ms=${spec#* }
  if [ $t = old ]; then tree="$PWD/.old"; else tree="$PWD"; fi
  PYTHONPATH="$tree${PYTHONPATH:+:$PYTHONPATH}" timeout 150 python3 gpu/s7_plan.py $t $ms 2>&1 | grep -v "^$" | tail -14
done
