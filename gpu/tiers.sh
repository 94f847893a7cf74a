#!/bin/bash
# GPU round for the tier stack / offloaded training (budget 250 s; killed with `timeout` after that).
# Parts (PARTS below, in order): cuda = stream/pinned tests + offload vs plain (small), check = bf16 at a real
# size, speed = 3.5B under an 8 GB cap vs in-GPU at 16k/64k tokens, capacity = plain OOM vs vbhal at >= 4.7B,
# peers = DeepSpeed ZeRO-3 offload / torchao CPUOffloadOptimizer / vbhal on one model, largest = biggest model
# the host holds. Results merge into $RES/offload-gpu.json; stdout has one table row per run.
PARTS=${TIERS_PARTS:-"cuda speed capacity peers"}
START=$(date +%s)
: "${RES:=/tmp/tiers-res}"
mkdir -p "$RES"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
left() { echo $(( 244 - ($(date +%s) - START) )); }
OUTJ="$RES/offload-gpu.json"

{ nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
  python3 -c "import torch, os; print('torch', torch.__version__, 'cpus', os.cpu_count())"
  python3 -c "import psutil; print('psutil', psutil.__version__)"
  free -g; df -h /tmp | tail -1; which g++ nvcc; } > "$RES/gpu.txt" 2>&1
cat "$RES/gpu.txt"

# Untimed warm-up in the background while the cuda tests run: compile vbhal's one-pass host AdamW once, so the
# timed parts load it from Inductor's on-disk cache (R2 lost its vbhal rows to a cold compile). Same thread count
# as the engine (it is baked into the generated kernel) and in-process compilation (no worker pool start-up).
export TORCHINDUCTOR_COMPILE_THREADS=1
NT=$(( $(nproc) - 1 ))
setsid timeout 100 python3 -c "
import time, torch
torch.set_num_threads($NT)
from vbhal.nn.offload import _make_compiled_step
t = time.time(); f = _make_compiled_step(); print('host AdamW compile:', 'ok' if f else 'failed', round(time.time() - t, 1), 's')
" > "$RES/warm.txt" 2>&1 &
WARM=$!
# DeepSpeed and its deps travel as wheels in .whl/tiers (kept out of the shared /tmp/site). Its CPU Adam JIT build
# takes over a minute here (R2), so DeepSpeed runs with torch's fused CPU AdamW on its fp32 partitions.
if [[ " $PARTS " == *" peers "* ]] && ls .whl/tiers/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site-tiers .whl/tiers/*.whl \
    > "$RES/wheels-tiers.txt" 2>&1 || echo "wheel install failed (see wheels-tiers.txt)"
fi
export VBHAL_DS_TORCH_ADAM=1
wait_warm() {  # never let the warm-up overlap a timed part
  [ -n "$WARM" ] || return
  while kill -0 "$WARM" 2>/dev/null && [ "$(left)" -gt 184 ]; do sleep 1; done
  if kill -0 "$WARM" 2>/dev/null; then kill -TERM -- "-$WARM" 2>/dev/null; echo "host AdamW warm-up stopped"; fi
  wait "$WARM" 2>/dev/null
  cat "$RES/warm.txt" | grep -v "Warning\|warn(" | tail -n 3
  # Without a warm cache the timed processes would each compile for tens of seconds: use torch's fused AdamW then.
  grep -q "compile: ok" "$RES/warm.txt" 2>/dev/null || { export VBHAL_HOST_STEP=torch; echo "host step: torch fused AdamW"; }
  WARM=""
}

run_part() {  # name, max seconds
  local T=$(( $(left) - 3 )); [ "$T" -gt "$2" ] && T=$2
  if [ "$T" -lt 20 ]; then echo "== $1 skipped (no time left) =="; return; fi
  echo "== $1 (limit $T s, $(left) s left) =="
  case $1 in
    cuda) timeout "$T" python3 tests/tiers/test_cuda.py 2>&1 | tail -n 40 ;;
    peers)
      PATH="/tmp/site-tiers/bin:$PATH" PYTHONPATH="$PYTHONPATH:/tmp/site-tiers" timeout "$T" \
        python3 benchmarks/bench_offload.py peers --blocks 6 --steps 2 --out "$OUTJ" 2>&1 \
        | grep -v "^\[\|Warning\|warn(\|^W1" | tail -n 40 ;;
    *) timeout "$T" python3 benchmarks/bench_offload.py "$1" --steps 3 --out "$OUTJ" 2>&1 \
        | grep -v "^\[\|Warning\|warn(\|^W1" | tail -n 30 ;;
  esac
}

for p in $PARTS; do
  case $p in speed|capacity|peers|largest) wait_warm ;; esac
  case $p in
    cuda) run_part cuda 25 ;;
    check) run_part check 35 ;;
    speed) run_part speed 75 ;;
    capacity) run_part capacity 70 ;;
    peers) run_part peers 120 ;;
    largest) run_part largest 70 ;;
  esac
done
echo "total $(( $(date +%s) - START )) s"
