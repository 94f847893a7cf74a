#!/usr/bin/env bash
# GPU round script of the `train` feature (vbhal/train). Run from the repo root with RES set; budget 150 s.
# 1) benchmark: medium preset, bf16, torch.compile: plain PyTorch loop vs `vbhal train` loop (SDPA) vs
#    `vbhal train --use-flash-attn` -> table + benchmarks JSON (copied into $RES);
# 2) correctness at real sizes in bf16 (tests/train/test_gpu.py);
# 3) the CLI itself on the GPU (small preset, 60 steps): log, metrics and loss curve into $RES.
set -u
RES=${RES:-/tmp/train_res}
mkdir -p "$RES"
export PYTHONUNBUFFERED=1 VBHAL_CACHE_DIR=/tmp/vbhal_cache
T0=$(date +%s)
el() { echo "[train.sh] +$(( $(date +%s) - T0 ))s $*"; }
python3 -c "import torch;print('torch',torch.__version__,torch.cuda.get_device_name(0))"

el "benchmark"
timeout --kill-after=3 92 python3 benchmarks/bench_train.py --preset medium --steps 30 --warmup 10 \
  --out "$RES" 2>&1 | grep -v "^saved checkpoint\|Warning: TensorFloat" | tail -n 40
el "bf16 correctness tests"
timeout --kill-after=3 30 python3 -m pytest -q -x -p no:cacheprovider tests/train/test_gpu.py 2>&1 | tail -n 15
el "CLI smoke run"
rm -rf /tmp/tr_small
timeout --kill-after=3 22 python3 -m vbhal.train --config small --max-steps 60 --val-interval 30 \
  --output-dir /tmp/tr_small --no-progress --log-interval 10 2>&1 | tail -n 12
cp /tmp/tr_small/metrics.jsonl /tmp/tr_small/loss_curve.png /tmp/tr_small/training_*.log "$RES"/ 2>/dev/null
el "done"
