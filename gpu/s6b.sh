#!/usr/bin/env bash
set -u
export PYTHONUNBUFFERED=1 VBHAL_SKIP_INTERPRET=1
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
RES=${RES:-/tmp/s6b}; mkdir -p "$RES"
T=tests/backends/cuda/test_fp4_gpu.py
timeout 60 python3 gpu/packed_nv_debug.py 2>&1 | tail -25
timeout 330 python3 -m pytest -q -p no:cacheprovider -W ignore -x "$T" --deselect "$T::test_gpu_packed_decode_bit_exact[nvfp4]" > "$RES/tests_all.txt" 2>&1
echo "all GPU fp4 tests rc=$? $(tail -1 "$RES/tests_all.txt")"
grep -E "^FAILED|^E  " "$RES/tests_all.txt" | head -12
