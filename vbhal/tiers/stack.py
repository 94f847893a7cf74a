"""The tier stack: a directory from key to level over device memory, host memory and disk.

* ``register(key, tensor)`` puts a tensor in the stack (at level 0 when it fits, else lower);
* ``access(key)`` returns it on level 0, promoting it (a *miss*) unless it is there already (a *hit*);
* room is made by demotion, level by level, under each level's byte budget; pinned keys never move. The victim
  is the least recently used key until the stack has learned the access order, then the key whose next use
  lies furthest ahead in that order (Belady's choice; for the cyclic pattern of training steps plain LRU
  evicts exactly the key needed next, so every key is read again every step once the keys outgrow a level);
* ``prefetch(key)`` starts the promotion in the background (copy stream + event on accelerators, a
  worker thread for disk reads), and ``access`` then waits only for what is not there yet;
* after the first step (``end_step()``) the stack knows the access order and prefetches the next
  ``prefetch_depth`` keys on every access by itself; a later step that accesses keys the order lacks (tensors
  registered during the first step) teaches it again;
* nothing is ever lost: a demotion that fails (disk full) keeps the tensor where it was, warns, and lets
  that level run over its budget while memory allows; a corrupted spill file raises, naming the tensor.

Cross-stream rules: a tensor copied on a copy stream carries the event of that copy; its consumer waits
on the event (``wait_event``) and records its stream on the tensor (``record_stream``) so the allocator
does not reuse the memory early; a demotion's copy stream first waits for the compute stream.

Example::

    stack = TierStack.for_device("cpu", device_bytes=64 << 20, host_bytes=256 << 20)
    stack.register("w0", torch.randn(1024, 1024))
    w = stack.access("w0")          # on level 0
    stack.end_step()
    print(format_tier_stats(stack))
    stack.close()
"""

from __future__ import annotations

import bisect
import threading
import time
import warnings
import weakref
from collections.abc import Callable, Hashable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from vbhal.errors import TierError
from vbhal.tiers.pool import HostBlock, HostPool, TierWarning
from vbhal.tiers.spill import DiskFullError, SpillDirectory, read_spill, write_spill
from vbhal.tiers.stats import TierStats

LEVEL_DEVICE, LEVEL_HOST, LEVEL_DISK = 0, 1, 2
#: Prefetch depth used after the first step when none is given.
DEFAULT_PREFETCH_DEPTH = 2
#: Accesses recorded per step for learning the order (a caller that never calls end_step() stays bounded).
_MAX_TRACE = 1 << 20


# ---------------------------------------------------------------------------------------------------- tiers
@dataclass
class Tier:
    """One level of the stack. ``capacity_bytes`` is the budget demotion keeps to; ``hard_limit_bytes``
    is how far the level may run over it when the level below refuses a tensor (None: no further)."""

    name: str
    level: int
    device: torch.device
    capacity_bytes: int
    kind: str = "device"  # "device" | "host" | "disk"
    pinned: bool = False
    hard_limit_bytes: int | None = None
    bandwidth_bytes_per_s: float | None = None
    stream_factory: Callable[[], Any] | None = None
    event_factory: Callable[[], Any] | None = None
    used_bytes: int = 0
    note: str = ""

    def describe(self) -> str:
        return f"L{self.level} {self.name} ({self.kind}, {self.device}, {self.capacity_bytes} B{', pinned' if self.pinned else ''})"


@dataclass
class _Entry:
    key: Hashable
    shape: tuple[int, ...]
    dtype: torch.dtype
    nbytes: int
    level: int
    data: torch.Tensor | None = None  # on level 0 or 1
    block: HostBlock | None = None  # when the host copy lives in the pool
    path: Path | None = None  # on level 2
    event: Any = None  # the copy that produced `data` is done once this fires
    pinned: bool = False
    last_use: int = 0
    moving: Future | None = None


class TierStack:
    """Tensors by key over levels 0 (device), 1 (host), 2 (disk); see the module docstring."""

    stats_title = "vbhal tier stack"

    def __init__(
        self,
        tiers: list[Tier],
        *,
        prefetch_depth: int | None = None,
        spill_root: str | Path | None = None,
        pin_fn: Callable[[int], torch.Tensor] | None = None,
        workers: int = 2,
    ) -> None:
        levels = sorted(t.level for t in tiers)
        if not tiers or levels != list(range(len(tiers))):
            raise TierError(f"a TierStack needs levels 0..n-1 once each, got {levels}: give one device, host and/or disk tier")
        self.tiers = sorted(tiers, key=lambda t: t.level)
        self.device = self.tiers[0].device
        self._accel = self.device.type != "cpu"
        self._dm = torch.get_device_module(self.device.type) if self._accel else None
        self._copy_stream = None
        if self._accel:
            sf = self.tiers[0].stream_factory
            self._copy_stream = sf() if sf else self._dm.Stream(self.device)
        host = next((t for t in self.tiers if t.kind == "host"), None)
        self.pool = HostPool(pin=bool(host and host.pinned), pin_fn=pin_fn, name=host.name if host else "host",
                             chunk_bytes=1 << 22 if not self._accel else 64 << 20)
        disk = next((t for t in self.tiers if t.kind == "disk"), None)
        self.spill = SpillDirectory(Path(spill_root) if spill_root else None) if disk else None
        self.disk_fault_hook: Callable[[str, object], None] | None = None
        self._entries: dict[Hashable, _Entry] = {}
        self._deferred: list[tuple[Any, HostBlock]] = []
        self.bandwidth: dict[str, float] = {}
        self._lock = threading.RLock()
        self._clock = 0
        self._pool_exec = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="vbhal-tier-prefetch")
        self.stats = TierStats()
        for t in self.tiers:
            self.stats.level(t.level, t.name)
        self.prefetch_depth = prefetch_depth
        self._trace: list[Hashable] = []  # this step's accesses
        self._order: list[Hashable] | None = None  # the learned access order of one step
        self._positions: dict[Hashable, list[int]] = {}  # key -> its (sorted) positions in the order
        self._pos = -1  # position in the order of the last access
        self._current: Hashable | None = None  # the last key accessed: never the next victim
        self._relearn = False
        self._closed = False
        self._finalizer = weakref.finalize(self, _cleanup, self.spill, self._pool_exec)

    # -------------------------------------------------------------------------------------- builders
    @classmethod
    def from_specs(cls, specs: list[Any], **kw: Any) -> TierStack:
        """A stack from the HAL's :class:`~vbhal.hookspecs.TierSpec` list (``vbhal.hal.get_tiers(device)``).

        One tier per level (the spec of the level's own kind wins: a peer GPU offered at level 1 beside
        pinned host memory is skipped here); missing levels between are not invented, levels are renumbered
        from 0 in order.
        """
        kinds = {0: "device", 1: "host", 2: "disk"}
        chosen = []
        for level in sorted({s.level for s in specs}):
            at = [s for s in specs if s.level == level]
            s = next((x for x in at if getattr(x, "kind", None) == kinds.get(level)), at[0])
            chosen.append(s)
        if not chosen or chosen[0].level != 0:
            raise TierError(f"the HAL gave no device tier (level 0) among {[getattr(s, 'name', s) for s in specs]}")
        tiers = []
        for i, s in enumerate(chosen):
            kind = getattr(s, "kind", kinds.get(s.level, "host"))
            tiers.append(Tier(
                name=s.name, level=i, device=s.device if i == 0 else torch.device("cpu"), capacity_bytes=int(s.capacity_bytes),
                kind=kind, pinned=bool(getattr(s, "pinned", False)),
                hard_limit_bytes=_default_hard_limit(LEVEL_HOST, s.capacity_bytes) if kind == "host" else None,
                bandwidth_bytes_per_s=getattr(s, "bandwidth_bytes_per_s", None),
                stream_factory=getattr(s, "stream_factory", None), event_factory=getattr(s, "event_factory", None),
                note=getattr(s, "note", ""),
            ))
        return cls(tiers, **kw)

    @classmethod
    def for_device(
        cls,
        device: str | torch.device = "cpu",
        *,
        device_bytes: int | None = None,
        host_bytes: int | None = None,
        disk_bytes: int | None = None,
        pin: bool | None = None,
        **kw: Any,
    ) -> TierStack:
        """A stack of the HAL's tiers for `device` (``vbhal.hal.get_tiers``), budgets overridden by the arguments.

        Without the HAL (or a tier it does not give) the defaults are: device memory (free memory on
        accelerators; on CPU a RAM budget standing in for device memory), host RAM (pinned on accelerators),
        disk under the spill root.
        """
        device = torch.device(device)
        specs = []
        try:
            from vbhal import hal as _hal

            get = getattr(_hal, "get_tiers", None)
            if get is not None:
                specs = list(get(device))
        except Exception:  # noqa: BLE001 - the HAL is optional for the stack; fall back to defaults
            specs = []
        tiers = []
        for level, kind, override in ((0, "device", device_bytes), (1, "host", host_bytes), (2, "disk", disk_bytes)):
            # One tier per level: the HAL may offer several at a level (e.g. a peer GPU beside pinned host memory
            # at level 1); the stack takes the one of the level's kind.
            s = next((x for x in specs if x.level == level and x.kind == kind), None)
            cap = override if override is not None else (s.capacity_bytes if s is not None else _default_capacity(device, level))
            tiers.append(
                Tier(
                    name=(s.name if s is not None else {0: f"{device.type} memory", 1: "host", 2: "disk"}[level]),
                    level=level,
                    device=device if level == 0 else torch.device("cpu"),
                    capacity_bytes=int(cap),
                    kind=kind,
                    pinned=(pin if pin is not None else (s.pinned if s is not None else device.type != "cpu")) if level == 1 else False,
                    hard_limit_bytes=_default_hard_limit(level, cap),
                    stream_factory=getattr(s, "stream_factory", None) if s is not None else None,
                    event_factory=getattr(s, "event_factory", None) if s is not None else None,
                )
            )
        return cls(tiers, **kw)

    # -------------------------------------------------------------------------------------- directory
    def __contains__(self, key: Hashable) -> bool:
        return key in self._entries

    def __len__(self) -> int:
        return len(self._entries)

    def keys(self) -> list[Hashable]:
        return list(self._entries)

    def level_of(self, key: Hashable) -> int:
        return self._entry(key).level

    def used_bytes(self, level: int) -> int:
        return self.tiers[level].used_bytes

    def _entry(self, key: Hashable) -> _Entry:
        try:
            return self._entries[key]
        except KeyError:
            raise TierError(f"tensor {key!r} is not registered with this TierStack; register(key, tensor) it first") from None

    def register(self, key: Hashable, tensor: torch.Tensor, *, level: int | None = None, pin: bool = False) -> None:
        """Add `tensor` under `key` (a copy is kept; the stack owns it). Default level: the highest with room."""
        self._check_open()
        t = tensor.detach()
        nbytes = t.numel() * t.element_size()
        with self._lock:
            if key in self._entries:
                raise TierError(f"tensor {key!r} is already registered; remove() it or use update()")
            e = _Entry(key, tuple(t.shape), t.dtype, nbytes, level=-1, pinned=pin)
            want = level if level is not None else next(
                (tr.level for tr in self.tiers if tr.used_bytes + nbytes <= tr.capacity_bytes), self.tiers[-1].level
            )
            if want >= len(self.tiers):
                raise TierError(f"level {want} does not exist in this stack (levels 0..{len(self.tiers) - 1})")
            try:
                self._make_room(want, nbytes, exclude=e)
                self._place(e, t, want)
            except DiskFullError as exc:
                # Nothing is lost: keep the tensor in memory (over budget, within the hard limit) and say so.
                mem = max(tr.level for tr in self.tiers if tr.kind != "disk")
                warnings.warn(
                    f"vbhal tiers: could not place {key!r} ({nbytes} bytes) on the disk tier: {exc}. "
                    f"It stays on level {mem}",
                    TierWarning,
                    stacklevel=2,
                )
                self.stats.add(want, failed_demotions=1)
                tier = self.tiers[mem]
                if tier.hard_limit_bytes is None or tier.used_bytes + nbytes > tier.hard_limit_bytes:
                    raise TierError(
                        f"cannot keep {key!r}: the disk tier refused it ({exc}) and level {mem} ({tier.name}) is at its "
                        f"hard limit ({tier.used_bytes} of {tier.hard_limit_bytes} bytes): free disk space, raise "
                        "the budgets, or use a smaller model"
                    ) from exc
                self._place(e, t, mem)
            self._entries[key] = e
            self._touch(e)

    def update(self, key: Hashable, tensor: torch.Tensor) -> None:
        """Replace the value of `key` (same shape and dtype) wherever it lives."""
        with self._lock:
            e = self._entry(key)
            self._settle(e)
            if tuple(tensor.shape) != e.shape or tensor.dtype != e.dtype:
                raise TierError(f"update of {key!r}: got {tuple(tensor.shape)} {tensor.dtype}, registered {e.shape} {e.dtype}")
            level = e.level
            self._free_location(e)
            self._place(e, tensor.detach(), level)

    def remove(self, key: Hashable) -> None:
        with self._lock:
            e = self._entry(key)
            self._settle(e)
            self._free_location(e)
            del self._entries[key]

    def pin(self, key: Hashable) -> None:
        """Keep `key` where it is (no demotion) until :meth:`unpin`."""
        with self._lock:
            self._entry(key).pinned = True

    def unpin(self, key: Hashable) -> None:
        with self._lock:
            self._entry(key).pinned = False

    # -------------------------------------------------------------------------------------- access
    def access(self, key: Hashable, *, pin: bool = False) -> torch.Tensor:
        """The tensor of `key` on level 0, ready to use on the current stream.

        The returned tensor stays valid until the stack demotes it (pin it to hold it there). In-place
        changes to it are kept: the stack moves that memory, it does not re-read an older copy.
        """
        self._check_open()
        with self._lock:
            e = self._entry(key)
            if len(self._trace) < _MAX_TRACE:
                self._trace.append(key)
            self._advance(key)
            pending = e.moving
        t0 = time.perf_counter()
        if pending is not None:
            try:
                pending.result()  # a prefetch already under way
            except TierError:
                pass  # the prefetch could not make room then; the promotion below tries again (and raises if it must)
        with self._lock:
            if e.level == 0 and e.moving is None:
                self.stats.add(0, hits=1)
                if pending is not None:
                    self.stats.add(0, stall_s=time.perf_counter() - t0)
            else:
                self.stats.add(0, misses=1)
                self._promote_locked(e)
                self.stats.add(e.level, stall_s=time.perf_counter() - t0)
            if pin:
                e.pinned = True
            self._touch(e)
            data = e.data
            ev, e.event = e.event, None
        if self._accel:
            cur = self._dm.current_stream(self.device)
            if ev is not None:
                cur.wait_event(ev)
            data.record_stream(cur)
        self._auto_prefetch(key)
        return data

    def prefetch(self, key: Hashable) -> Future | None:
        """Start promoting `key` to level 0 in the background; ``access`` waits for it only if needed. Once the
        order is learned, a promotion that would evict only keys needed sooner than `key` is skipped (the future
        completes without moving it; ``access`` then promotes it)."""
        self._check_open()
        with self._lock:
            e = self._entry(key)
            if e.level == 0 or e.moving is not None:
                return e.moving
            fut: Future = Future()
            e.moving = fut

        def run() -> None:
            try:
                with self._lock:
                    e.moving = None
                    if self._worth_promoting(e):
                        self._promote_locked(e)
                fut.set_result(None)
            except BaseException as exc:  # noqa: BLE001 - surfaced by access() through the future
                fut.set_exception(exc)

        self._pool_exec.submit(run)
        return fut

    def _advance(self, key: Hashable) -> None:
        """Move the position in the learned order to `key`'s next occurrence (lock held)."""
        self._current = key
        if self._order is None:
            return
        if key not in self._positions:
            self._relearn = True  # a key the order does not know: learn the order again at the end of this step
            return
        self._pos = (self._pos + self._next_use(key)) % len(self._order)

    def _next_use(self, key: Hashable) -> int:
        """How many accesses ahead `key` is used next in the learned order (len(order) + 1: not in it)."""
        n = len(self._order)
        pos = self._positions.get(key)
        if pos is None:
            return n + 1
        i = bisect.bisect_right(pos, self._pos)
        return pos[i] - self._pos if i < len(pos) else pos[0] + n - self._pos

    def _auto_prefetch(self, key: Hashable) -> None:
        with self._lock:
            if self._order is None or key not in self._positions:
                return
            n, depth = len(self._order), self.prefetch_depth or DEFAULT_PREFETCH_DEPTH
            ahead = [self._order[(self._pos + j) % n] for j in range(1, min(depth, n - 1) + 1)]
        for nxt in ahead:
            if nxt in self._entries and nxt != key:
                try:
                    self.prefetch(nxt)
                except TierError:
                    pass

    def demote(self, key: Hashable, level: int | None = None) -> bool:
        """Move `key` down (to `level`, default one level). Returns False (and warns) when it had to stay."""
        with self._lock:
            e = self._entry(key)
            self._settle(e)
            target = e.level + 1 if level is None else level
            if target <= e.level or target >= len(self.tiers):
                raise TierError(f"cannot demote {key!r} from level {e.level} to level {target}")
            return self._demote_locked(e, target)

    def end_step(self) -> dict[str, float]:
        """Close a step: the first one teaches the stack the access order (used to prefetch and to choose
        victims from then on); a step that met keys the order lacks teaches it again."""
        with self._lock:
            if (self._order is None or self._relearn) and self._trace and len(self._trace) < _MAX_TRACE:
                self._order = list(self._trace)
                self._positions = {}
                for i, k in enumerate(self._order):
                    self._positions.setdefault(k, []).append(i)
                self._pos = -1
            self._relearn = False
            self._trace = []
        return self.stats.end_step()

    # -------------------------------------------------------------------------------------- moves (lock held)
    def _touch(self, e: _Entry) -> None:
        self._clock += 1
        e.last_use = self._clock

    def _settle(self, e: _Entry) -> None:
        if e.moving is not None:
            fut = e.moving
            self._lock.release()
            try:
                fut.result()
            finally:
                self._lock.acquire()

    def _promote_locked(self, e: _Entry) -> None:
        if e.level == 0:
            return
        self._reap()
        swap = False
        try:
            self._make_room(0, e.nbytes, exclude=e)
        except TierError:
            # The levels below are at their limits (e.g. the disk refused): swap instead — move `e` up first,
            # which frees its bytes below, then demote a victim into them.
            if e.level != 1:
                raise
            swap = True
        src = self._read(e)
        old = e.level
        new = _Entry(e.key, e.shape, e.dtype, e.nbytes, level=-1)
        self._place(new, src, 0)
        # The old host copy may still be read by the asynchronous copy: free it once that copy is done.
        self._free_location(e, after=new.event)
        e.level, e.data, e.block, e.path, e.event = new.level, new.data, new.block, new.path, new.event
        if swap:
            self._make_room(0, 0, exclude=e)
        self._touch(e)  # a prefetched tensor is about to be used: it must not be the next LRU victim
        self.stats.add(0, promotions=1, bytes_in=e.nbytes)
        self.stats.add(old, bytes_out=e.nbytes)

    def _reap(self) -> None:
        """Free host blocks whose asynchronous copies have finished."""
        keep = []
        for ev, blk in self._deferred:
            if ev.query():
                self.pool.free(blk)
            else:
                keep.append((ev, blk))
        self._deferred = keep

    def _demote_locked(self, e: _Entry, target: int) -> bool:
        """Move `e` down to `target`; on failure keep it where it is, count and warn."""
        if e.level >= target:
            return True
        try:
            self._make_room(target, e.nbytes, exclude=e)
            src = self._read(e, to_host=True)
            old = e.level
            new = _Entry(e.key, e.shape, e.dtype, e.nbytes, level=-1)
            self._place(new, src, target)  # may raise DiskFullError: e is untouched then
        except (DiskFullError, TierError) as exc:
            self.stats.add(e.level, failed_demotions=1)
            warnings.warn(
                f"vbhal tiers: could not demote {e.key!r} ({e.nbytes} bytes) from level {e.level} to {target}: {exc}. "
                f"It stays on level {e.level}",
                TierWarning,
                stacklevel=4,
            )
            return False
        self._free_location(e)
        e.level, e.data, e.block, e.path, e.event = new.level, new.data, new.block, new.path, new.event
        self.stats.add(old, demotions=1, bytes_out=e.nbytes)
        self.stats.add(target, bytes_in=e.nbytes)
        return True

    def _make_room(self, level: int, nbytes: int, *, exclude: _Entry) -> None:
        tier = self.tiers[level]
        if tier.kind == "disk":
            return  # the disk checks its quota and free space when it writes
        while tier.used_bytes + nbytes > tier.capacity_bytes:
            # Every move runs under the lock, so a tensor with a queued prefetch is not in flight: it may be
            # demoted (its prefetch then promotes it from wherever it is). Device copies carry their events.
            victims = [x for x in self._entries.values() if x.level == level and not x.pinned and x is not exclude]
            if not victims:
                if level == 0 or tier.hard_limit_bytes is None or tier.used_bytes + nbytes > tier.hard_limit_bytes:
                    raise TierError(
                        f"level {level} ({tier.name}) needs {nbytes} bytes but holds {tier.used_bytes} of "
                        f"{tier.capacity_bytes}, and nothing in it can move down (pinned, in flight, or the level "
                        "below refused): unpin tensors, raise the budget, or free disk space"
                    )
                return  # run over the budget, within the hard limit
            victim = self._victim(victims)
            if level + 1 >= len(self.tiers) or not self._demote_locked(victim, level + 1):
                # The level below refused: allow running over the budget while memory allows.
                if tier.hard_limit_bytes is not None and tier.used_bytes + nbytes <= tier.hard_limit_bytes:
                    return
                raise TierError(
                    f"level {level} ({tier.name}) is full ({tier.used_bytes} of {tier.capacity_bytes} bytes) and "
                    f"{victim.key!r} could not move to level {level + 1}: free disk space, raise the budgets, "
                    "or use a smaller model"
                )

    def _worth_promoting(self, e: _Entry) -> bool:
        """A prefetch only evicts keys needed later than `e`: with a level 0 smaller than the prefetch window it
        would otherwise push out a key that is needed sooner, which is then read again (lock held)."""
        tier = self.tiers[0]
        free = tier.capacity_bytes - tier.used_bytes
        if e.level == 0 or free >= e.nbytes or self._order is None or e.key == self._current:
            return True  # (the current key: an access is waiting for this prefetch)
        d = self._next_use(e.key)
        later = sum(x.nbytes for x in self._entries.values()
                    if x.level == 0 and not x.pinned and x is not e and x.key != self._current
                    and self._next_use(x.key) > d)
        return free + later >= e.nbytes

    def _victim(self, victims: list[_Entry]) -> _Entry:
        if self._order is None:
            return min(victims, key=lambda x: x.last_use)  # LRU until the order is known
        others = [x for x in victims if x.key != self._current] or victims
        # Furthest next use first (keys outside the order count as furthest); ties: least recently used.
        return max(others, key=lambda x: (self._next_use(x.key), -x.last_use))

    def _read(self, e: _Entry, *, to_host: bool = False) -> torch.Tensor:
        """The current value of `e` as a tensor (host tensor when reading from disk or when `to_host`)."""
        if self.tiers[e.level].kind == "disk":
            blk = self.pool.alloc(e.shape, e.dtype)
            try:
                read_spill(e.path, e.key, e.shape, e.dtype, out=blk.tensor)
            except BaseException:
                self.pool.free(blk)
                raise
            return _Pooled(blk, self.pool)  # type: ignore[return-value]
        data = e.data
        if self._accel and e.event is not None:
            e.event.synchronize()  # the copy that produced it must be complete before it is read again
        if to_host and data.device.type != "cpu":
            blk = self.pool.alloc(e.shape, e.dtype)
            ready = self._dm.Event()
            ready.record(self._dm.current_stream(self.device))
            with self._dm.stream(self._copy_stream):
                self._copy_stream.wait_event(ready)  # kernels still using the tensor finish first
                blk.tensor.copy_(data, non_blocking=True)
                data.record_stream(self._copy_stream)
                ev = self._dm.Event()
                ev.record(self._copy_stream)
            ev.synchronize()  # eviction is off the hot path; the host copy must be whole before it is placed
            return _Pooled(blk, self.pool)  # type: ignore[return-value]
        return data

    def _place(self, e: _Entry, src: torch.Tensor, level: int) -> None:
        """Store `src` as the value of `e` on `level` (accounting included)."""
        tier = self.tiers[level]
        src_block = src.block if isinstance(src, _Pooled) else None
        src_t = src.tensor if isinstance(src, _Pooled) else src
        if tier.kind == "disk":
            if tier.used_bytes + e.nbytes > tier.capacity_bytes:
                if src_block is not None:
                    self.pool.free(src_block)
                raise DiskFullError(f"disk tier quota of {tier.capacity_bytes} bytes is used up ({tier.used_bytes} used)")
            path = self.spill.new_file(e.key)
            try:
                write_spill(path, e.key, src_t if src_t.device.type == "cpu" else src_t.cpu(), owner=self.spill.owner,
                            fault_hook=self.disk_fault_hook)
            finally:
                if src_block is not None:
                    self.pool.free(src_block)
            e.path, e.data, e.block = path, None, None
        elif tier.kind == "host":
            if src_block is not None:
                e.block, e.data = src_block, src_block.tensor
            else:
                blk = self.pool.alloc(e.shape, e.dtype)
                blk.tensor.copy_(src_t)
                e.block, e.data = blk, blk.tensor
            e.path = None
        else:  # device memory
            if src_t.device == tier.device and src_block is None and not self._accel:
                e.data = src_t.clone()
            elif self._accel:
                with self._dm.stream(self._copy_stream):
                    d = torch.empty(e.shape, dtype=e.dtype, device=tier.device)
                    d.copy_(src_t, non_blocking=True)
                    ev = self._dm.Event()
                    ev.record(self._copy_stream)
                e.data, e.event = d, ev
                if src_block is not None:  # the host staging block may be reused only after the copy
                    self._deferred.append((ev, src_block))
            else:
                e.data = src_t.to(tier.device, copy=True)
                if src_block is not None:
                    self.pool.free(src_block)
            e.block, e.path = None, None
        e.level = level
        tier.used_bytes += e.nbytes

    def _free_location(self, e: _Entry, *, after: Any = None) -> None:
        if e.level < 0:
            return
        tier = self.tiers[e.level]
        tier.used_bytes -= e.nbytes
        if e.block is not None:
            if self._accel and e.event is not None:
                e.event.synchronize()
            if after is not None:
                self._deferred.append((after, e.block))
            else:
                self.pool.free(e.block)
        if e.path is not None:
            try:
                e.path.unlink()
            except OSError:
                pass
        e.data = e.block = e.path = None
        e.event = None
        e.level = -1

    def measure_bandwidth(self, nbytes: int = 64 << 20) -> dict[str, float]:
        """Time copies between adjacent levels with an `nbytes` tensor; fills each tier's
        ``bandwidth_bytes_per_s`` (bytes/s into that level) and returns {"0<-1": ..., "1<-0": ...}."""
        out: dict[str, float] = {}
        t = torch.empty(nbytes, dtype=torch.uint8).random_(0, 255)
        host = self.pool.alloc(nbytes, torch.uint8)
        host.tensor.copy_(t)
        try:
            for lo in range(len(self.tiers) - 1):
                up, down = self.tiers[lo], self.tiers[lo + 1]
                if up.kind == "device" and self._accel:
                    dev = torch.empty(nbytes, dtype=torch.uint8, device=self.device)
                    for name, fn in ((f"{lo}<-{lo + 1}", lambda dev=dev: dev.copy_(host.tensor, non_blocking=True)),
                                     (f"{lo + 1}<-{lo}", lambda dev=dev: host.tensor.copy_(dev, non_blocking=True))):
                        fn()
                        self._dm.synchronize(self.device)
                        t0 = time.perf_counter()
                        for _ in range(3):
                            fn()
                        self._dm.synchronize(self.device)
                        out[name] = 3 * nbytes / (time.perf_counter() - t0)
                elif down.kind == "disk":
                    path = self.spill.new_file("bandwidth-probe")
                    t0 = time.perf_counter()
                    write_spill(path, "bandwidth-probe", host.tensor)
                    out[f"{lo + 1}<-{lo}"] = nbytes / (time.perf_counter() - t0)
                    t0 = time.perf_counter()
                    read_spill(path, "bandwidth-probe", (nbytes,), torch.uint8, out=t)
                    out[f"{lo}<-{lo + 1}"] = nbytes / (time.perf_counter() - t0)
                    path.unlink()
                else:  # host memory to host memory (a CPU "device" tier)
                    t0 = time.perf_counter()
                    for _ in range(3):
                        t.copy_(host.tensor)
                    out[f"{lo}<-{lo + 1}"] = out[f"{lo + 1}<-{lo}"] = 3 * nbytes / (time.perf_counter() - t0)
                down.bandwidth_bytes_per_s = out[f"{lo + 1}<-{lo}"]  # into each lower level from above
            self.tiers[0].bandwidth_bytes_per_s = out.get("0<-1")  # into the device from the level below
        finally:
            self.pool.free(host)
        self.bandwidth = out
        return out

    # -------------------------------------------------------------------------------------- housekeeping
    def _check_open(self) -> None:
        if self._closed:
            raise TierError("this TierStack is closed; make a new one")

    def check_consistency(self) -> None:
        """Raise AssertionError if the directory and the per-level byte counts disagree (used by tests)."""
        with self._lock:
            for t in self.tiers:
                held = sum(e.nbytes for e in self._entries.values() if e.level == t.level)
                assert held == t.used_bytes, f"level {t.level}: entries hold {held} bytes, counter says {t.used_bytes}"
            for e in self._entries.values():
                assert 0 <= e.level < len(self.tiers), f"{e.key!r} has no level"
                if self.tiers[e.level].kind == "disk":
                    assert e.path is not None and e.path.exists(), f"{e.key!r} lost its spill file"
                else:
                    assert e.data is not None, f"{e.key!r} lost its data"

    def close(self) -> None:
        """Drop every tensor, stop the prefetch threads and remove the spill directory."""
        if self._closed:
            return
        self._closed = True
        self._pool_exec.shutdown(wait=True)
        with self._lock:
            for e in list(self._entries.values()):
                self._free_location(e)
            self._entries.clear()
            for ev, blk in self._deferred:
                ev.synchronize()
                self.pool.free(blk)
            self._deferred = []
        self._finalizer()

    def __enter__(self) -> TierStack:  # noqa: PYI034
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class _Pooled:
    """A host tensor that lives in a pool block (ownership passes to whoever places it)."""

    __slots__ = ("block", "pool")

    def __init__(self, block: HostBlock, pool: HostPool) -> None:
        self.block, self.pool = block, pool

    @property
    def tensor(self) -> torch.Tensor:
        return self.block.tensor


def _cleanup(spill: SpillDirectory | None, executor: ThreadPoolExecutor) -> None:
    executor.shutdown(wait=False)
    if spill is not None:
        spill.close()


def _default_hard_limit(level: int, capacity: int) -> int | None:
    """Host memory may run over its budget (when the disk refuses) up to 90% of the RAM available now."""
    if level != LEVEL_HOST:
        return None
    try:
        from vbhal._sysinfo import host_memory_available

        return max(int(capacity), int(host_memory_available() * 0.9))
    except ImportError:
        return None


def _default_capacity(device: torch.device, level: int) -> int:
    if level == 0:
        if device.type != "cpu":
            dm = torch.get_device_module(device.type)
            free, _ = dm.mem_get_info(device)
            return int(free * 0.9)
        return 1 << 30
    if level == 1:
        try:
            from vbhal._sysinfo import host_memory_available

            return int(host_memory_available() * 0.8)
        except ImportError:
            return 8 << 30
    try:
        from vbhal._sysinfo import disk_free

        return int(disk_free() * 0.9)
    except ImportError:
        return 64 << 30
