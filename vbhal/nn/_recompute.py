"""The offload engine's backward recompute without the ops whose results nothing reads.

A streamed unit's backward runs its forward again to rebuild the autograd graph, then takes the gradients. The
values that backward needs are the tensors autograd saves; the ops after the last one that produces (or writes)
such a tensor compute values nobody reads: in ``x + W2 gelu(W1 x)`` the second matmul and the residual add. They
are one matmul in eight of an MLP block's step (session 9, H100: 0.34 s of 2.69 s of matmuls at 64k tokens).
torch's non-reentrant checkpoint stops its recompute at the same point ("early stop"), which is why in-GPU training
with checkpointing does not pay for them.

How: the first recompute of a unit for a given input signature runs in full under a recording dispatch mode that
notes each op (function, input metadata including its non-tensor arguments), what it wrote, and which op last
wrote each tensor autograd saves (a saved-tensor hook). The last op that matters is the latest of: the last
writer of a saved tensor, any op writing memory the recompute did not make (a buffer, an input), an op drawing
random numbers, an op whose result Python reads (a non-tensor or data-dependent result: .item()), a copy to
another device (.cpu(), .tolist() of a device tensor), and any op run under another saved-tensor hook (an inner
checkpoint keeps its inputs for its own recompute). Later recomputes with the same signature run that prefix for
real and give the ops after it outputs of the recorded shape without computing them (views and ops that write
their arguments still run).

Checked on every use: each op against the record (the same op; after the prefix, the same inputs too); a
tensor autograd saves from a left-out op, Python reading one's memory (.tolist(), .numpy(): _Watch), or another
saved-tensor hook over one abandons that recompute and runs it again in full (recording afresh; the engine
restarts the random generators for it); a change before the prefix ends just goes on in full. A unit is never
skipped when a recompute of it registers tensor hooks (they run in the backward and may read a late value),
keeps a late value in a module attribute (containers included), writes memory from outside it (buffers: a
recompute that diverged after such a write could not run again), has module hooks, or holds a custom
autograd.Function (which may keep tensors on ``ctx`` where no hook sees them); found after the record, the
recompute runs again in full. What stays unseen: a late tensor kept in a global or a closure and read after the
recompute, and hooks registered on autograd nodes (grad_fn.register_hook: node classes cannot be wrapped). That
is why it is opt-in (``OffloadConfig.recompute_skip``). Up to MAX_PLANS input signatures are kept per unit.
"""

from __future__ import annotations

import collections
import functools
import math
import threading
import weakref
from collections.abc import Callable
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten, tree_unflatten

from vbhal.errors import TierError

_top_hooks = getattr(torch._C._autograd, "_top_saved_tensors_default_hooks", None)
_LIVE_TAGS = tuple(t for t in (getattr(torch.Tag, n, None) for n in
                               ("nondeterministic_seeded", "data_dependent_output", "dynamic_output_shape")) if t is not None)

#: False where torch lacks what the checks need (then every recompute runs in full)
AVAILABLE = _top_hooks is not None


class _Diverged(BaseException):  # not Exception: a user's `except Exception` inside the unit must not swallow it
    """The recompute left the recorded trace after an op was left out: run it again in full."""


_PLAIN = (int, float, bool, str, torch.dtype, torch.device, torch.layout, torch.memory_format, type(None))
MAX_PLANS = 8  # per unit: input signatures remembered (the oldest goes first)


def _key(t: torch.Tensor) -> int:
    return t.untyped_storage()._cdata


def _meta(t: Any) -> Any:
    if isinstance(t, torch.Tensor):
        return tuple(t.shape), tuple(t.stride()), t.dtype, t.device
    if isinstance(t, float) and math.isnan(t):
        return "nan"  # NaN never equals itself: it would look like a change on every use
    return t if isinstance(t, _PLAIN) else type(t)


@functools.cache
def _writes(func: Any) -> tuple[tuple[int, str], ...]:
    """(position, name) of the arguments `func` writes (in-place and out= ops, running statistics); per op, once."""
    return tuple((i, a.name) for i, a in enumerate(func._schema.arguments)
                 if a.alias_info is not None and a.alias_info.is_write)


@functools.cache
def _aliases(func: Any) -> bool:
    """Whether an output of `func` aliases an input (views, in-place and out= ops); per op, once."""
    return any(r.alias_info is not None for r in func._schema.returns)


def _written(func: Any, args: tuple, kwargs: dict) -> list[torch.Tensor]:
    out = []
    for i, name in _writes(func):
        val = args[i] if i < len(args) else kwargs.get(name)
        out.extend(t for t in tree_flatten(val)[0] if isinstance(t, torch.Tensor))
    return out


class Plan:
    """A recorded recompute: per op (function, input metadata, output metadata, output structure); the ops after
    `last` are left out, unless `skippable` is False."""

    __slots__ = ("last", "ops", "skippable", "skipped")

    def __init__(self) -> None:
        self.ops: list[tuple[Any, list, list, Any]] = []
        self.last = -1
        self.skippable = True
        self.skipped = 0

    def close(self) -> None:
        self.skipped = sum(1 for op in self.ops[self.last + 1 :] if not _aliases(op[0]) and not _writes(op[0])) \
            if self.skippable else 0


class _Mode(TorchDispatchMode):
    """Records `plan` (record=True) or follows it, leaving out the ops after `plan.last`."""

    def __init__(self, plan: Plan, record: bool, pack: Callable) -> None:
        super().__init__()
        self.plan, self.record, self.pack = plan, record, pack
        self.follow = not record  # False once the trace left the plan before anything was left out
        self.k = 0
        self.writer: dict[int, int] = {}  # storage -> index of the op that last wrote it
        self.created: set[int] = set()  # storages this recompute made
        self.wrote_outside = False  # an op wrote memory the recompute did not make (an input, a buffer)
        self.fakes: dict[int, list] = {}  # op index -> weak refs to the uncomputed outputs given for it

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        k = self.k
        self.k += 1
        top = _top_hooks(False)
        inner = top is not None and top[0] is not self.pack  # under another saved-tensor hook (inner checkpoint)
        plan = self.plan
        if self.follow:
            if k >= len(plan.ops) or plan.ops[k][0] is not func:
                if k > plan.last:
                    raise _Diverged(f"op {k} is {func}, the record has {plan.ops[k][0] if k < len(plan.ops) else 'none'}")
                self.follow = False  # nothing left out yet: go on in full (the plan is recorded again next time)
            elif k > plan.last:
                ins = [_meta(t) for t in tree_flatten((args, kwargs))[0]]
                outside = any(_key(t) not in self.created for t in _written(func, args, kwargs))
                if ins != plan.ops[k][1] or inner or outside:
                    raise _Diverged(f"op {k} ({func}) differs from the record")
                if not _aliases(func) and not _writes(func):  # nothing reads its result: shapes only
                    _, _, metas, spec = plan.ops[k]
                    out = tree_unflatten([torch.empty_strided(m[0], m[1], dtype=m[2], device=m[3]) for m in metas], spec)
                    self._note(func, args, kwargs, out, k)
                    # weak: only a result the unit kept stays alive (no extra device memory otherwise)
                    self.fakes[k] = [weakref.ref(t) for t in tree_flatten(out)[0] if isinstance(t, torch.Tensor)]
                    return out
        ins = [_meta(t) for t in tree_flatten((args, kwargs))[0]] if self.record else None
        out = func(*args, **kwargs)
        self._note(func, args, kwargs, out, k)
        if self.record:
            flat, spec = tree_flatten(out)
            plan.ops.append((func, ins, [_meta(t) for t in flat], spec))
            devices = {t.device for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)}
            if inner or any(t in func.tags for t in _LIVE_TAGS) or not flat or \
                    any(not isinstance(t, torch.Tensor) or t.device not in devices for t in flat):
                plan.last = max(plan.last, k)  # random, read by Python, or a copy to another device
        return out

    def _note(self, func: Any, args: tuple, kwargs: dict, out: Any, k: int) -> None:
        for t in _written(func, args, kwargs):
            if _key(t) not in self.created:
                self.wrote_outside = True
                if self.record:
                    self.plan.last = max(self.plan.last, k)  # writes memory from outside the recompute
            self.writer[_key(t)] = k
        if not _aliases(func):
            for t in tree_flatten(out)[0]:
                if isinstance(t, torch.Tensor):
                    self.writer[_key(t)] = k
                    self.created.add(_key(t))


class _Fill(TorchDispatchMode):
    """Runs every op; copies op k's outputs into the uncomputed outputs a replay gave for op k."""

    def __init__(self, fakes: dict) -> None:
        super().__init__()
        self.fakes, self.k = fakes, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        fakes = self.fakes.get(self.k)
        self.k += 1
        if fakes:
            with torch.no_grad():
                for ref, t in zip(fakes, [t for t in tree_flatten(out)[0] if isinstance(t, torch.Tensor)]):
                    f = ref()
                    if f is not None:
                        f.copy_(t)
        return out


def _has_custom_function(roots: list) -> bool:
    seen, stack = set(), [t.grad_fn for t in roots if isinstance(t, torch.Tensor) and t.grad_fn is not None]
    while stack:
        fn = stack.pop()
        if fn is None or fn in seen:
            continue
        seen.add(fn)
        if isinstance(fn, torch.autograd.function.BackwardCFunction):
            return True
        stack.extend(f for f, _ in fn.next_functions)
    return False


def _stashed_late(module: torch.nn.Module | None, mode: _Mode, last: int) -> bool:
    """Whether a module of the unit keeps (as an attribute, or inside containers in one, 4 levels deep) a tensor
    written after op `last`."""
    if module is None:
        return False

    def late(v: Any, depth: int) -> bool:
        if isinstance(v, torch.Tensor):
            return mode.writer.get(_key(v), -1) > last
        if depth == 0 or isinstance(v, (str, bytes, torch.nn.Module)):
            return False
        if isinstance(v, dict):
            return any(late(x, depth - 1) for x in list(v.values()))
        if isinstance(v, (list, tuple, set, frozenset, collections.deque)):
            return any(late(x, depth - 1) for x in list(v))
        return False

    return any(late(v, 4) for m in module.modules() for v in list(vars(m).values()))


def hooked(module: torch.nn.Module) -> bool:
    """Whether module hooks could read values inside the unit (then every recompute of it runs in full)."""
    import torch.nn.modules.module as mm

    if any(getattr(mm, g, None) for g in ("_global_forward_hooks", "_global_forward_pre_hooks", "_global_backward_hooks",
                                          "_global_backward_pre_hooks", "_global_forward_hooks_always_called")):
        return True
    return any(m._forward_hooks or m._forward_pre_hooks or m._backward_hooks or getattr(m, "_backward_pre_hooks", None)
               for m in module.modules())


_local = threading.local()  # .watches: the active _Watch stack of this thread
_install_lock = threading.Lock()
_installed = False


def _active() -> _Watch | None:
    stack = getattr(_local, "watches", None)
    return stack[-1] if stack else None


def _install() -> None:
    """Wrap Tensor.register_hook and the memory reads with no op (tolist, numpy, __array__) once per process;
    the wrappers report to the calling thread's active _Watch, if any, and otherwise go straight through."""
    global _installed
    if _installed:  # every recompute asks: no lock once done
        return
    with _install_lock:
        if _installed:
            return
        try:  # Dynamo lists Tensor's C methods once (cached): list them before they are wrapped
            from torch._dynamo.trace_rules import get_tensor_method
            get_tensor_method()
        except Exception:  # noqa: BLE001, S110 - another torch: nothing to prepare
            pass
        orig_hook = torch.Tensor.register_hook

        @functools.wraps(orig_hook)
        def register_hook(self, *a, **k):
            w = _active()
            if w is not None:
                w.seen = True
            return orig_hook(self, *a, **k)

        torch.Tensor.register_hook = register_hook
        for name in ("tolist", "numpy", "__array__"):
            orig = getattr(torch.Tensor, name, None)
            if orig is None:
                continue

            @functools.wraps(orig)
            def read(self, *a, _orig=orig, **k):
                w = _active()
                if w is not None:
                    w.read(self)
                return _orig(self, *a, **k)

            setattr(torch.Tensor, name, read)
        _installed = True


class _Watch:
    """For the length of one recompute, on its thread: notes tensor hooks the unit registers (the backward runs
    them, and they may read a late value) and sees Python read a tensor's memory with no op (.tolist(), .numpy()
    of a CPU tensor): recording, the tensor's writer becomes an op that matters; following a plan, reading a
    left-out op's result runs the recompute again in full. Hooks registered on autograd nodes
    (grad_fn.register_hook) are not seen: node classes cannot be wrapped."""

    def __init__(self, mode: _Mode) -> None:
        self.mode = mode
        self.seen = False

    def read(self, t: Any) -> None:
        if not isinstance(t, torch.Tensor):
            return
        mode = self.mode
        w = mode.writer.get(_key(t), -1)
        if mode.record:
            mode.plan.last = max(mode.plan.last, w)
        elif mode.follow and w > mode.plan.last:
            raise _Diverged("Python reads the memory of a left-out op's result")

    def __enter__(self) -> None:
        _install()
        if not hasattr(_local, "watches"):
            _local.watches = []
        _local.watches.append(self)

    def __exit__(self, *exc: object) -> None:
        _local.watches.remove(self)


def _detach(t: torch.Tensor) -> torch.Tensor:
    return t.detach()  # as the replay's pack does: the same ops, so the op indices match


def _unpack(t: torch.Tensor) -> torch.Tensor:
    return t


def run(plans: dict, key: Any, fn: Callable[[], Any], roots: Callable[[Any], list], name: str = "",
        module: torch.nn.Module | None = None) -> tuple[Any, int]:
    """Run the recompute `fn` (its contexts included: a retry calls it again), recording a plan under `key` the
    first time and leaving out the dead ops after that. Returns (fn's result, ops left out)."""
    plan = plans.get(key)
    if plan is not None and not plan.skipped:
        return fn(), 0  # nothing to leave out (or never): no dispatch mode at all
    if plan is not None:
        mode: _Mode | None = None

        def pack(t: torch.Tensor) -> torch.Tensor:
            if mode.follow and mode.writer.get(_key(t), -1) > plan.last:
                raise _Diverged("autograd saves a tensor that the record said nothing reads")
            return t.detach()  # (the tensor itself would make a reference cycle when it is the op's output)

        mode = _Mode(plan, record=False, pack=pack)
        watch = _Watch(mode)
        try:
            with torch.autograd.graph.saved_tensors_hooks(pack, _unpack), mode, watch:
                out = fn()
            if not mode.follow:
                del plans[key]  # the trace changed before anything was left out: record it again next time
                return out, 0
            if watch.seen or _stashed_late(module, mode, plan.last):
                # this time the unit registered a hook or kept a late value (a condition the record did not
                # meet): run it in full, and never leave anything out of this signature again
                del out
                plan.skippable, plan.skipped = False, 0
                # A late value the unit kept (appended to a list, say) is one of the replay's uncomputed outputs:
                # the full run writes the real values into them, op by op (the same saved-tensor hook as the
                # replay's, so the op indices line up). The unit's forward code runs once more for this step.
                with torch.autograd.graph.saved_tensors_hooks(_detach, _unpack), _Fill(mode.fakes):
                    return fn(), 0
            return out, plan.skipped
        except _Diverged as e:
            if mode.wrote_outside:  # an input or buffer was written already: a second run would see it changed
                raise TierError(f"unit '{name}': its recompute differed from the recorded one ({e}) after writing "
                                "a tensor from outside the unit (in place); pass recompute_skip=False") from None
            del plans[key]
    plan = Plan()
    mode = None

    def pack_rec(t: torch.Tensor) -> torch.Tensor:
        plan.last = max(plan.last, mode.writer.get(_key(t), -1))
        return t.detach()

    mode = _Mode(plan, record=True, pack=pack_rec)
    failed = False
    hooks = _Watch(mode)
    try:
        with torch.autograd.graph.saved_tensors_hooks(pack_rec, _unpack), mode, hooks:
            out = fn()
    except Exception:
        if mode.wrote_outside:
            raise
        failed = True  # something in the unit does not run under a dispatch mode (or a genuine error, raised again)
    if failed:
        plan = Plan()
        plan.skippable = False
        _remember(plans, key, plan)
        return fn(), 0
    # Writes to memory from outside (buffers): a recompute that diverged after one could not run again, so such
    # units are never skipped (transformer blocks write none; BatchNorm's running statistics do).
    if _has_custom_function(roots(out)) or _stashed_late(module, mode, plan.last) or hooks.seen or mode.wrote_outside:
        plan.skippable = False
    plan.close()
    _remember(plans, key, plan)
    return out, 0


def _remember(plans: dict, key: Any, plan: Plan) -> None:
    plans.pop(key, None)
    while len(plans) >= MAX_PLANS:
        del plans[next(iter(plans))]
    plans[key] = plan


def signature(tensors: list, autocast: tuple) -> tuple:
    """The key a plan is recorded under: what the recompute's trace depends on besides the module's code."""
    return autocast, tuple((tuple(t.shape), t.dtype, t.device, t.requires_grad) if isinstance(t, torch.Tensor) else type(t)
                           for t in tensors)
