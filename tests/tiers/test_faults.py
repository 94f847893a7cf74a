"""Faults: disk full during demotion, corrupted spill files, pinning failure, a killed process, stress."""

from __future__ import annotations

import errno
import os
import random
import signal
import subprocess
import sys
import textwrap
import threading
import time

import pytest
import torch

from vbhal.errors import TierError
from vbhal.tiers import SpillCorruptionError, Tier, TierStack, TierWarning, sweep_stale
from vbhal.tiers.spill import spill_base

KB4 = 4096


def _val(i: int) -> torch.Tensor:
    return torch.randn(1024, generator=torch.Generator().manual_seed(1000 + i))


def _stack(tmp_path, *, dev=2, host=2, disk=1 << 20, host_hard=None, **kw):
    tiers = [
        Tier("dev", 0, torch.device("cpu"), dev * KB4),
        Tier("host", 1, torch.device("cpu"), host * KB4, kind="host", hard_limit_bytes=host_hard),
        Tier("disk", 2, torch.device("cpu"), disk, kind="disk"),
    ]
    return TierStack(tiers, spill_root=tmp_path, **kw)


# ------------------------------------------------------------------------------------------------ disk full
def test_disk_full_keeps_tensor_warns_and_goes_on_within_memory(tmp_path):
    st = _stack(tmp_path, host_hard=4 * KB4)

    def enospc(op, key):
        raise OSError(errno.ENOSPC, "No space left on device (injected)")

    st.disk_fault_hook = enospc
    for i in range(4):
        st.register(i, _val(i))  # 2 on level 0, 2 on level 1
    with pytest.warns(TierWarning, match="could not demote .* stays on level 1"):
        st.register(4, _val(4), level=0)  # demotion cascade: level 1 is full and the disk refuses
    assert [st.level_of(i) for i in range(5)].count(2) == 0
    assert st.used_bytes(1) == 3 * KB4 > st.tiers[1].capacity_bytes
    assert st.stats.levels[1].failed_demotions >= 1
    for i in range(5):  # training goes on: every value is intact
        assert torch.equal(st.access(i), _val(i))
    st.check_consistency()
    with pytest.warns(TierWarning, match="could not place 5 .* stays on level 1"):
        st.register(5, _val(5))  # straight to disk refused too: host at its hard limit (4 tensors) now
    assert st.used_bytes(1) == 4 * KB4
    with pytest.warns(TierWarning), pytest.raises(TierError, match="free disk space"):
        st.register(6, _val(6))
    with pytest.warns(TierWarning), pytest.raises(TierError, match="free disk space"):
        st.register(7, _val(7), level=0)
    for i in range(6):
        assert torch.equal(st.access(i), _val(i))  # nothing lost, even after the error
    st.check_consistency()
    st.close()


def test_disk_quota_is_disk_full(tmp_path):
    st = _stack(tmp_path, dev=1, host=1, disk=KB4, host_hard=3 * KB4)
    st.register("a", _val(0))
    st.register("b", _val(1))
    st.register("c", _val(2))  # fills the one-tensor disk quota
    assert st.level_of("c") == 2 or st.level_of("b") == 2
    with pytest.warns(TierWarning, match="quota"):
        st.register("d", _val(3))
    for k, i in zip("abcd", range(4)):
        assert torch.equal(st.access(k), _val(i))
    st.close()


# ------------------------------------------------------------------------------------------------ corruption
@pytest.mark.parametrize("damage", ["flip_payload", "truncate", "bad_magic", "delete"])
def test_corrupted_spill_file_raises_naming_the_tensor(tmp_path, damage):
    st = _stack(tmp_path)
    st.register("layer3.weight", _val(3), level=2)
    path = st._entries["layer3.weight"].path
    data = bytearray(path.read_bytes())
    if damage == "flip_payload":
        data[-100] ^= 0x01  # one bit in the payload
        path.write_bytes(bytes(data))
    elif damage == "truncate":
        path.write_bytes(bytes(data[:-10]))
    elif damage == "bad_magic":
        data[0] ^= 0xFF
        path.write_bytes(bytes(data))
    else:
        path.unlink()
    with pytest.raises(SpillCorruptionError, match="layer3.weight"):
        st.access("layer3.weight")
    st.close()


@pytest.mark.parametrize("damage", ["none", "first_piece", "last_piece", "truncate_mid", "truncate_at_piece",
                                    "header_crc"])
def test_spill_checksum_beside_the_io_in_pieces(tmp_path, monkeypatch, damage):
    # Payloads larger than one piece are checksummed on a helper thread while they are written (the header's CRC
    # is filled in afterwards) and read (piece by piece behind the reads): every piece must still be covered.
    from vbhal.tiers import spill

    monkeypatch.setattr(spill, "_CRC_PIECE", 4096)
    t = torch.randn(10_000)  # 40000 bytes: 10 pieces, the last one partial
    path = tmp_path / "x.spill"
    spill.write_spill(path, "blk.w", t)
    data = bytearray(path.read_bytes())
    start = len(data) - t.numel() * 4
    if damage == "first_piece":
        data[start + 5] ^= 0x10
    elif damage == "last_piece":
        data[-1] ^= 0x01
    elif damage == "truncate_mid":
        data = data[: start + 4096 * 3 + 100]
    elif damage == "truncate_at_piece":
        data = data[: start + 4096 * 4]
    elif damage == "header_crc":
        i = data.index(b'"crc32": "') + len(b'"crc32": "')
        data[i] = ord("0") if data[i] != ord("0") else ord("1")
    path.write_bytes(bytes(data))
    if damage == "none":
        assert torch.equal(spill.read_spill(path, "blk.w", tuple(t.shape), t.dtype), t)
        return
    with pytest.raises(SpillCorruptionError, match="blk.w"):
        spill.read_spill(path, "blk.w", tuple(t.shape), t.dtype)


def test_spill_write_that_fails_leaves_no_file_and_the_pool_works_after_fork(tmp_path, monkeypatch):
    from vbhal.tiers import spill

    monkeypatch.setattr(spill, "_CRC_PIECE", 4096)
    t = torch.randn(10_000)

    def full(op, key):
        raise OSError(28, "No space left on device")

    with pytest.raises(TierError, match="disk tier"):
        spill.write_spill(tmp_path / "a.spill", "a", t, fault_hook=full)
    assert list(tmp_path.iterdir()) == []  # no partial or temporary file
    spill.write_spill(tmp_path / "b.spill", "b", t)  # the helper pool is running in this process now
    if not hasattr(os, "fork"):
        return
    pid = os.fork()
    if pid == 0:  # child: the parent's pool threads do not exist here; a read must not wait for them
        signal.alarm(30)
        ok = torch.equal(spill.read_spill(tmp_path / "b.spill", "b", tuple(t.shape), t.dtype), t)
        os._exit(0 if ok else 1)
    _, status = os.waitpid(pid, 0)
    assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0, status


def test_spill_file_header_mismatch_is_corruption(tmp_path):
    st = _stack(tmp_path)
    st.register("a", _val(0), level=2)
    st.register("b", _val(1), level=2)
    pa, pb = st._entries["a"].path, st._entries["b"].path
    pa.write_bytes(pb.read_bytes())  # a valid file, but of another tensor
    with pytest.raises(SpillCorruptionError, match="header says 'b'"):
        st.access("a")
    st.close()


# ------------------------------------------------------------------------------------------------ pinning
def test_pinned_host_tier_falls_back_to_pageable_when_pinning_fails(tmp_path):
    def refuse(n):
        raise RuntimeError("cannot pin: RLIMIT_MEMLOCK (simulated)")

    tiers = [Tier("dev", 0, torch.device("cpu"), KB4), Tier("pinned host", 1, torch.device("cpu"), 8 * KB4, kind="host", pinned=True)]
    st = TierStack(tiers, pin_fn=refuse)
    st.register("a", _val(0))  # level 0: no host memory needed yet
    with pytest.warns(TierWarning, match="pageable"):
        st.register("b", _val(1))  # level 1: the pool pins its first chunk, which fails
    assert st.level_of("b") == 1 and "RLIMIT_MEMLOCK" in st.pool.fallback_reason
    assert torch.equal(st.access("b"), _val(1))
    st.close()


# ------------------------------------------------------------------------------------------------ killed process
def test_killed_process_spill_dir_is_swept_at_next_start(tmp_path):
    code = textwrap.dedent(
        f"""
        import sys, time, torch
        from vbhal.tiers import TierStack
        st = TierStack.for_device("cpu", device_bytes=4096, host_bytes=4096, spill_root={str(tmp_path)!r})
        for i in range(4):
            st.register(i, torch.randn(1024))
        assert st.level_of(3) == 2
        print(st.spill.path, flush=True)
        time.sleep(60)
        """
    )
    env = dict(os.environ, PYTHONPATH=os.getcwd())
    p = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True, env=env)
    try:
        line = p.stdout.readline().strip()
        assert line, "child did not start"
        child_dir = __import__("pathlib").Path(line)
        assert child_dir.exists() and any(child_dir.iterdir())
        os.kill(p.pid, signal.SIGKILL)  # mid-run: no atexit, no finalizer
        p.wait(timeout=30)
    finally:
        if p.poll() is None:
            p.kill()
    assert child_dir.exists()  # left behind by the killed process
    st = TierStack.for_device("cpu", device_bytes=4096, host_bytes=4096, spill_root=tmp_path)
    assert child_dir in st.spill.swept and not child_dir.exists()
    st.close()


def test_live_process_dir_is_not_swept(tmp_path):
    st = _stack(tmp_path)
    st.register("a", _val(0), level=2)
    assert sweep_stale(spill_base(tmp_path)) == []
    assert st.spill.path.exists()
    # A directory named after our pid but an older start time is a reused pid: stale.
    fake = spill_base(tmp_path) / f"{os.getpid()}-1"
    fake.mkdir()
    assert sweep_stale(spill_base(tmp_path)) == [fake]
    assert torch.equal(st.access("a"), _val(0))
    st.close()


# ------------------------------------------------------------------------------------------------ stress
def test_concurrent_prefetch_and_compute_lose_and_duplicate_nothing(tmp_path):
    n = 32
    st = _stack(tmp_path, dev=6, host=10, disk=1 << 24, workers=3)
    expected = {}
    for i in range(n):
        expected[i] = _val(i)
        st.register(i, expected[i])
    stop = threading.Event()
    errors = []

    def prefetcher(seed):
        rng = random.Random(seed)
        while not stop.is_set():
            try:
                st.prefetch(rng.randrange(n))
            except TierError as e:  # a full level while others are pinned is a legitimate refusal
                if "nothing in it can move down" not in str(e):
                    errors.append(e)
            except Exception as e:  # noqa: BLE001 - any other failure is a test failure
                errors.append(e)
            time.sleep(0.0005)

    threads = [threading.Thread(target=prefetcher, args=(s,)) for s in range(3)]
    for t in threads:
        t.start()
    rng = random.Random(0)
    accesses = 0
    try:
        for step in range(6):
            for _ in range(40):
                k = rng.randrange(n)
                t = st.access(k, pin=True)
                accesses += 1
                assert torch.equal(t, expected[k]), f"wrong value for {k}"
                t.add_(1.0)  # compute in place while pinned
                expected[k] = expected[k] + 1.0
                st.unpin(k)
            st.end_step()
    finally:
        stop.set()
        for t in threads:
            t.join()
    assert not errors, errors[:3]
    for f in [e.moving for e in st._entries.values() if e.moving is not None]:
        f.result()
    st.check_consistency()
    assert sorted(st.keys()) == list(range(n))
    for k in range(n):
        assert torch.equal(st.access(k), expected[k])
    s = st.stats.levels
    assert s[0].hits + s[0].misses == accesses + n
    assert sum(x.bytes_in for x in s.values()) == sum(x.bytes_out for x in s.values())
    assert st.used_bytes(0) <= st.tiers[0].capacity_bytes
    st.close()
