#!/usr/bin/env bash
# session 9, round a: where the in-step host AdamW time goes (gpu/s9_probe.py), with the bench's 15 intra-op
# threads and then with 8 (a memory-bound step needs fewer; fewer threads also leave cores to the training threads).
set -u
export PYTHONUNBUFFERED=1 TORCHINDUCTOR_COMPILE_THREADS=1
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
RES=${RES:-/tmp/s9a}; mkdir -p "$RES"
nproc; free -g | head -2; cat /sys/kernel/mm/transparent_hugepage/enabled; lscpu | grep -E "Model name|NUMA|Socket|Thread|L3" 
echo "== probe, 15 threads"
RES=$RES/t15 timeout 260 python3 gpu/s9_probe.py 2>&1 | grep -v "arn" | cut -c1-900
echo "== probe, 8 threads"
RES=$RES/t8 VBHAL_BENCH_OPT_THREADS=8 timeout 200 python3 gpu/s9_probe.py 2>&1 | grep -v "arn" | cut -c1-900
