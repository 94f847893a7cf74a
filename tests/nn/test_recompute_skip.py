"""The backward recompute leaves out the ops whose results nothing reads (vbhal/nn/_recompute.py): gradients
bitwise the same as the full recompute and as plain training, the dead ops really left out, and every way a
recorded plan can stop holding caught (run again in full)."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from vbhal.nn import _recompute
from vbhal.nn.offload import apply_offload

from test_offload import TinyLM, _batches, _train_offload, _train_plain

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
    eng = apply_offload(model, device="cpu", lr=1e-2)
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


def _train_stack(model, skip: bool, steps: int, flip_at: int | None = None):
    eng = apply_offload(model, device="cpu", lr=1e-2, recompute_skip=skip, units=[f"blocks.{i}" for i in range(3)])
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


def test_a_recompute_that_leaves_the_record_runs_again_in_full():
    torch.manual_seed(5)
    base = _Stack(_Branchy)
    l_on, m_on, skipped, eng = _train_stack(copy.deepcopy(base), True, 6, flip_at=3)
    eng.close()
    l_off, m_off, _, eng = _train_stack(copy.deepcopy(base), False, 6, flip_at=3)
    eng.close()
    assert skipped > 0
    assert l_on == l_off
    for k in m_off:
        assert torch.equal(m_on[k], m_off[k]), k


def test_a_custom_autograd_function_turns_skipping_off_for_its_unit():
    torch.manual_seed(6)
    base = _Stack(_WithCustomFn)
    l_on, m_on, skipped, eng = _train_stack(copy.deepcopy(base), True, 4)
    assert skipped == 0
    assert all(not p.skipped for u in eng.units for p in u.rplans.values())
    eng.close()
    l_off, m_off, _, eng = _train_stack(copy.deepcopy(base), False, 4)
    eng.close()
    assert l_on == l_off
    for k in m_off:
        assert torch.equal(m_on[k], m_off[k]), k


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
