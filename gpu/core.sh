#!/usr/bin/env bash
# Core checks on the GPU machine: vbhal info, the core tests, and the CUDA conformance report.
set -u
python3 -m vbhal.cli info | tee "$RES/info.txt"
python3 -m vbhal.cli info --json > "$RES/info.json"
python3 -m pytest -q -x tests/core -p no:cacheprovider -k "not wheel and not plugin_passes" 2>&1 | tail -n 30
python3 -m vbhal.cli conformance --device cuda --report "$RES/cuda-h100.md" 2>&1 | tail -n 30
cat "$RES/cuda-h100.md" | head -80
