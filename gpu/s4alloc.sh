#!/usr/bin/env bash
# session 4 diagnostic: does the caching allocator's behaviour under the 8 GB cap (retries, cudaMalloc churn)
# explain the device-compute gap (1.17 s at 8 GB vs 0.67 s at 24 GB in s4caps)? Same engine, 16k tokens, 8 GB,
# no keep plan: (A) expandable segments (the bench's default), (B) + garbage_collection_threshold:0.8.
set -u
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" TORCHINDUCTOR_COMPILE_THREADS=1
RES=${RES:-/tmp/s4alloc}; mkdir -p "$RES"
for conf in "expandable_segments:True" "expandable_segments:True,garbage_collection_threshold:0.8"; do
  echo "== PYTORCH_CUDA_ALLOC_CONF=$conf"
  PYTORCH_CUDA_ALLOC_CONF="$conf" VBHAL_HOST_STEP=torch VBHAL_HOST_STEP_CHUNK=4194304 VBHAL_BENCH_KEEP_BYTES=0 \
    timeout 110 python3 benchmarks/bench_offload.py speed --steps 3 --tokens 16384 --host-only-tokens "" \
    --out "$RES/offload-alloc-$(echo "$conf" | tr ':,' '__').json" 2>&1 | grep -E "status=|device:" | cut -c1-330
done
