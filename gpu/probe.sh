#!/usr/bin/env bash
# Lead's host probe (round 4): machine facts for the offload engine's host optimizer.
set -u
RES=${RES:-/tmp/probe}; mkdir -p "$RES"
( nproc; lscpu | grep -E "Model name|Socket|NUMA|Thread|Core|MHz|L3"; free -g; which gcc g++ cc; numactl -H 2>/dev/null | head -5 ) > "$RES/host.txt" 2>&1
cat "$RES/host.txt"
timeout 150 python3 gpu/probe_host.py
