"""The backward recompute leaves out the ops whose results nothing reads (vbhal/nn/_recompute.py): gradients
bitwise the same as the full recompute and as plain training, the dead ops really left out, and every way a
recorded plan can stop holding caught (run again in full)."""

from __future__ import annotations

import collections
import copy
from typing import ClassVar

import pytest
import torch
from test_offload import TinyLM, _batches, _train_offload, _train_plain
from torch import nn

from vbhal.nn import _recompute
from vbhal.nn.offload import apply_offload

pytestmark = pytest.mark.skipif(not _recompute.AVAILABLE, reason="this torch lacks the saved-tensor hook query the checks need")


class _CountMM(torch.utils._python_dispatch.TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.mm = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in (torch.ops.aten.mm.default, torch.ops.aten.addmm.default):
            self.mm += 1
        return func(*args, **(kwargs or {}))


def _run(model_fn, skip: bool, steps: int = 6, **cfg):
    torch.manual_seed(3)
    model = model_fn()
    data = _batches(steps)
    losses, eng = _train_offload(model, data, recompute_skip=skip, **cfg)
    master = {k: v.clone() for k, v in eng.master_state_dict().items()}
    skipped = eng.recompute_skipped
    eng.close()
    return losses, master, skipped


@pytest.mark.parametrize("cfg", [{}, {"chunks": 2}, {"autocast": True}, {"dropout": 0.1}])
def test_skipping_is_bitwise_the_full_recompute_and_plain_training(cfg):
    cfg = dict(cfg)
    autocast = cfg.pop("autocast", False)
    dropout = cfg.pop("dropout", 0.0)

    def make():
        return TinyLM(dropout=dropout)

    l_on, m_on, skipped = _run(make, True, autocast=autocast, **cfg) if autocast else _run(make, True, **cfg)
    l_off, m_off, none = _run(make, False, autocast=autocast, **cfg) if autocast else _run(make, False, **cfg)
    assert skipped > 0 and none == 0
    assert l_on == l_off
    for k in m_off:
        assert torch.equal(m_on[k], m_off[k]), k
    if not autocast and not dropout and not cfg:
        torch.manual_seed(3)
        ref = TinyLM()
        assert _train_plain(ref, _batches(6)) == l_on


def test_the_last_matmul_and_add_of_a_block_are_left_out():
    torch.manual_seed(0)
    model = TinyLM(n=2)
    eng = apply_offload(model, device="cpu", lr=1e-2, recompute_skip=True)
    x, y = _batches(1)[0]

    def backward_mms() -> int:
        logits = model(x)
        loss = nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))
        with _CountMM() as c:
            loss.backward()
        eng.step()
        return c.mm

    first = backward_mms()  # records the plans (full recompute)
    second = backward_mms()
    mm_ops = (torch.ops.aten.mm.default, torch.ops.aten.addmm.default)
    left = {u.name: [op[0] for p in u.rplans.values() for op in p.ops[p.last + 1 :]] for u in eng.units}
    # Each Block's plan leaves out fc2's forward matmul and the residual add (the head's, its only matmul).
    for name in ("blocks.0", "blocks.1"):
        assert torch.ops.aten.addmm.default in left[name] and torch.ops.aten.add.Tensor in left[name], left[name]
    assert first - second == sum(f in mm_ops for ops in left.values() for f in ops) >= 2, (first, second)
    eng.close()


class _Branchy(nn.Module):
    """Its forward's ops depend on a Python flag the record cannot see: the plan must be caught diverging."""

    flip = False

    def __init__(self, d: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(d, 2 * d)
        self.fc2 = nn.Linear(2 * d, d)

    def forward(self, x):
        h = self.fc1(x)
        if _Branchy.flip:
            return x + self.fc2(torch.exp(h * 0.1))  # exp saves its result: the last matmul's input differs
        return x + self.fc2(torch.tanh(h))


class _WithCustomFn(nn.Module):
    """A custom autograd.Function that keeps a tensor on ctx where no hook sees it: never skipped."""

    class Scale(torch.autograd.Function):
        @staticmethod
        def forward(ctx, a, b):
            ctx.b = b  # not save_for_backward: invisible to saved-tensor hooks
            return a * 2

        @staticmethod
        def backward(ctx, g):
            return g * ctx.b.mean(), None

    def __init__(self, d: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(d, d)
        self.fc2 = nn.Linear(d, d)

    def forward(self, x):
        h = self.fc1(x)
        last = self.fc2(h)  # computed after everything autograd saves; its value is read only by ctx.b
        return self.Scale.apply(h, last) + last


class _Stack(nn.Module):
    def __init__(self, cls, d: int = 8, n: int = 3) -> None:
        super().__init__()
        self.blocks = nn.ModuleList([cls(d) for _ in range(n)])
        self.head = nn.Linear(d, 1)

    def forward(self, x):
        for b in self.blocks:
            x = b(x)
        return self.head(x)


def _train_stack(model, skip: bool, steps: int, flip_at: int | None = None, **cfg):
    eng = apply_offload(model, device="cpu", lr=1e-2, recompute_skip=skip, units=[f"blocks.{i}" for i in range(len(model.blocks))],
                        **cfg)
    g = torch.Generator().manual_seed(1)
    losses = []
    for s in range(steps):
        _Branchy.flip = flip_at is not None and s >= flip_at
        x = torch.randn(5, 8, generator=g)
        loss = model(x).pow(2).mean()
        loss.backward()
        eng.step()
        losses.append(loss.item())
    _Branchy.flip = False
    out = losses, {k: v.clone() for k, v in eng.master_state_dict().items()}, eng.recompute_skipped, eng
    return out


def _same_as_full(cls, flip_at=None, hook=None, steps: int = 5, **cfg):
    """Train a stack of `cls` with and without skipping (`cfg`: more apply_offload options); everything must match,
    the global random generator's state after training included. Returns (ops left out, the skip run's model, the
    full run's model, the skip run's plans as (unit, skippable, ops left out)); `hook(model, seen)` may collect
    values in `seen`, compared between the runs."""
    torch.manual_seed(7)
    base = _Stack(cls)
    runs = []
    for skip in (True, False):
        m = copy.deepcopy(base)
        seen: dict = {}
        if hook is not None:
            hook(m, seen)
        torch.manual_seed(11)  # dropout draws from the global generator
        losses, master, skipped, eng = _train_stack(m, skip, steps, flip_at=flip_at, **cfg)
        plans = [(u.name, p.skippable, p.skipped) for u in eng.units for p in u.rplans.values()]
        runs.append((losses, master, skipped, m, plans, seen, torch.get_rng_state()))
        eng.close()
    (l_on, m_on, skipped, mod_on, plans, seen_on, rng_on), (l_off, m_off, _, mod_off, _, seen_off, rng_off) = runs
    assert l_on == l_off
    for k in m_off:
        assert torch.equal(m_on[k], m_off[k]), k
    for (n, b_on), b_off in zip(mod_on.named_buffers(), mod_off.buffers()):
        assert torch.equal(b_on, b_off), n
    for k in seen_off:
        assert torch.equal(seen_on[k], seen_off[k]), k
    assert torch.equal(rng_on, rng_off)  # the generators advanced the same (reruns start from the same state)
    return skipped, mod_on, mod_off, plans


def test_a_recompute_that_leaves_the_record_runs_again_in_full():
    skipped, _, _, _ = _same_as_full(_Branchy, flip_at=3, steps=6)
    assert skipped > 0


def test_a_custom_autograd_function_turns_skipping_off_for_its_unit():
    skipped, _, _, plans = _same_as_full(_WithCustomFn, steps=4)
    assert skipped == 0 and plans and not any(sk for _, sk, _ in plans)


def test_a_saved_tensor_from_a_left_out_op_is_caught():
    # A plan whose `last` is forced too early (as if the record had missed a saved tensor): the check on the
    # saved tensors must abandon the recompute and run it in full, never use an uncomputed value.
    lin = nn.Linear(4, 4)
    x = torch.randn(3, 4, requires_grad=True)

    def fn():
        return torch.exp(lin(x))  # exp saves its output

    plans: dict = {}
    out, n = _recompute.run(plans, "k", fn, lambda o: [o])
    plan = plans["k"]
    assert n == 0 and plan.skipped == 0  # exp's saved output makes every op matter
    plan.last, plan.skipped = 0, 1  # corrupt: pretend everything after op 0 is dead
    out2, n2 = _recompute.run(plans, "k", fn, lambda o: [o])
    assert n2 == 0 and "k" in plans and plans["k"] is not plan  # ran in full, recorded again
    g1 = torch.autograd.grad(out.sum(), x)[0]
    g2 = torch.autograd.grad(out2.sum(), x)[0]
    assert torch.equal(g1, g2)


def test_left_out_ops_whose_input_shapes_changed_are_run_in_full():
    # The same ops, but a Python-side width changes the shapes after the last op that matters: the recorded
    # shapes no longer hold, so the recompute runs in full (a left-out op must never hand back a wrong shape).
    lin = nn.Linear(4, 6)
    x = torch.randn(3, 4, requires_grad=True)
    width = [2]

    def fn():
        return lin(x)[:, : width[0]] * 2.0  # the slice is a view (runs); the multiply is left out

    plans: dict = {}
    _recompute.run(plans, "k", fn, lambda o: [o])
    out, n = _recompute.run(plans, "k", fn, lambda o: [o])
    assert n > 0 and out.shape == (3, 2)
    width[0] = 5
    out, n = _recompute.run(plans, "k", fn, lambda o: [o])
    assert n == 0 and out.shape == (3, 5)
    g = torch.autograd.grad(out.sum(), x)[0]
    assert torch.equal(g, torch.autograd.grad((lin(x)[:, :5] * 2.0).sum(), x)[0])


# --- what the record must see (session 9's review reproduced each of these as a wrong value or a crash) -----
class _Two(nn.Module):
    def __init__(self, d: int) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(d, 2 * d), nn.Linear(2 * d, d)


class _Ema(_Two):
    """A buffer written twice in the recompute (decay, then add a statistic of a late value)."""

    def __init__(self, d: int) -> None:
        super().__init__(d)
        self.register_buffer("ema", torch.zeros(d))

    def forward(self, x):
        y = self.fc2(torch.tanh(self.fc1(x)))
        with torch.no_grad():
            self.ema.mul_(0.9).add_(0.1 * y.mean(0))
        return x + y


class _Stash(_Two):
    """Keeps a late intermediate as a module attribute (for logging)."""

    def forward(self, x):
        y = self.fc2(torch.tanh(self.fc1(x)))
        self.act_rms = y.detach().pow(2).mean().sqrt()
        return x + y


class _GradHook(_Two):
    """A tensor hook whose closure reads a late value."""

    def forward(self, x):
        h = torch.tanh(self.fc1(x))
        y = self.fc2(h)
        scale = 1.0 / (1.0 + y.detach().abs().mean())
        if h.requires_grad:
            h.register_hook(lambda g: g * scale)
        return x + y


class _BnFlip(_Two):
    """Running statistics (written in the recompute) and a Python flag that changes the ops before the skip point."""

    def __init__(self, d: int) -> None:
        super().__init__(d)
        self.bn = nn.BatchNorm1d(d)

    def forward(self, x):
        h = self.fc1(self.bn(x))
        h = torch.exp(h * 0.1) if _Branchy.flip else torch.tanh(h)
        return x + self.fc2(h)


def test_buffer_written_twice_gets_the_full_recomputes_values():
    skipped, _, _, plans = _same_as_full(_Ema)
    # a unit writing a buffer is never skipped (a recompute that diverged after the write could not run again)
    assert skipped == 0 and plans and not any(sk for _, sk, _ in plans)


def test_a_late_value_kept_as_a_module_attribute_turns_skipping_off():
    skipped, mod_on, mod_off, plans = _same_as_full(_Stash)
    for b_on, b_off in zip(mod_on.blocks, mod_off.blocks):  # the last recompute's values, kept by the module
        assert torch.equal(b_on.act_rms, b_off.act_rms)
    assert skipped == 0 and plans and not any(sk for _, sk, _ in plans)


def test_a_tensor_hook_reading_a_late_value_turns_skipping_off():
    skipped, _, _, plans = _same_as_full(_GradHook)
    assert skipped == 0 and plans and not any(sk for _, sk, _ in plans)


def test_a_module_forward_hook_turns_skipping_off():
    def hook(model, seen):
        for i, b in enumerate(model.blocks):
            b.fc2.register_forward_hook(lambda m, inp, out, i=i: seen.__setitem__(i, out.detach().clone()))

    skipped, _, _, _ = _same_as_full(_Branchy, hook=hook)  # the hooks' last values (from the recompute) compared
    assert skipped == 0


def test_running_stats_and_a_changed_prefix_train_on():
    _same_as_full(_BnFlip, flip_at=2)


def test_scalar_arguments_are_part_of_the_record():
    class Pad(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(8, 8)

        def forward(self, x, pad: int):
            return nn.functional.pad(self.fc(x), (0, pad))  # constant_pad_nd: left out

    class M(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.blocks = nn.ModuleList([Pad()])

        def forward(self, x, pad):
            return self.blocks[0](x, pad).sum(1)

    losses = {}
    for skip in (True, False):
        torch.manual_seed(0)
        m = M()
        eng = apply_offload(m, device="cpu", lr=1e-2, recompute_skip=skip, units=["blocks.0"])
        g = torch.Generator().manual_seed(2)
        out = []
        for pad in (2, 2, 5, 5):
            loss = (m(torch.randn(4, 8, generator=g), pad) ** 2).mean()
            loss.backward()
            eng.step()
            out.append(loss.item())
        losses[skip] = out
        eng.close()
    assert losses[True] == losses[False]


def test_plans_without_anything_to_leave_out_are_not_recorded_again_and_plans_are_capped():
    lin = nn.Linear(4, 4)
    x = torch.randn(3, 4, requires_grad=True)
    made = []
    orig = _recompute.Plan.__init__

    def counting(self):
        made.append(1)
        orig(self)

    _recompute.Plan.__init__ = counting
    try:
        plans: dict = {}
        for _ in range(4):
            _recompute.run(plans, "k", lambda: torch.exp(lin(x)), lambda o: [o])  # exp saves its result: nothing dead
        assert len(made) == 1
        for n in range(2 * _recompute.MAX_PLANS):
            _recompute.run(plans, n, lambda: lin(x) * 2.0, lambda o: [o])
        assert len(plans) == _recompute.MAX_PLANS
    finally:
        _recompute.Plan.__init__ = orig


class _ToList(_Two):
    """Reads a late value's memory from Python with no op (.tolist() of a CPU tensor) into a global log."""

    log: ClassVar[list] = []

    def forward(self, x):
        y = self.fc2(torch.tanh(self.fc1(x)))
        _ToList.log.append(y.detach()[0].tolist())
        return x + y


def test_a_late_value_read_by_tolist_is_computed():
    logs = []

    def hook(model, seen):
        _ToList.log = []
        logs.append(_ToList.log)

    _same_as_full(_ToList, hook=hook)
    assert logs[0] == logs[1] and len(logs[0]) > 0  # every forward and recompute read the same numbers
    assert _recompute._active() is None  # outside a recompute the wrappers go straight through
    t = torch.randn(3)
    assert t.tolist() == t.numpy().tolist()


class _CondHook(_Two):
    """Registers a tensor hook reading a late value only from some step on: the record did not see it."""

    on = False

    def forward(self, x):
        h = torch.tanh(self.fc1(x))
        y = self.fc2(h)
        scale = 1.0 / (1.0 + y.detach().abs().mean())
        if _CondHook.on and h.requires_grad:
            h.register_hook(lambda g: g * scale)
        return x + y


def test_a_hook_first_registered_after_the_record_runs_in_full():
    class Flip(_CondHook):
        def forward(self, x):
            _CondHook.on = _Branchy.flip  # _train_stack sets the flag from step `flip_at` on
            return super().forward(x)

    skipped, _, _, plans = _same_as_full(Flip, flip_at=2)
    _CondHook.on = False
    assert skipped > 0 and plans and not any(sk for _, sk, _ in plans)  # skipped before, never after


class _Deque(_Two):
    """Keeps late values in a deque inside a dict attribute."""

    def __init__(self, d: int) -> None:
        super().__init__(d)
        self.cache = {"acts": collections.deque(maxlen=2)}

    def forward(self, x):
        y = self.fc2(torch.tanh(self.fc1(x)))
        self.cache["acts"].append(y.detach())
        return x + y


def test_late_values_kept_in_nested_containers_turn_skipping_off():
    skipped, mod_on, mod_off, _ = _same_as_full(_Deque)
    assert skipped == 0
    for b_on, b_off in zip(mod_on.blocks, mod_off.blocks):
        assert all(torch.equal(a, b) for a, b in zip(b_on.cache["acts"], b_off.cache["acts"]))


class _Moe(nn.Module):
    """Top-1 routing (data-dependent shapes after the skip point make replays diverge) with dropout drawn in the
    recompute: with preserve_rng=False a rerun must not draw twice."""

    def __init__(self, d: int, e: int = 3) -> None:
        super().__init__()
        self.drop = nn.Dropout(0.2)
        self.router = nn.Linear(d, e)
        self.experts = nn.ModuleList([nn.Linear(d, d) for _ in range(e)])

    def forward(self, x):
        h = self.drop(x)
        w, idx = self.router(h).softmax(-1).topk(1, -1)
        out = torch.zeros_like(h)
        for i, ex in enumerate(self.experts):
            sel = (idx[:, 0] == i).nonzero().squeeze(1)
            out.index_add_(0, sel, ex(h.index_select(0, sel)) * w.index_select(0, sel))
        return x + out


@pytest.mark.parametrize("preserve_rng", [True, False])
def test_routing_and_dropout_with_reruns_match(preserve_rng):
    _same_as_full(_Moe, steps=6, preserve_rng=preserve_rng)


class _LateAppend(_Two):
    """Appends a late value to a list attribute only from some step on (after the record)."""

    def __init__(self, d: int) -> None:
        super().__init__(d)
        self.acts: list = []

    def forward(self, x):
        y = self.fc2(torch.tanh(self.fc1(x)))
        if _Branchy.flip:
            self.acts.append(y)  # no op (a .detach() would be one, and the replay would see the trace change)
        return x + y


def test_a_late_value_appended_after_the_record_holds_computed_values():
    # The replay that finds it has already appended its uncomputed output: the full rerun fills it in.
    _, mod_on, mod_off, plans = _same_as_full(_LateAppend, flip_at=3)
    assert plans and not any(sk for _, sk, _ in plans)
    for b_on, b_off in zip(mod_on.blocks, mod_off.blocks):
        assert len(b_on.acts) == len(b_off.acts) + 1  # the step that found it ran the unit's forward once more
        for v in b_on.acts:
            assert any(torch.equal(v, f) for f in b_off.acts)


def test_the_watch_wrappers_keep_names_and_do_not_break_torch_compile():
    # The wrappers stay installed for the process: they must look like the methods they wrap, and Dynamo (which
    # lists Tensor's C methods once) must still trace an unbound call. Fresh process: nothing compiled before.
    code = (
        "import torch\n"
        "from vbhal.nn import _recompute\n"
        "_recompute._install()\n"
        "assert torch.Tensor.tolist.__name__ == 'tolist' and torch.Tensor.register_hook.__doc__\n"
        "f = torch.compile(lambda x: torch.Tensor.numpy(x * 2), fullgraph=True)\n"
        "print(f(torch.ones(3)).tolist())\n"
    )
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-c", code], check=False, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-1500:]
    assert "[2.0, 2.0, 2.0]" in out.stdout
