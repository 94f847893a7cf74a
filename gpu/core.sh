#!/usr/bin/env bash
# Core checks on the GPU machine: vbhal info and the CUDA conformance report (conformance/reports/cuda-h100.md).
set -u
python3 -m vbhal.cli info > "$RES/info.txt" 2>&1
python3 -m vbhal.cli conformance --device cuda --report "$RES/cuda-h100.md" --durations=15 -rfE 2>&1
cat "$RES/cuda-h100.md"
