#!/usr/bin/env bash
# GPU round script of the `train` feature (vbhal/train). Run from the repo root with RES set.
# Budget (final round): 100 s, hard-killed. Stages, most important first, each under its own timeout:
# 1) benchmark, medium preset, bf16, torch.compile: plain PyTorch loop vs the `vbhal train` loop (SDPA
#    default order) vs `vbhal train --sdpa-backend cudnn` -> table + JSON (written after every peer);
# 2) bf16 correctness at real sizes (tests/train/test_gpu.py);
# 3) the CLI on the GPU (small preset) if time is left: log, metrics, loss curve into $RES.
set -u
RES=${RES:-/tmp/train_res}
BUDGET=${TRAIN_BUDGET:-100}
mkdir -p "$RES"
export PYTHONUNBUFFERED=1 VBHAL_CACHE_DIR=/tmp/vbhal_cache
T0=$(date +%s)
el() { echo "[train.sh] +$(( $(date +%s) - T0 ))s $*"; }
left() { echo $(( BUDGET - 4 - ($(date +%s) - T0) )); }

el "benchmark"
timeout --kill-after=2 82 python3 benchmarks/bench_train.py --preset "${TRAIN_PRESET:-medium}" --steps 30 --warmup 10 ${TRAIN_BENCH_ARGS:-} \
  --peers pytorch,vbhal-train,vbhal-train-cudnn --out "$RES" 2>&1 \
  | grep -v "^saved checkpoint\|TensorFloat\|attn_fn -> \|UserWarning\|warn_once\|This call originates\|^ *File \|^\s*$\|device_name=\|table = load" \
  | tail -n 30
# the table again from the JSON (also when the benchmark was cut short)
python3 - "$RES" <<'PY'
import glob, json, sys
for f in glob.glob(sys.argv[1] + "/train-*.json"):
    d = json.load(open(f)); base = d["results"].get("pytorch", {}).get("tokens_per_s")
    print(f"{d['device']}  {d['preset']} micro-batch {d['batch_size']} {d['precision']} compile={d['compile']}")
    for k, r in d["results"].items():
        if r.get("status") != "ok": print(f"  {k:<18} {r.get('status')}"); continue
        mfu = f"{r['mfu']:.1%}" if r.get("mfu") is not None else "-"
        rel = f"{r['tokens_per_s'] / base:.2f}x" if base else "-"
        print(f"  {k:<18} {r['tokens_per_s']:>10,.0f} tok/s  MFU {mfu:>6}  {rel} vs pytorch")
PY
T=$(left); [ "$T" -gt 20 ] && T=20
if [ "$T" -gt 8 ]; then
  el "bf16 correctness tests (timeout ${T}s)"
  timeout --kill-after=2 "$T" python3 -m pytest -q -x -p no:cacheprovider -W ignore tests/train/test_gpu.py 2>&1 | tail -n 8
fi
T=$(left)
if [ "$T" -gt 10 ]; then
  el "CLI smoke run (timeout ${T}s)"
  rm -rf /tmp/tr_small
  timeout --kill-after=2 "$T" python3 -m vbhal.train --config small --max-steps 40 --warmup-steps 5 --val-interval 20 \
    --output-dir /tmp/tr_small --no-progress --log-interval 10 2>&1 | tail -n 6
  cp /tmp/tr_small/metrics.jsonl /tmp/tr_small/loss_curve.png /tmp/tr_small/training_*.log "$RES"/ 2>/dev/null
fi
el "done"
