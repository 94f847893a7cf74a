#!/usr/bin/env bash
# Core checks on the GPU machine: vbhal info and the CUDA conformance report (conformance/reports/cuda-h100.md).
set -u
python3 -m vbhal.cli info | tee "$RES/info.txt"
python3 -m vbhal.cli conformance --device cuda --report "$RES/cuda-h100.md" 2>&1 | tail -n 40
cat "$RES/cuda-h100.md" | head -120
