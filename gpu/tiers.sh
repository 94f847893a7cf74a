#!/bin/bash
# GPU round for offloaded training (budget 240 s, hard; every part under `timeout`, the rest skipped).
# Parts (TIERS_PARTS, in order):
#   hybrid   = tests/nn/test_offload_hybrid.py as a script (short): half the units' AdamW on the GPU (state
#              streamed) vs in-GPU training, 30 steps, losses within 2e-3; then the same engine with the keep plan
#              (copies kept on the device) must give bit-identical losses (PASS/FAIL lines).
#   speed    = 3.49B stack of MLP blocks under an 8 GB cap vs in-GPU at 16k and 64k tokens: vbhal rows with the
#              auto share (TIERS_GPU_STEP=0.3 etc. fixes it) at 16k and 64k, then every AdamW on the host at 16k.
#              Each row plans again (share + keep plan) and warms up until that settled (+1 step), 3 timed steps.
#              Host step: torch fused in pieces of VBHAL_HOST_STEP_CHUNK (default 4M: fastest in round 4).
#   peers    = vbhal vs DeepSpeed ZeRO-3 offload vs torchao at 0.81B.
#   hoststep = host AdamW variants at 0.5B params (s per 1e9 params), only if time is left.
#   largest  = the largest model the whole machine trains (GPU + RAM + disk tier), per-step times and disk traffic;
#              TIERS_LARGEST_S seconds (default 70), TIERS_BUDGET the whole script's (default 237).
#   cuda / capacity / check: as before, not in the default plan.
# JSON: $RES/offload-gpu.json (speed, peers, hoststep); the compact table is printed last.
PARTS=${TIERS_PARTS:-"hybrid speed peers hoststep"}
START=$(date +%s)
: "${RES:=/tmp/tiers-res}"
mkdir -p "$RES"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
left() { echo $(( ${TIERS_BUDGET:-237} - ($(date +%s) - START) )); }
OUTJ="$RES/offload-gpu.json"

{ nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
  python3 -c "import torch, os; print('torch', torch.__version__, 'cpus', os.cpu_count())"
  free -g; which g++; } > "$RES/gpu.txt" 2>&1
cat "$RES/gpu.txt"
# In-process Inductor compile (no worker pool start-up); the engine compiles with the same thread count.
export TORCHINDUCTOR_COMPILE_THREADS=1
# DeepSpeed and its deps travel as wheels in .whl/tiers (kept out of the shared /tmp/site); install in the background.
if [[ " $PARTS " == *" peers "* ]] && ls .whl/tiers/*.whl >/dev/null 2>&1; then
  ( python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site-tiers .whl/tiers/*.whl \
    > "$RES/wheels-tiers.txt" 2>&1 || echo "wheel install failed" >> "$RES/wheels-tiers.txt" ) &
fi
export VBHAL_DS_TORCH_ADAM=1  # DeepSpeed's CPU Adam JIT build takes over a minute: torch fused CPU AdamW there

run_part() {  # name, max seconds
  local T=$(( $(left) - 2 )); [ "$T" -gt "$2" ] && T=$2
  if [ "$T" -lt 20 ]; then echo "== $1 skipped (no time left) =="; return; fi
  echo "== $1 (limit $T s, $(left) s left) =="
  case $1 in
    cuda) timeout "$T" python3 tests/tiers/test_cuda.py 2>&1 | tail -n 40 ;;
    peers)
      wait  # the wheel install
      PATH="/tmp/site-tiers/bin:$PATH" PYTHONPATH="$PYTHONPATH:/tmp/site-tiers" timeout "$T" \
        python3 benchmarks/bench_offload.py peers --blocks 6 --steps 3 --out "$OUTJ" 2>&1 \
        | grep -v "^\[\|Warning\|warn(\|^W1\|^  \"\"\"\|^Failed to load" | tail -n 40 ;;
    largest) timeout "$T" python3 benchmarks/bench_offload.py largest --steps 4 --deadline-s $(( T - 40 )) --out "$OUTJ" 2>&1 \
        | grep -v "^\[\|Warning\|warn(\|^W1" | tail -n 20 ;;
    hoststep) timeout "$T" python3 benchmarks/bench_offload.py hoststep --hoststep-params 500000000 --out "$OUTJ" 2>&1 \
        | grep -v "Warning\|warn(" | tail -n 12 ;;
    hybrid) timeout "$T" python3 tests/nn/test_offload_hybrid.py 2>&1 | grep -v "Warning\|warn(" | tail -n 6 ;;
    speed) timeout "$T" python3 benchmarks/bench_offload.py speed --steps 3 --gpu-step "${TIERS_GPU_STEP:-auto}" \
        --host-only-tokens "${TIERS_HOST_ONLY_TOKENS-16384}" --chunk-tokens "${TIERS_CHUNK_TOKENS:-8192}" --out "$OUTJ" 2>&1 \
        | grep -v "^\[\|Warning\|warn(\|^W1" | tail -n 40 ;;
    *) timeout "$T" python3 benchmarks/bench_offload.py "$1" --steps 3 --out "$OUTJ" 2>&1 \
        | grep -v "^\[\|Warning\|warn(\|^W1" | tail -n 30 ;;
  esac
}

pick_host_step() {  # the fastest host step of a hoststep part run earlier (engine variants only), else torch 4M pieces
  eval "$(python3 - "$OUTJ" <<'PY'
import json, sys
try:
    rows = json.load(open(sys.argv[1]))["hoststep"]["rows"]
except Exception:
    rows = []
ok = [r for r in rows if "s_per_Bparams" in r and ("pieces" in r["variant"] or "compiled" in r["variant"])]
best = min(ok, key=lambda r: r["s_per_Bparams"]) if ok else {"variant": "pieces", "chunk": 1 << 22}
step = "compiled" if "compiled" in best["variant"] else "torch"
print(f"export VBHAL_HOST_STEP={step} VBHAL_HOST_STEP_CHUNK={best.get('chunk', 1 << 22)}")
PY
)"
  echo "host step for the timed parts: $VBHAL_HOST_STEP (pieces of $VBHAL_HOST_STEP_CHUNK)"
}

for p in $PARTS; do
  case $p in speed|capacity|peers|largest) [ -n "$VBHAL_HOST_STEP" ] || pick_host_step ;; esac
  case $p in
    hoststep) run_part hoststep 40 ;;
    hybrid) run_part hybrid 25 ;;
    cuda) run_part cuda 25 ;;
    check) run_part check 35 ;;
    speed) run_part speed 125 ;;
    capacity) run_part capacity ${TIERS_CAPACITY_S:-70} ;;
    peers) run_part peers 70 ;;
    largest) run_part largest ${TIERS_LARGEST_S:-70} ;;
  esac
done

echo "== table =="
python3 - "$OUTJ" <<'PY'
import json, sys
try:
    d = json.load(open(sys.argv[1]))
except Exception as e:
    sys.exit(f"no results: {e}")
for r in d.get("hoststep", {}).get("rows", []):
    print(f"host step  {r['variant']:40s} {r.get('s_per_Bparams', float('nan')):6.3f} s/1e9 params "
          f"{r.get('status', '')}{' pcie %.1f GB/s each way' % r['pcie_GBps_each_way'] if 'pcie_GBps_each_way' in r else ''}")
rows = d.get("speed", {}).get("rows", [])
for r in rows:
    base = next((b for b in rows if b["peer"].startswith("pytorch") and b["tokens"] == r["tokens"] and b.get("step_s")), None)
    ratio = r["step_s"] / base["step_s"] if base and r.get("step_s") and r is not base else None
    print(f"speed      {r['peer']:22s} {r['params']/1e9:5.2f}B {r['tokens']:6d} tok  step {r.get('step_s', float('nan')):6.3f} s"
          f"  ratio {'-' if ratio is None else f'{ratio:.2f}x':6s} hostAdamW {r.get('host_adamw_s_per_step', 0):.3f} s"
          f"  gpuAdamW {r.get('gpu_adamw_s_per_step', 0):.3f} s  gpuFrac {r.get('gpu_step_fraction', 0):.2f}"
          f"  stall {r.get('stall_s_per_step', 0):.3f} s  h2d {r.get('h2d_GBps', 0):.1f} d2h {r.get('d2h_GBps', 0):.1f} GB/s"
          f"  {r.get('host_step', '')} {r.get('status')}")
    if r.get("gpu_step_auto"):
        print(f"           auto: {json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in r['gpu_step_auto'].items()})}")
    if "dev_compute_s" in r:
        print(f"           device: compute {r['dev_compute_s']:.3f} s (fwd {r['dev_fwd_s']:.3f} bwd {r['dev_bwd_s']:.3f})"
              f"  waitW {r['dev_wait_w_s']:.3f}  waitAct {r['dev_wait_act_s']:.3f}  idle {r['dev_idle_s']:.3f}"
              f"  span {r['dev_span_s']:.3f} s  allocRetries {r.get('alloc_retries', 0):.1f}  chunks {r.get('chunks')}"
              f"  warmup {r.get('warmup_steps')}  peak {r.get('peak_gpu_bytes', 0) / 1e9:.2f} GB")
    if r.get("GB_by_kind"):
        kp = r.get("keep_plan") or {}
        print("           GB/step: " + " ".join(f"{k} {v:.2f}" for k, v in r["GB_by_kind"].items() if v)
              + f"  | keep: budget {kp.get('budget_bytes', 0) / 1e9:.2f} GB all {kp.get('all')} acts {len(kp.get('acts') or [])}"
              f" fb {len(kp.get('fb') or [])} used {kp.get('used_bytes', 0) / 1e9:.2f} GB ({kp.get('source')})")
lg = d.get("largest", {})
if lg.get("plan"):
    p = lg["plan"]
    print(f"largest    {p['blocks']} blocks = {p['params'] / 1e9:.2f}B params, state in RAM {p['state_budget_bytes'] / 1e9:.1f} GB, "
          f"on disk {p['state_on_disk_bytes'] / 1e9:.1f} GB; build {lg.get('build_s', float('nan')):.1f} s; {lg.get('status')}")
for r in lg.get("rows", []):
    print(f"largest    step {r['step']}: {r['step_s']:.1f} s loss {r['loss']:.4f} disk read {r.get('disk_read_GB', 0):.1f} GB "
          f"write {r.get('disk_write_GB', 0):.1f} GB ({r.get('disk_GBps', 0):.2f} GB/s) stall {r.get('state_stall_s', 0):.1f} s")
for r in d.get("peers", {}).get("rows", []):
    print(f"peers      {r['peer']:30s} {r.get('params', 0)/1e9:5.2f}B step {r.get('step_s', float('nan')):6.3f} s "
          f"vbhal speedup {r.get('vbhal_speedup', float('nan')):.2f}x {r.get('status')}")
PY
echo "total $(( $(date +%s) - START )) s"
