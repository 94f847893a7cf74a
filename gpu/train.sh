#!/usr/bin/env bash
# GPU round script of the `train` feature (vbhal/train). Run from the repo root with RES set.
# Budget (final round R3): 100 s, hard-killed. Stages, each under its own timeout:
# 1) bf16 correctness at real size (medium): fp32 vs bf16 with the default SDPA and with cuDNN attention,
#    gradient checkpointing (tests/train/test_gpu.py; R1 ran the whole file: 5 passed);
# 2) benchmark, medium preset, micro-batch 32, bf16, torch.compile: plain PyTorch loop vs
#    `vbhal train --sdpa-backend cudnn` vs `vbhal train` (R2 measured the last two side by side: 1.00x)
#    -> table + JSON (written after every peer, so a cut keeps what was measured).
set -u
RES=${RES:-/tmp/train_res}
BUDGET=${TRAIN_BUDGET:-100}
mkdir -p "$RES"
export PYTHONUNBUFFERED=1 VBHAL_CACHE_DIR=/tmp/vbhal_cache
T0=$(date +%s)
el() { echo "[train.sh] +$(( $(date +%s) - T0 ))s $*"; }
left() { echo $(( BUDGET - 3 - ($(date +%s) - T0) )); }

el "bf16 correctness tests"
timeout --kill-after=2 19 python3 -m pytest -q -p no:cacheprovider -W ignore tests/train/test_gpu.py \
  -k "bf16_autocast or cudnn or checkpointing" 2>&1 | tail -n 6

T=$(left)
el "benchmark (timeout ${T}s)"
timeout --kill-after=2 "$T" python3 benchmarks/bench_train.py --preset "${TRAIN_PRESET:-medium}" --steps 30 --warmup 10 \
  --peers pytorch,vbhal-train-cudnn,vbhal-train ${TRAIN_BENCH_ARGS:-} --out "$RES" 2>&1 \
  | grep -v "^saved checkpoint\|TensorFloat\|attn_fn -> \|UserWarning\|warn_once\|This call originates\|^ *File \|^\s*$\|device_name=\|table = load\|^ *\^\|^  *[a-z_.]* = \|_shutdown_workers\|w.join\|self._popen\|if not wait\|ready = selector\|fd_event_list\|_error_if_any" \
  | tail -n 24
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
el "done"
