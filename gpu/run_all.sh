#!/usr/bin/env bash
# Runs every gpu/<feature>.sh on the GPU machine, each under its own time limit, and packs the results into
# one archive under $OUT (the device tool returns at most 8 files). Usage: bash gpu/run_all.sh "feat:secs ..."
set -u
export PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
ROOT=$(pwd)
RESROOT=/tmp/gpu_results
mkdir -p "$RESROOT"
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    > "$RESROOT/wheels.txt" 2>&1 && export PYTHONPATH=/tmp/site
fi
python3 -m pip install -q --no-deps --no-build-isolation -e . > "$RESROOT/install.txt" 2>&1 || \
  export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$RESROOT/gpu.txt" 2>&1
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" >> "$RESROOT/gpu.txt" 2>&1
DEADLINE=$(( $(date +%s) + ${2:-560} ))  # the whole call must end inside the device tool's 600 s
for spec in ${1:-}; do
  feat=${spec%%:*}; secs=${spec##*:}
  left=$(( DEADLINE - $(date +%s) ))
  [ "$secs" -gt "$left" ] && secs=$left
  [ "$secs" -lt 20 ] && { echo "$feat skipped: no time left" | tee -a "$RESROOT/summary.txt"; continue; }
  [ -f "gpu/$feat.sh" ] || { echo "no gpu/$feat.sh" > "$RESROOT/$feat.missing"; continue; }
  mkdir -p "$RESROOT/$feat"
  start=$(date +%s)
  RES="$RESROOT/$feat" timeout --kill-after=5 "$secs" bash "gpu/$feat.sh" > "$RESROOT/$feat/log.txt" 2>&1
  rc=$?
  echo "$feat rc=$rc seconds=$(( $(date +%s) - start ))" | tee -a "$RESROOT/summary.txt"
  tail -n 25 "$RESROOT/$feat/log.txt"
  tar czf "$OUT/results.tgz" -C "$RESROOT" .   # after each feature: a later kill still returns what ran
done
tar czf "$OUT/results.tgz" -C "$RESROOT" .
ls -la "$OUT"
