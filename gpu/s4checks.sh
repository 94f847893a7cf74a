#!/usr/bin/env bash
# session 4: the direct-launch test (launcher tidied after the last GPU run), then what the machine's disk and RAM
# give the offload engine's disk tier (sizes the `largest` part): free space per mount, sequential write/read.
set -u
export PYTHONUNBUFFERED=1 VBHAL_SKIP_INTERPRET=1
RES=${RES:-/tmp/s4checks}; mkdir -p "$RES"
echo "== tests/backends/cuda/test_fp4_launch.py"
timeout 120 python3 -m pytest -q -p no:cacheprovider -W ignore tests/backends/cuda/test_fp4_launch.py > "$RES/launch.txt" 2>&1
echo "rc=$?"; tail -5 "$RES/launch.txt"
echo "== disk and RAM"
free -g; df -h / /tmp /dev/shm "$PWD" 2>/dev/null; nproc
python3 -c "from vbhal._sysinfo import disk_free, host_memory_available, spill_root; print('spill_root', spill_root(), 'free', disk_free()/1e9, 'GB; ram avail', host_memory_available()/1e9, 'GB')"
D=$(python3 -c "from vbhal._sysinfo import spill_root; import os; p=spill_root(); os.makedirs(p, exist_ok=True); print(p)")
echo "write 4 GiB to $D"; sync
dd if=/dev/zero of="$D/ddtest" bs=16M count=256 oflag=direct 2>&1 | tail -1
dd if=/dev/zero of="$D/ddtest2" bs=16M count=256 conv=fdatasync 2>&1 | tail -1
echo "read (direct)"; dd if="$D/ddtest" of=/dev/null bs=16M iflag=direct 2>&1 | tail -1
rm -f "$D/ddtest" "$D/ddtest2"
