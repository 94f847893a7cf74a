#!/usr/bin/env bash
# session 3: the GPU checks left from session 2: hybrid offload bitwise test, FP4Linear kernel binding probe
set -u
export PYTHONUNBUFFERED=1
RES=${RES:-/tmp/s3checks}; mkdir -p "$RES"
echo "== hybrid offload bitwise (tests/nn/test_offload_hybrid.py)"
timeout 150 python3 tests/nn/test_offload_hybrid.py > "$RES/hybrid.txt" 2>&1; echo "rc=$?"
tail -15 "$RES/hybrid.txt"
echo "== FP4Linear binding + eager probe"
timeout 90 python3 gpu/fp4_eager_probe.py > "$RES/eager.txt" 2>&1; echo "rc=$?"
grep -v "^-\|^ " "$RES/eager.txt" | head -20
