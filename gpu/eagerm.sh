#!/usr/bin/env bash
set -u
export PYTHONUNBUFFERED=1 VBHAL_SKIP_INTERPRET=1
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
timeout 200 python3 gpu/eager_m.py 2>&1 | grep -v "^$" | head -80
