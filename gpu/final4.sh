#!/usr/bin/env bash
# session 3 closing round: the folded kernels (fp4 mm_w32/mm_t body, attention sequence prologue) on the GPU:
# FP4 path + split-K tests, direct-launch tests, attention correctness, then the CUDA conformance report.
set -u
export PYTHONUNBUFFERED=1 VBHAL_SKIP_INTERPRET=1
RES=${RES:-/tmp/final4}; mkdir -p "$RES"
T=tests/backends/cuda/test_fp4_gpu.py
echo "== fp4 GPU tests (limit 110 s)"
timeout 110 python3 -m pytest -x -v -p no:cacheprovider -W ignore "$T::test_gpu_linear_paths" "$T::test_gpu_split_k_workspace_clean_and_graph_capture" \
  "$T::test_gpu_linear_split_k_and_fp32" "$T::test_gpu_fp4_linear_grads" tests/backends/cuda/test_fp4_launch.py > "$RES/fp4_tests.txt" 2>&1
echo "rc=$? passed=$(grep -c ' PASSED' "$RES/fp4_tests.txt") failed=$(grep -c ' FAILED' "$RES/fp4_tests.txt")"
grep -E "FAILED|Error" "$RES/fp4_tests.txt" | head -5
echo "== attention correctness (--minimal, limit 50 s)"
timeout 50 python3 -W ignore tests/backends/cuda/test_attention_gpu.py --minimal 2>&1 | tail -n 8 | tee "$RES/attn_check.txt"
echo "== conformance (limit 200 s)"
mkdir -p "$RES/core"
RES="$RES/core" timeout 200 bash gpu/core.sh > "$RES/core/log.txt" 2>&1
echo "rc=$?"; grep -E "measured checks|pytest exit" "$RES/core/cuda-h100.md"
