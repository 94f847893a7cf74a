#!/bin/bash
# GPU round for the tier stack / offloaded training (budget 300 s; killed with `timeout` after that).
# 1. correctness in bf16 at a real size (plain vs vbhal), 2. speed 3.5B under an 8 GB cap vs in-GPU,
# 3. capacity (plain OOM at >= 4.7B, vbhal trains it). Results merge into $RES/offload-<dev>.json.
START=$(date +%s)
: "${RES:=/tmp/tiers-res}"
mkdir -p "$RES"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
left() { echo $(( 292 - ($(date +%s) - START) )); }
OUTJ="$RES/offload-gpu.json"

nvidia-smi --query-gpu=name,memory.total --format=csv,noheader > "$RES/gpu.txt" 2>&1
python3 -c "import torch, os; print('torch', torch.__version__, 'cpus', os.cpu_count())" >> "$RES/gpu.txt" 2>&1
python3 -c "import psutil; print('psutil', psutil.__version__)" >> "$RES/gpu.txt" 2>&1
free -g >> "$RES/gpu.txt" 2>&1
cat "$RES/gpu.txt"

echo "== cuda tests (streams, events, pinned pool, offload vs plain) =="
timeout 45 python3 tests/tiers/test_cuda.py 2>&1 | tail -n 40

echo "== check (bf16, real size) =="
timeout 45 python3 benchmarks/bench_offload.py check --out "$OUTJ" 2>&1 | tail -n 30

echo "== speed (3.5B, 16k and 64k tokens) == left $(left)"
T=$(( $(left) - 70 )); [ "$T" -gt 130 ] && T=130
timeout "$T" python3 benchmarks/bench_offload.py speed --steps 3 --out "$OUTJ" 2>&1 | tail -n 30

echo "== capacity (8 GB cap) == left $(left)"
T=$(( $(left) - 3 ))
[ "$T" -gt 30 ] && timeout "$T" python3 benchmarks/bench_offload.py capacity --steps 2 --out "$OUTJ" 2>&1 | tail -n 30
echo "total $(( $(date +%s) - START )) s"
