#!/usr/bin/env bash
# session 4, last round: (1) the full attention benchmark grid with nothing skipped and the S=64k peak memory
# (the committed JSON had 14 budget-skipped cells and no memory rows); (2) the GPU tests whose reference loop was
# folded into vbhal.conformance._reference.split_adamw_reference (CUDA tier test, hybrid bitwise test, bench check).
set -u
export PYTHONUNBUFFERED=1 VBHAL_SKIP_INTERPRET=1
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
RES=${RES:-/tmp/s4final}; mkdir -p "$RES"
echo "== attention benchmark (full grid + memory) =="
timeout ${S4_ATTN_S:-260} python3 -W ignore benchmarks/bench_attention.py --trio-rounds 6 --out "$RES/attention-bench.json" \
  2>&1 | tail -n 80 > "$RES/bench.txt"
echo "rc=$?"; grep -E "^target|peak|skipped" "$RES/bench.txt"
echo "== offload GPU tests (folded reference) =="
timeout 60 python3 tests/tiers/test_cuda.py 2>&1 | grep -v "Warn\|warn(" | tail -n 8
timeout 90 python3 tests/nn/test_offload_hybrid.py 2>&1 | grep -v "Warn\|warn(" | tail -n 6
timeout 60 python3 benchmarks/bench_offload.py check --steps 3 --out "$RES/offload-check.json" 2>&1 | grep -v "Warn\|warn(\|^\[" | tail -n 4
