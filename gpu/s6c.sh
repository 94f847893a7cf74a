#!/usr/bin/env bash
set -u
export PYTHONUNBUFFERED=1 VBHAL_SKIP_INTERPRET=1
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
RES=${RES:-/tmp/s6c}; mkdir -p "$RES"
T=tests/backends/cuda/test_fp4_gpu.py
timeout 330 python3 -m pytest -q -p no:cacheprovider -W ignore "$T::test_gpu_packed_decode_bit_exact" \
  "$T::test_gpu_quantize_dequantize_bit_exact" "$T::test_gpu_linear_paths" "$T::test_gpu_split_k_real_size_repeated_and_graph" \
  -k "packed or bit_exact or p16 or pt64 or pt128 or auto or mm_p" > "$RES/tests.txt" 2>&1
echo "new-kernel GPU tests rc=$? $(tail -1 "$RES/tests.txt")"
grep -E "^FAILED|^E  " "$RES/tests.txt" | head -12
