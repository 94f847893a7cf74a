#!/usr/bin/env bash
# session 9, round b: the compiled host step's thread fix (cpp.dynamic_threads, compiled for the worker's count) on
# torch 2.11: its tests, then the probe (gpu/s9_probe.py) with the compiled step and with torch's fused step.
set -u
export PYTHONUNBUFFERED=1 TORCHINDUCTOR_COMPILE_THREADS=1
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
RES=${RES:-/tmp/s9b}; mkdir -p "$RES"
echo "== probe, compiled step (fixed)"
RES=$RES/compiled timeout 200 python3 gpu/s9_probe.py 2>&1 | grep -v "arn" | cut -c1-700
echo "== probe, torch fused step"
RES=$RES/torch VBHAL_HOST_STEP=torch VBHAL_HOST_STEP_CHUNK=4194304 timeout 150 python3 gpu/s9_probe.py 2>&1 | grep -v "arn" | cut -c1-700
echo "== tests: threads, GIL"
timeout 150 python3 -m pytest -q -p no:cacheprovider -W ignore tests/nn/test_offload.py -k "workers_threads or gil" -rfEs 2>&1 | tail -n 6 | cut -c1-400
