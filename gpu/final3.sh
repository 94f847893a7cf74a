#!/usr/bin/env bash
# session 3 final FP4 round: direct-launch GPU tests, eager host probe, then fp4cuda (tests, sweep, both benchmark shapes)
set -u
export PYTHONUNBUFFERED=1 VBHAL_SKIP_INTERPRET=1
RES=${RES:-/tmp/final3}; mkdir -p "$RES"
echo "== direct-launch GPU tests"
timeout 60 python3 -m pytest -q -p no:cacheprovider -W ignore tests/backends/cuda/test_fp4_launch.py > "$RES/launch_tests.txt" 2>&1
echo "rc=$?"; tail -2 "$RES/launch_tests.txt"
echo "== eager probe"
timeout 60 python3 gpu/eager_prof.py > "$RES/eager.txt" 2>&1
grep -E "host us|^  [A-Za-z]" "$RES/eager.txt" | head -14
RES="$RES/fp4cuda" FP4CUDA_BUDGET=${FP4CUDA_BUDGET:-330} bash gpu/fp4cuda.sh > "$RES/fp4cuda.txt" 2>&1
sed -n '/== compact table/,$p' "$RES/fp4cuda.txt" | head -40
