"""Host staging memory from a pool we size ourselves.

Why a pool: PyTorch's pinned-memory allocator rounds every request up to a power of two, so pinning
tensors one by one can page-lock almost twice what was asked for — memory that also escapes the
accounting of offload systems and has got them killed by the OOM killer. The pool instead pins
*chunks* whose size is already a power of two (nothing is rounded), carves tensors out of them with a
first-fit allocator, and counts the real page-locked bytes against host RAM and the cgroup limit.

When pinning fails (no accelerator, ``ulimit -l``, the driver refuses) the pool falls back to pageable
memory, says so once with a :class:`TierWarning`, and records the reason in :attr:`HostPool.fallback_reason`.
On CPU-only torch ``Tensor.pin_memory()`` raises, so pinning is only asked for by accelerator backends.
"""

from __future__ import annotations

import threading
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import torch

from vbhal.errors import TierError

#: Offsets inside a chunk are aligned to this many bytes (a cache line multiple, and what vectorised
#: copies like; also keeps every dtype naturally aligned).
ALIGN_BYTES = 512
#: Default chunk: a power of two, so the pinned allocator's rounding adds nothing.
DEFAULT_CHUNK_BYTES = 256 << 20
#: Leave this much host memory free when growing the pool (the OS and the rest of the process need it).
HOST_RESERVE_BYTES = 2 << 30


class TierWarning(UserWarning):
    """Something in the tier stack fell back to a slower or safer path (pageable memory, a kept tensor)."""


def _next_pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def _default_pin(nbytes: int) -> torch.Tensor:
    return torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)


@dataclass
class _Chunk:
    data: torch.Tensor  # uint8, flat
    pinned: bool
    free: list[tuple[int, int]]  # sorted (offset, size) runs


@dataclass
class HostBlock:
    """A piece of pool memory: ``tensor`` is a typed view; give it back with :meth:`HostPool.free`."""

    tensor: torch.Tensor
    chunk: int
    offset: int
    nbytes: int
    pinned: bool


class HostPool:
    """Host memory carved out of power-of-two chunks, pinned when asked (and possible).

    ``limit_bytes`` caps the pool's total size (``None``: grow while host RAM, after a reserve, allows).
    ``pin_fn`` allocates one pinned chunk (a seam for fault-injection tests). Thread-safe.

    Example::

        pool = HostPool(pin=torch.cuda.is_available())
        blk = pool.alloc((1024, 1024), torch.bfloat16)
        blk.tensor.copy_(gpu_tensor, non_blocking=True)
        pool.free(blk)
    """

    def __init__(
        self,
        *,
        pin: bool,
        chunk_bytes: int = DEFAULT_CHUNK_BYTES,
        limit_bytes: int | None = None,
        pin_fn: Callable[[int], torch.Tensor] | None = None,
        name: str = "host",
    ) -> None:
        if chunk_bytes <= 0 or chunk_bytes & (chunk_bytes - 1):
            raise TierError(f"HostPool chunk_bytes must be a power of two, got {chunk_bytes}; pass e.g. {DEFAULT_CHUNK_BYTES}")
        self.name = name
        self.pin = pin
        self.chunk_bytes = chunk_bytes
        self.limit_bytes = limit_bytes
        self._pin_fn = pin_fn or _default_pin
        self._chunks: list[_Chunk] = []
        self._lock = threading.Lock()
        self.fallback_reason: str | None = None
        self.used_bytes = 0
        self.peak_used_bytes = 0

    # ------------------------------------------------------------------------------------------- accounting
    @property
    def pinned_bytes(self) -> int:
        """Real page-locked bytes held by this pool (chunk sizes are powers of two: no hidden rounding)."""
        return sum(c.data.numel() for c in self._chunks if c.pinned)

    @property
    def pageable_bytes(self) -> int:
        return sum(c.data.numel() for c in self._chunks if not c.pinned)

    @property
    def reserved_bytes(self) -> int:
        return self.pinned_bytes + self.pageable_bytes

    # ------------------------------------------------------------------------------------------- allocation
    def alloc(self, shape: tuple[int, ...] | torch.Size | int, dtype: torch.dtype, *, zero: bool = False) -> HostBlock:
        """A typed tensor of `shape` from the pool (grows the pool by a chunk when needed)."""
        shape = (shape,) if isinstance(shape, int) else tuple(shape)
        numel = 1
        for s in shape:
            numel *= int(s)
        itemsize = torch.empty((), dtype=dtype).element_size()
        nbytes = max(ALIGN_BYTES, -(-numel * itemsize // ALIGN_BYTES) * ALIGN_BYTES)
        with self._lock:
            found = self._find(nbytes)
            if found is None:
                self._grow(nbytes)
                found = self._find(nbytes)
                assert found is not None
            ci, off = found
            self.used_bytes += nbytes
            self.peak_used_bytes = max(self.peak_used_bytes, self.used_bytes)
        chunk = self._chunks[ci]
        raw = chunk.data[off : off + numel * itemsize]
        t = raw.view(dtype).view(shape)
        if zero:
            t.zero_()
        return HostBlock(t, ci, off, nbytes, chunk.pinned)

    def free(self, block: HostBlock) -> None:
        """Give a block back (adjacent free runs are merged)."""
        with self._lock:
            runs = self._chunks[block.chunk].free
            runs.append((block.offset, block.nbytes))
            runs.sort()
            merged: list[tuple[int, int]] = []
            for off, size in runs:
                if merged and merged[-1][0] + merged[-1][1] == off:
                    merged[-1] = (merged[-1][0], merged[-1][1] + size)
                else:
                    merged.append((off, size))
            self._chunks[block.chunk].free = merged
            self.used_bytes -= block.nbytes

    def _find(self, nbytes: int) -> tuple[int, int] | None:
        for ci, chunk in enumerate(self._chunks):
            for ri, (off, size) in enumerate(chunk.free):
                if size >= nbytes:
                    if size == nbytes:
                        chunk.free.pop(ri)
                    else:
                        chunk.free[ri] = (off + nbytes, size - nbytes)
                    return ci, off
        return None

    def _grow(self, nbytes: int) -> None:
        size = self.chunk_bytes if nbytes <= self.chunk_bytes else _next_pow2(nbytes)
        if self.limit_bytes is not None and self.reserved_bytes + size > self.limit_bytes:
            raise TierError(
                f"host pool '{self.name}' needs {size} more bytes but its limit is {self.limit_bytes} "
                f"({self.reserved_bytes} in use): raise the host tier's capacity or move state to the disk tier"
            )
        try:
            from vbhal._sysinfo import host_memory_available

            avail = host_memory_available()
        except ImportError:  # psutil missing: no check beyond the pool's own limit
            avail = None
        if avail is not None and size + HOST_RESERVE_BYTES > avail:
            raise TierError(
                f"host pool '{self.name}' cannot grow by {size} bytes: only {avail} bytes of host RAM are "
                f"available (cgroup limit counted, {HOST_RESERVE_BYTES} kept in reserve); use a smaller model, "
                "fewer tokens per step, or the disk tier for optimizer state"
            )
        pinned = False
        data = None
        if self.pin and self.fallback_reason is None:
            try:
                data = self._pin_fn(size)
                pinned = True
            except (RuntimeError, OSError, MemoryError) as e:  # driver refusal, RLIMIT_MEMLOCK, no accelerator
                self.fallback_reason = f"{type(e).__name__}: {e}".splitlines()[0][:300]
                warnings.warn(
                    f"vbhal: pinning {size} bytes of host memory failed ({self.fallback_reason}); the '{self.name}' "
                    "pool falls back to pageable memory: copies to and from the device will be slower and synchronous",
                    TierWarning,
                    stacklevel=3,
                )
        if data is None:
            data = torch.empty(size, dtype=torch.uint8)
        self._chunks.append(_Chunk(data, pinned, [(0, size)]))

    def describe(self) -> str:
        kind = "pinned" if self.pinned_bytes and not self.pageable_bytes else ("mixed" if self.pinned_bytes else "pageable")
        s = f"{self.name}: {kind}, {self.reserved_bytes} bytes in {len(self._chunks)} chunks, {self.used_bytes} used"
        if self.fallback_reason:
            s += f" (pinning failed: {self.fallback_reason})"
        return s
