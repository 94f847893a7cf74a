"""The offload engine's backward recompute without the ops whose results nothing reads.

A streamed unit's backward runs its forward again to rebuild the autograd graph, then takes the gradients. The
values that backward needs are the tensors autograd saves; the ops after the last one that produces (or writes)
such a tensor compute values nobody reads: in ``x + W2 gelu(W1 x)`` the second matmul and the residual add. They
are one matmul in eight of an MLP block's step (session 9, H100: 0.34 s of 2.69 s of matmuls at 64k tokens).
torch's non-reentrant checkpoint stops its recompute at the same point ("early stop"), which is why in-GPU training
with checkpointing does not pay for them.

How: the first recompute of a unit for a given input signature runs in full under a recording dispatch mode that
notes each op, what it wrote, and which op last wrote each tensor autograd saves (a saved-tensor hook). The last
op that matters is the latest of: the last writer of a saved tensor, an op that writes memory from outside the
recompute, an op drawing random numbers, an op whose result Python reads (a non-tensor or data-dependent result),
and any op run under another saved-tensor hook (an inner checkpoint keeps its inputs for its own recompute). Later
recomputes with the same signature run that prefix for real and give the ops after it outputs of the recorded
shape without computing them (views and in-place ops still run: they cost nothing and keep aliasing real).

Never a wrong value: each op is checked against the record (the same op; after the prefix, the same input
shapes too); a mismatch, a tensor autograd saves from a skipped op, or another saved-tensor hook over a skipped op
abandons that recompute and runs it again in full (recording afresh). A unit whose graph holds a custom
autograd.Function (which may keep tensors on ``ctx`` where no hook sees them) is never skipped.
``OffloadConfig.recompute_skip=False`` turns it off.
"""

from __future__ import annotations

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


class _Diverged(Exception):
    """The recompute left the recorded trace: run it again in full."""


def _key(t: torch.Tensor) -> int:
    return t.untyped_storage()._cdata


def _meta(t: Any) -> Any:
    return (tuple(t.shape), tuple(t.stride()), t.dtype, t.device) if isinstance(t, torch.Tensor) else None


def _writes(func: Any) -> list[int]:
    """Positions of the arguments `func` writes (in-place and out= ops)."""
    return [i for i, a in enumerate(func._schema.arguments) if a.alias_info is not None and a.alias_info.is_write]


def _aliases(func: Any) -> bool:
    """Whether an output of `func` aliases an input (views, in-place and out= ops)."""
    return any(r.alias_info is not None for r in func._schema.returns)


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
        self.skipped = sum(1 for op in self.ops[self.last + 1 :] if not _aliases(op[0])) if self.skippable else 0


class _Mode(TorchDispatchMode):
    """Records `plan` (record=True) or follows it, leaving out the ops after `plan.last`."""

    def __init__(self, plan: Plan, record: bool, pack: Callable) -> None:
        super().__init__()
        self.plan, self.record, self.pack = plan, record, pack
        self.k = 0
        self.writer: dict[int, int] = {}  # storage -> index of the op that last wrote it
        self.wrote_outside = False  # an op wrote memory the recompute did not make (an input, a buffer)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        k = self.k
        self.k += 1
        top = _top_hooks(False)
        inner = top is not None and top[0] is not self.pack  # under another saved-tensor hook (inner checkpoint)
        plan = self.plan
        if self.record:
            ins = [_meta(t) for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)]
            out = func(*args, **kwargs)
            flat, spec = tree_flatten(out)
            plan.ops.append((func, ins, [_meta(t) for t in flat], spec))
            if inner or any(t in func.tags for t in _LIVE_TAGS) or not flat or \
                    any(not isinstance(t, torch.Tensor) for t in flat):
                plan.last = max(plan.last, k)
            self._note_writes(func, args, kwargs, out, k)
            return out
        if k >= len(plan.ops) or plan.ops[k][0] is not func:
            raise _Diverged(f"op {k} is {func}, the record has {plan.ops[k][0] if k < len(plan.ops) else 'none'}")
        if k > plan.last:
            ins = [_meta(t) for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)]
            if ins != plan.ops[k][1] or inner:
                raise _Diverged(f"op {k} ({func}) has other inputs than the record")
            if not _aliases(func):  # nothing reads its result: a tensor of the recorded shape, not computed
                _, _, metas, spec = plan.ops[k]
                leaves = [torch.empty_strided(m[0], m[1], dtype=m[2], device=m[3]) for m in metas]
                out = tree_unflatten(leaves, spec)
                self._note_writes(func, args, kwargs, out, k)
                return out
        out = func(*args, **kwargs)
        self._note_writes(func, args, kwargs, out, k)
        return out

    def _note_writes(self, func: Any, args: tuple, kwargs: dict, out: Any, k: int) -> None:
        wr = _writes(func)
        if wr:
            names = [a.name for a in func._schema.arguments]
            for i in wr:
                val = args[i] if i < len(args) else kwargs.get(names[i])
                for t in tree_flatten(val)[0]:
                    if isinstance(t, torch.Tensor):
                        if _key(t) not in self.writer:
                            self.wrote_outside = True
                            if self.record:
                                self.plan.last = max(self.plan.last, k)
                        self.writer[_key(t)] = k
        if not _aliases(func):
            for t in tree_flatten(out)[0]:
                if isinstance(t, torch.Tensor):
                    self.writer[_key(t)] = k


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


def _unpack(t: torch.Tensor) -> torch.Tensor:
    return t


def run(plans: dict, key: Any, fn: Callable[[], Any], roots: Callable[[Any], list], name: str = "") -> tuple[Any, int]:
    """Run the recompute `fn` (its contexts included: a retry calls it again), recording a plan under `key` the
    first time and leaving out the dead ops after that. Returns (fn's result, ops left out)."""
    plan = plans.get(key)
    if plan is not None and plan.skipped:
        mode: _Mode | None = None

        def pack(t: torch.Tensor) -> torch.Tensor:
            if mode.writer.get(_key(t), -1) > plan.last:
                raise _Diverged("autograd saves a tensor that the record said nothing reads")
            return t.detach()  # (the tensor itself would make a reference cycle when it is the op's output)

        mode = _Mode(plan, record=False, pack=pack)
        try:
            with torch.autograd.graph.saved_tensors_hooks(pack, _unpack), mode:
                return fn(), plan.skipped
        except _Diverged as e:
            if mode.wrote_outside:  # an input or buffer was written already: a second run would see it changed
                raise TierError(f"unit '{name}': its recompute differed from the recorded one ({e}) after writing "
                                "a tensor from outside the unit (in place); pass recompute_skip=False") from e
            del plans[key]
    plan = Plan()
    mode = None

    def pack_rec(t: torch.Tensor) -> torch.Tensor:
        plan.last = max(plan.last, mode.writer.get(_key(t), -1))
        return t.detach()

    mode = _Mode(plan, record=True, pack=pack_rec)
    try:
        with torch.autograd.graph.saved_tensors_hooks(pack_rec, _unpack), mode:
            out = fn()
    except Exception:
        if mode.wrote_outside:
            raise
        # Something in the unit does not run under a dispatch mode (or a genuine error, which the plain run
        # raises again): this signature runs in full from now on.
        plan.skippable = False
        plans[key] = plan
        return fn(), 0
    plan.skippable = not _has_custom_function(roots(out))
    plan.close()
    plans[key] = plan
    return out, 0


def signature(tensors: list, autocast: tuple) -> tuple:
    """The key a plan is recorded under: what the recompute's trace depends on besides the module's code."""
    return autocast, tuple((tuple(t.shape), t.dtype, t.device, t.requires_grad) if isinstance(t, torch.Tensor) else type(t)
                           for t in tensors)
