#!/usr/bin/env bash
# session 7 round B: Nsight Compute on the planned FP4 linear at M = 1, 16, 64 (mxfp4): occupancy, issue, stalls.
set -u
export PYTHONUNBUFFERED=1 VBHAL_SKIP_INTERPRET=1
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
NCU=$(which ncu || echo /usr/local/cuda/bin/ncu)
for m in 1 16 64; do
  echo "=== mxfp4 M=$m"
  timeout 160 "$NCU" --profile-from-start off --cache-control all --clock-control none --metrics "regex:smsp__average_warps_issue_stalled_.*_per_issue_active\.ratio" \
    --section SpeedOfLight --section Occupancy --section LaunchStats --section SchedulerStats \
    --section WarpStateStats --section MemoryWorkloadAnalysis \
    python3 gpu/s7_ncu.py mxfp4 $m > "$RES/ncu_m$m.txt" 2>&1
  echo "rc=$?"
  grep -E "plan:|fp4_|Kernel|Duration|Memory Throughput|DRAM Throughput|Compute \(SM\) Throughput|Achieved Occupancy|Theoretical Occupancy|Registers Per|Block Limit|Waves Per SM|Grid Size|Block Size|Issue Slots Busy|No Eligible|Active Warps Per|Eligible Warps|Warp Cycles Per Issued|Stall|stalled|L1/TEX Hit|L2 Hit|Mem Busy|Max Bandwidth|Shared Memory Configuration Size|Dynamic Shared" "$RES/ncu_m$m.txt" | head -80
done
