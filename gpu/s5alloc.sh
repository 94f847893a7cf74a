#!/usr/bin/env bash
# session 5: the offload engine takes every streamed device buffer from the compute stream's pool (no record_stream).
# (1) the hybrid bitwise test on the new code; (2) 16k tokens under the 8 GB cap, new tree vs the tree before the
# change (.old, git archive of the previous commit), same machine, one after the other; defaults otherwise.
set -u
export PYTHONUNBUFFERED=1 TORCHINDUCTOR_COMPILE_THREADS=1
RES=${RES:-/tmp/s5alloc}; mkdir -p "$RES"
ROOT=$PWD
echo "== hybrid test (new tree)"
PYTHONPATH=$ROOT timeout "${S5_HYBRID_S:-100}" python3 tests/nn/test_offload_hybrid.py 2>&1 | grep -v "Warning\|warn(" | tail -n 8
for tree in ${S5_TREES:-new old}; do
  dir=$ROOT; [ "$tree" = old ] && dir=$ROOT/.old
  [ -d "$dir" ] || { echo "no $dir"; continue; }
  echo "== speed 16k, 8 GB cap: $tree tree"
  (cd "$dir" && PYTHONPATH=$dir timeout "${S5_SPEED_S:-150}" python3 -c "import vbhal, sys; print('vbhal from', vbhal.__file__)" \
    && PYTHONPATH=$dir timeout "${S5_SPEED_S:-150}" python3 benchmarks/bench_offload.py speed --steps 3 --tokens 16384 \
       --host-only-tokens "" --out "$RES/offload-$tree.json" 2>&1 | grep -E "status=|device:|engine built|Error|error" | cut -c1-600)
done
