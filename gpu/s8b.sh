#!/usr/bin/env bash
# session 8, round b (offload): on one machine, the GIL test of the compiled host step (torch 2.11's Inductor),
# the hybrid bitwise test, then 16k tokens under the 8 GB cap with this tree and with the tree before the GIL fix
# (.old = b5998ff, shipped as a copy inside the snapshot), both with the bench defaults (compiled host step).
set -u
export PYTHONUNBUFFERED=1 TORCHINDUCTOR_COMPILE_THREADS=1
RES=${RES:-/tmp/s8b}; mkdir -p "$RES"
NEW="$PWD"; OLD="$PWD/.old"
echo "== GIL test (new tree)"
PYTHONPATH="$NEW" timeout 120 python3 -m pytest -q -p no:cacheprovider -W ignore tests/nn/test_offload.py \
  -k "gil or compiled_one_pass" -rfEs 2>&1 | tail -n 6 | cut -c1-300
echo "== hybrid test (new tree)"
PYTHONPATH="$NEW" timeout 80 python3 tests/nn/test_offload_hybrid.py 2>&1 | grep -v "Warning\|warn(" | tail -n 6
for tree in new old; do
  T=$NEW; [ $tree = old ] && T=$OLD
  echo "== speed 16k, 8 GB cap, $tree tree"
  ( cd "$T" && PYTHONPATH="$T" timeout 170 python3 benchmarks/bench_offload.py speed --steps 3 --tokens 16384 \
     --host-only-tokens "" --out "$RES/offload-16k-$tree.json" 2>&1 | grep -E "status=|device:|engine built|bound |pinned copy|Error|error" | cut -c1-700 )
done
ls "$RES"
