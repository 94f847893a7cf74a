#!/usr/bin/env bash
# session 4: the CUDA hybrid offload test on the folded reference, then the whole FP4 round (correctness first,
# then the benchmark on the final code: split-K finalize as torch ops, the tidied direct launcher)
set -u
export PYTHONUNBUFFERED=1 VBHAL_SKIP_INTERPRET=1
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
RES=${RES:-/tmp/s4fp4}; mkdir -p "$RES"
timeout 90 python3 tests/nn/test_offload_hybrid.py 2>&1 | grep -v "Warn\|warn(" | tail -n 4
RES="$RES" FP4CUDA_BUDGET=${FP4CUDA_BUDGET:-400} bash gpu/fp4cuda.sh
