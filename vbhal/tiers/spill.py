"""The disk tier's files: a private directory per process, checksummed spill files, stale-directory sweep.

Layout: ``<spill root>/vbhal-spill-<uid>/<pid>-<process start time>/`` with mode 0700. The process start
time (from ``/proc/<pid>/stat``, else psutil) makes the name unique even when a pid is reused, so a
directory is only ever trusted by the process that made it. A directory whose process is gone (or whose
pid now belongs to a younger process) is stale — left by a killed run — and is removed when the next
stack starts. Spill files are never read across runs.

File format (little endian)::

    8 bytes  magic b"VBHSPIL1"
    4 bytes  header length H (uint32)
    H bytes  JSON header: {"key", "shape", "dtype", "nbytes", "crc32" (8 hex digits), "owner"}
    nbytes   raw tensor bytes (C-contiguous)

A file is written to a temporary name and renamed into place, so a reader never sees half a file;
the CRC-32 of the payload is checked on every read, so a corrupted file raises instead of returning
a wrong value.
"""

from __future__ import annotations

import json
import os
import queue
import shutil
import struct
import threading
import zlib
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

from vbhal.errors import TierError

SPILL_MAGIC = b"VBHSPIL1"
_HDR = struct.Struct("<8sI")
#: Payload is checksummed in pieces of this size (zlib.crc32 over a memoryview, no copy), on a helper thread
#: beside the file I/O (write: the whole payload while it is written; read: each piece once it is in).
_CRC_PIECE = 64 << 20
#: Helper threads for those checksums (zlib releases the GIL): one per concurrent spill read or write.
_CRC_THREADS = 4
_CRC_POOL: ThreadPoolExecutor | None = None
_CRC_POOL_LOCK = threading.Lock()


def _crc_pool() -> ThreadPoolExecutor:
    global _CRC_POOL
    with _CRC_POOL_LOCK:
        if _CRC_POOL is None:
            _CRC_POOL = ThreadPoolExecutor(max_workers=_CRC_THREADS, thread_name_prefix="vbhal-spill-crc")
        return _CRC_POOL


def _forget_crc_pool() -> None:
    """After fork(): the child has none of the parent's pool threads; it starts its own pool when it needs one."""
    global _CRC_POOL, _CRC_POOL_LOCK
    _CRC_POOL, _CRC_POOL_LOCK = None, threading.Lock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_crc_pool)


def _crc32(buf: memoryview, offsets: Iterable[int] | None = None) -> int:
    """CRC-32 of `buf`, chained over the pieces starting at `offsets` (in order; default: every piece)."""
    crc = 0
    for i in range(0, len(buf), _CRC_PIECE) if offsets is None else offsets:
        crc = zlib.crc32(buf[i : i + _CRC_PIECE], crc)
    return crc


class SpillCorruptionError(TierError):
    """A spill file failed its checksum or header check; the message names the tensor and the file."""


class DiskFullError(TierError, OSError):
    """The disk tier has no room (quota or free space); the tensor stays where it was."""


def process_start_time(pid: int) -> str | None:
    """An identifier of when process `pid` started (clock ticks since boot on Linux), or None if it is gone."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
        # Field 22 (starttime); split after the command name, which may itself contain spaces and ')'.
        return raw.rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        pass
    try:
        import psutil

        return str(int(psutil.Process(pid).create_time() * 100))
    except Exception:  # noqa: BLE001 - psutil missing or no such process
        return None


def _owner_tag(pid: int | None = None) -> str:
    pid = os.getpid() if pid is None else pid
    return f"{pid}-{process_start_time(pid) or 'unknown'}"


def spill_base(root: Path | None = None) -> Path:
    """The per-user directory that holds every process's private spill directory."""
    if root is None:
        from vbhal._sysinfo import spill_root

        root = spill_root()
    uid = os.getuid() if hasattr(os, "getuid") else 0
    return Path(root) / f"vbhal-spill-{uid}"


def sweep_stale(base: Path) -> list[Path]:
    """Remove spill directories under `base` whose owning process no longer exists. Returns what was removed."""
    removed: list[Path] = []
    if not base.is_dir():
        return removed
    for d in base.iterdir():
        if not d.is_dir():
            continue
        pid_s, _, start = d.name.partition("-")
        if not pid_s.isdigit():
            continue
        alive = process_start_time(int(pid_s))
        if alive is not None and (alive == start or start == "unknown"):
            continue  # a live process owns it
        shutil.rmtree(d, ignore_errors=True)
        removed.append(d)
    return removed


class SpillDirectory:
    """This process's private spill directory (0700), created after sweeping stale ones; removed by close()."""

    def __init__(self, root: Path | None = None) -> None:
        self.base = spill_base(root)
        self.base.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.swept = sweep_stale(self.base)
        self.owner = _owner_tag()
        self.path = self.base / self.owner
        self.path.mkdir(mode=0o700, exist_ok=True)
        os.chmod(self.path, 0o700)
        self._n = 0

    def new_file(self, key: object) -> Path:
        self._n += 1
        safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in str(key))[:80]
        return self.path / f"{self._n:08d}-{safe}.spill"

    def close(self) -> None:
        shutil.rmtree(self.path, ignore_errors=True)


def write_spill(path: Path, key: object, tensor: torch.Tensor, *, owner: str = "",
                fault_hook: Callable[[str, object], None] | None = None) -> int:
    """Write `tensor` (on the host) to `path` atomically; returns the payload size in bytes.

    Raises :class:`DiskFullError` when the disk is full (ENOSPC/EDQUOT or the fault hook says so); the
    partial temporary file is removed.
    """
    t = tensor.detach().contiguous()
    if t.device.type != "cpu":
        raise TierError(f"write_spill expects a host tensor for {key!r}, got one on {t.device}")
    payload = memoryview(t.view(torch.uint8).reshape(-1).numpy()) if t.numel() else memoryview(b"")
    # The CRC runs on a helper thread while the payload is written (zlib releases the GIL): the header, written
    # first, holds a fixed-width placeholder that is overwritten in place once the CRC is known.

    def header_bytes(c: int) -> bytes:  # the CRC as 8 hex digits: the same length whatever its value
        return json.dumps(
            {"key": str(key), "shape": list(t.shape), "dtype": str(t.dtype).removeprefix("torch."),
             "nbytes": len(payload), "crc32": f"{c:08x}", "owner": owner}
        ).encode()

    tmp = path.with_suffix(".tmp")
    crc_fut = None
    try:
        if fault_hook is not None:
            fault_hook("write", key)
        crc_fut = _crc_pool().submit(_crc32, payload) if len(payload) > _CRC_PIECE else None
        header = header_bytes(_crc32(payload) if crc_fut is None else 0)
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(_HDR.pack(SPILL_MAGIC, len(header)))
            f.write(header)
            f.write(payload)
            if crc_fut is not None:
                f.seek(_HDR.size)
                f.write(header_bytes(crc_fut.result()))
        os.replace(tmp, path)
    except BaseException as e:
        if crc_fut is not None:
            crc_fut.cancel()
        try:
            tmp.unlink()
        except OSError:
            pass
        if isinstance(e, DiskFullError) or not isinstance(e, OSError):
            raise
        raise DiskFullError(f"writing {key!r} to the disk tier ({path.parent}) failed: {e}") from e
    return len(payload)


def read_spill(path: Path, key: object, shape: tuple[int, ...], dtype: torch.dtype, *,
               out: torch.Tensor | None = None) -> torch.Tensor:
    """Read a spill file back, checking magic, header and CRC-32; raises :class:`SpillCorruptionError`."""

    def bad(why: str) -> SpillCorruptionError:
        return SpillCorruptionError(
            f"spill file of tensor {key!r} ({path}) is corrupted: {why}. The value is not used; the tensor is "
            "lost from the disk tier — restart from a checkpoint, and check the disk"
        )

    try:
        with open(path, "rb") as f:
            head = f.read(_HDR.size)
            if len(head) != _HDR.size:
                raise bad("truncated header")
            magic, hlen = _HDR.unpack(head)
            if magic != SPILL_MAGIC:
                raise bad(f"bad magic {magic!r}")
            try:
                meta = json.loads(f.read(hlen))
            except ValueError as e:
                raise bad(f"unreadable header ({e})") from None
            want_dtype = str(dtype).removeprefix("torch.")
            if meta.get("key") != str(key) or tuple(meta.get("shape", ())) != tuple(shape) or meta.get("dtype") != want_dtype:
                raise bad(f"header says {meta.get('key')!r} {meta.get('shape')} {meta.get('dtype')}, expected "
                          f"{key!r} {list(shape)} {want_dtype}")
            t = out if out is not None else torch.empty(shape, dtype=dtype)
            raw = t.view(torch.uint8).reshape(-1) if t.numel() else torch.empty(0, dtype=torch.uint8)
            if raw.numel() != meta["nbytes"]:
                raise bad(f"payload size {meta['nbytes']} does not match the tensor's {raw.numel()} bytes")
            buf = memoryview(raw.numpy()) if raw.numel() else memoryview(b"")
            # Read piece by piece; a helper thread checksums each piece once it is in, under the next read.
            pieces: queue.SimpleQueue = queue.SimpleQueue()
            crc_fut = _crc_pool().submit(_crc32, buf, iter(pieces.get, None)) if len(buf) > _CRC_PIECE else None
            got = 0
            try:
                for i in range(0, len(buf), _CRC_PIECE):
                    n = f.readinto(buf[i : i + _CRC_PIECE])
                    got += n
                    if n != len(buf[i : i + _CRC_PIECE]):
                        break
                    pieces.put(i)
            finally:
                pieces.put(None)
            crc = crc_fut.result() if crc_fut is not None else _crc32(buf)
            if got != raw.numel():
                raise bad(f"truncated payload ({got} of {raw.numel()} bytes)")
    except FileNotFoundError:
        raise SpillCorruptionError(f"spill file of tensor {key!r} ({path}) is missing") from None
    want = meta.get("crc32")
    if not isinstance(want, str) or f"{crc:08x}" != want:
        raise bad(f"CRC-32 {crc:08x} != {want}")
    return t
