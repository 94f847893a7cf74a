#!/bin/bash
# GPU round for the tier stack / offloaded training (budget 200 s; killed with `timeout` after that).
# Parts (PARTS below, in order): cuda = stream/pinned tests + offload vs plain (small), check = bf16 at a real
# size, speed = 3.5B under an 8 GB cap vs in-GPU at 16k/64k tokens, capacity = plain OOM vs vbhal at >= 4.7B,
# peers = DeepSpeed ZeRO-3 offload / torchao CPUOffloadOptimizer / vbhal on one model, largest = biggest model
# the host holds. Results merge into $RES/offload-gpu.json; stdout has one table row per run.
PARTS=${TIERS_PARTS:-"cuda check speed capacity peers"}
START=$(date +%s)
: "${RES:=/tmp/tiers-res}"
mkdir -p "$RES"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
left() { echo $(( 194 - ($(date +%s) - START) )); }
OUTJ="$RES/offload-gpu.json"

{ nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
  python3 -c "import torch, os; print('torch', torch.__version__, 'cpus', os.cpu_count())"
  python3 -c "import psutil; print('psutil', psutil.__version__)"
  free -g; df -h /tmp | tail -1; which g++ nvcc; } > "$RES/gpu.txt" 2>&1
cat "$RES/gpu.txt"

# DeepSpeed and its deps travel as wheels in .whl/tiers (kept out of the shared /tmp/site). Its CPU Adam is JIT-built
# in the background while the untimed parts (cuda tests, check) run, and waited for before the timed ones.
DSBUILD=""
if [[ " $PARTS " == *" peers "* ]] && ls .whl/tiers/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site-tiers .whl/tiers/*.whl \
    > "$RES/wheels-tiers.txt" 2>&1 || echo "wheel install failed (see wheels-tiers.txt)"
  # its own process group (setsid), so that stopping it also stops ninja and the compilers it started
  PATH="/tmp/site-tiers/bin:$PATH" PYTHONPATH="$PYTHONPATH:/tmp/site-tiers" setsid nice -n 10 timeout 60 \
    python3 benchmarks/bench_offload.py dsbuild --out "$RES/dsbuild.json" > "$RES/dsbuild.txt" 2>&1 &
  DSBUILD=$!
fi
wait_dsbuild() {  # never let the build overlap a timed part
  [ -n "$DSBUILD" ] || return
  local n=0
  while kill -0 "$DSBUILD" 2>/dev/null && [ $n -lt 15 ]; do sleep 1; n=$((n + 1)); done
  if kill -0 "$DSBUILD" 2>/dev/null; then
    kill -TERM -- "-$DSBUILD" 2>/dev/null
    echo "DeepSpeed CPU Adam build stopped (still running before a timed part)"
  fi
  wait "$DSBUILD" 2>/dev/null
  grep -h "DeepSpeedCPUAdam build" "$RES/dsbuild.txt" 2>/dev/null
  # Without a finished build, DeepSpeed runs with torch's AdamW on its CPU partitions (said in its row).
  grep -q "DeepSpeedCPUAdam build: {'status': 'ok'" "$RES/dsbuild.txt" 2>/dev/null || export VBHAL_DS_TORCH_ADAM=1
  DSBUILD=""
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
  case $p in speed|capacity|peers|largest) wait_dsbuild ;; esac
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
