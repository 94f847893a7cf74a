"""The offload engine's training-loop API: clipping, non-finite skip, learning rate, checkpoints (CPU)."""

from __future__ import annotations

import copy
import io
import math

import pytest
import torch
from test_offload import BLOCK_MASTER_BYTES, TinyLM, _batches, _loss
from torch import nn

from vbhal.errors import TierError
from vbhal.nn.offload import OffloadStepInfo, apply_offload


def _plain(model, data, *, lr=1e-2, autocast=False, max_norm=None, lrs=None, accum=1):
    """Reference loop: torch AdamW (fused), clip_grad_norm_, param_group lr changes."""
    opt = torch.optim.AdamW(model.parameters(), lr=lr, fused=True, weight_decay=0.01)
    losses, norms = [], []
    for i, (x, y) in enumerate(data):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            loss = _loss(model, x, y) / accum
        loss.backward()
        losses.append(loss.item())
        if (i + 1) % accum:
            continue
        grads = [p.grad for p in model.parameters() if p.grad is not None]
        if max_norm is not None:
            norms.append(float(torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)))
        else:
            norms.append(float(torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads, 2.0)), 2.0)))
        opt.step()
        opt.zero_grad(set_to_none=True)
        if lrs is not None:
            for g in opt.param_groups:
                g["lr"] = lrs(len(norms))
    return losses, norms


def _offload(model, data, *, lr=1e-2, autocast=False, lrs=None, accum=1, eng=None, **cfg):
    eng = eng or apply_offload(model, device="cpu", lr=lr, weight_decay=0.01, grad_accum_steps=accum, **cfg)
    losses, infos = [], []
    for i, (x, y) in enumerate(data):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            loss = _loss(model, x, y) / accum
        loss.backward()
        info = eng.step()
        eng.zero_grad()
        losses.append(loss.item())
        if (i + 1) % accum:
            assert info is None  # not the last micro-batch
            continue
        assert isinstance(info, OffloadStepInfo)
        infos.append(info)
        if lrs is not None:
            eng.set_lr(lrs(len(infos)))
    eng.synchronize()
    return losses, infos, eng


@pytest.mark.parametrize("autocast", [False, True])
@pytest.mark.parametrize("accum", [1, 3])
def test_clipping_matches_clip_grad_norm_bitwise(autocast, accum):
    torch.manual_seed(20)
    ref = TinyLM()
    off = copy.deepcopy(ref)
    data = _batches(18)
    kw = {"work_dtype": torch.bfloat16} if autocast else {}
    l_ref, n_ref = _plain(ref, data, autocast=autocast, max_norm=0.5, accum=accum)
    l_off, infos, eng = _offload(off, data, autocast=autocast, max_grad_norm=0.5, accum=accum, **kw)
    assert sum(n > 0.5 for n in n_ref) >= 3  # clipping really happened
    assert l_off == l_ref
    assert [i.grad_norm for i in infos] == n_ref
    master = eng.master_state_dict()
    for n, p in ref.named_parameters():
        assert torch.equal(master[n], p.detach()), n
    eng.close()


def test_without_clipping_the_reported_norm_is_the_global_norm():
    torch.manual_seed(21)
    ref = TinyLM()
    off = copy.deepcopy(ref)
    data = _batches(5)
    l_ref, n_ref = _plain(ref, data)
    l_off, infos, eng = _offload(off, data)  # skip_nonfinite=True (default) computes the norm
    assert l_off == l_ref and [i.grad_norm for i in infos] == n_ref
    _, infos2, eng2 = _offload(copy.deepcopy(ref), data, skip_nonfinite=False)
    assert all(i.grad_norm is None and not i.skipped for i in infos2)  # nothing deferred, nothing computed
    eng.close()
    eng2.close()


class _PoisonAfter(nn.Module):
    """Identity whose backward writes inf into the incoming gradient when armed: the units after it (stepped
    first in backward) get finite gradients, the ones before it non-finite ones."""

    def __init__(self) -> None:
        super().__init__()
        self.armed = False

    def forward(self, x):
        if self.armed and x.requires_grad:
            x.register_hook(lambda g: g.index_fill(0, torch.tensor([0]), math.inf))
        return x


class PoisonLM(TinyLM):
    def __init__(self) -> None:
        super().__init__(n=4)
        self.poison = _PoisonAfter()

    def forward(self, idx):
        x = self.emb(idx) + self.pos[: idx.shape[1]]
        for i, b in enumerate(self.blocks):
            x = b(x)
            if i == 1:
                x = self.poison(x)
        return self.head(self.norm(x))


@pytest.mark.parametrize("max_norm", [None, 1.0])
def test_nonfinite_gradient_skips_the_whole_step(max_norm):
    torch.manual_seed(22)
    ref = PoisonLM()
    off = copy.deepcopy(ref)
    data = _batches(8)
    bad_steps = {2, 5}

    opt = torch.optim.AdamW(ref.parameters(), lr=1e-2, fused=True, weight_decay=0.01)
    l_ref, skipped_ref = [], []
    for i, (x, y) in enumerate(data):
        ref.poison.armed = i in bad_steps
        loss = _loss(ref, x, y)
        loss.backward()
        l_ref.append(loss.item())
        if max_norm is not None:
            torch.nn.utils.clip_grad_norm_(ref.parameters(), max_norm)
        bad = not all(bool(torch.isfinite(p.grad).all()) for p in ref.parameters() if p.grad is not None)
        skipped_ref.append(bad)
        if not bad:
            opt.step()
        opt.zero_grad(set_to_none=True)
    assert skipped_ref == [i in bad_steps for i in range(len(data))]
    eng = apply_offload(off, device="cpu", lr=1e-2, weight_decay=0.01, max_grad_norm=max_norm)
    l_off, infos = [], []
    for i, (x, y) in enumerate(data):
        off.poison.armed = i in bad_steps
        loss = _loss(off, x, y)
        loss.backward()
        infos.append(eng.step())
        l_off.append(loss.item())
    assert [i.skipped for i in infos] == skipped_ref
    assert all(math.isfinite(i.grad_norm) != i.skipped for i in infos)
    assert l_off == l_ref
    sd = eng.state_dict()
    assert all(u["step"] == len(data) - len(bad_steps) for u in sd["units"] if u["master"] is not None)
    master = eng.master_state_dict()
    for n, p in ref.named_parameters():
        assert torch.equal(master[n], p.detach()), n
    eng.close()


@pytest.mark.parametrize("skip_nonfinite", [True, False])
def test_set_lr_equals_changing_param_group_lr(skip_nonfinite):
    torch.manual_seed(23)
    ref = TinyLM()
    off = copy.deepcopy(ref)
    data = _batches(12)

    def lrs(k):
        return 1e-2 * (0.5 + 0.5 * math.cos(k / 12 * math.pi))

    l_ref, _ = _plain(ref, data, lrs=lrs)
    l_off, infos, eng = _offload(off, data, lrs=lrs, skip_nonfinite=skip_nonfinite)
    assert l_off == l_ref
    assert [i.lr for i in infos] == [1e-2] + [lrs(k) for k in range(1, 12)]
    master = eng.master_state_dict()
    for n, p in ref.named_parameters():
        assert torch.equal(master[n], p.detach()), n
    with pytest.raises(ValueError, match="finite"):
        eng.set_lr(float("nan"))
    eng.close()


def _roundtrip(sd: dict) -> dict:
    buf = io.BytesIO()
    torch.save(sd, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


@pytest.mark.parametrize("autocast", [False, True])
@pytest.mark.parametrize("cfg", [{}, {"skip_nonfinite": False}, {"max_grad_norm": 0.5}, {"grad_accum_steps": 2}])
def test_checkpoint_resume_is_bitwise_the_same_as_not_stopping(autocast, cfg, tmp_path):
    torch.manual_seed(24)
    base = TinyLM()
    data = _batches(20)
    kw = dict(cfg)
    accum = kw.pop("grad_accum_steps", 1)
    if autocast:
        kw["work_dtype"] = torch.bfloat16

    def lrs(k):
        return 1e-2 / (1 + k)

    whole = copy.deepcopy(base)
    l_all, i_all, eng_all = _offload(whole, data, autocast=autocast, lrs=lrs, accum=accum, **kw)
    first = copy.deepcopy(base)
    l_1, i_1, eng_1 = _offload(first, data[:10], autocast=autocast, lrs=lrs, accum=accum, **kw)
    sd = _roundtrip(eng_1.state_dict())
    eng_1.close()
    torch.manual_seed(99)
    fresh = TinyLM()  # different initial values everywhere: everything must come from the state
    eng_2 = apply_offload(fresh, device="cpu", lr=123.0, weight_decay=0.01, grad_accum_steps=accum, **kw)
    eng_2.load_state_dict(sd)
    assert eng_2.lr == lrs(len(i_1))
    offset = len(i_1)
    l_2, i_2, _ = _offload(fresh, data[10:], autocast=autocast, lrs=lambda k: lrs(k + offset), accum=accum, eng=eng_2)
    assert l_1 + l_2 == l_all
    assert [i.grad_norm for i in i_1 + i_2] == [i.grad_norm for i in i_all]
    m_all, m_2 = eng_all.master_state_dict(), eng_2.master_state_dict()
    assert m_all.keys() == m_2.keys() and all(torch.equal(m_all[k], m_2[k]) for k in m_all)
    eng_all.close()
    eng_2.close()


def test_checkpoint_with_state_on_the_disk_tier(tmp_path):
    torch.manual_seed(25)
    base = TinyLM(n=5)
    data = _batches(8)
    budget = 6 * BLOCK_MASTER_BYTES
    l_all, _, eng_all = _offload(copy.deepcopy(base), data, state_budget_bytes=budget, spill_root=str(tmp_path))
    m1 = copy.deepcopy(base)
    l_1, _, eng_1 = _offload(m1, data[:4], state_budget_bytes=budget, spill_root=str(tmp_path))
    sd = _roundtrip(eng_1.state_dict())
    eng_1.close()
    torch.manual_seed(5)
    m2 = TinyLM(n=5)
    eng_2 = apply_offload(m2, device="cpu", lr=1e-2, weight_decay=0.01, state_budget_bytes=budget, spill_root=str(tmp_path))
    eng_2.load_state_dict(sd)
    l_2, _, _ = _offload(m2, data[4:], eng=eng_2)
    assert l_1 + l_2 == l_all
    eng_all.close()
    eng_2.close()


@pytest.mark.parametrize("units", [3, 4, 6])
def test_load_state_dict_into_a_trained_engine_with_state_on_disk(tmp_path, units):
    # Rolling back an engine that has trained (the stack knows the order, so it evicts the key used furthest
    # ahead -- the one just read): every master and AdamW tensor must come back, wherever it lives.
    torch.manual_seed(25)
    base = TinyLM(n=5)
    data = _batches(8)
    budget = units * BLOCK_MASTER_BYTES
    _, _, e0 = _offload(copy.deepcopy(base), data[:2], state_budget_bytes=budget, spill_root=str(tmp_path))
    sd, want = e0.state_dict(), e0.master_state_dict()
    e0.close()
    _, _, eng = _offload(copy.deepcopy(base), data, state_budget_bytes=budget, spill_root=str(tmp_path))
    assert eng.state_stack._order is not None
    eng.load_state_dict(sd)
    got = eng.master_state_dict()
    assert [k for k in want if not torch.equal(want[k], got[k])] == []
    back = eng.state_dict()
    for a, b in zip(sd["units"], back["units"]):
        for k in ("master", "exp_avg", "exp_avg_sq"):
            assert (a[k] is None and b[k] is None) or torch.equal(a[k], b[k]), k
    eng.state_stack.check_consistency()
    eng.close()


def test_a_state_budget_below_one_unit_is_a_clear_error(tmp_path):
    unit_state = 3 * BLOCK_MASTER_BYTES  # the largest unit's master + exp_avg + exp_avg_sq
    with pytest.raises(TierError, match="state_budget_bytes"):
        apply_offload(TinyLM(n=5), device="cpu", state_budget_bytes=unit_state - 4, spill_root=str(tmp_path))


def test_loading_a_state_of_another_layout_is_a_clear_error():
    eng = apply_offload(TinyLM(n=4), device="cpu")
    sd = eng.state_dict()
    other = apply_offload(TinyLM(n=5), device="cpu")
    with pytest.raises(TierError, match=r"blocks\.4.*only in this model"):
        other.load_state_dict(sd)
    wider = apply_offload(TinyLM(n=4, vocab=41), device="cpu")
    with pytest.raises(TierError, match=r"'emb'.*'weight' has shape \[37, 16\] in the saved state but \[41, 16\]"):
        wider.load_state_dict(sd)
    with pytest.raises(TierError, match="state_dict"):
        eng.load_state_dict({"units": []})
    for e in (eng, other, wider):
        e.close()


def test_state_dict_inside_gradient_accumulation_is_refused():
    m = TinyLM()
    eng = apply_offload(m, device="cpu", grad_accum_steps=2)
    x, y = _batches(1)[0]
    _loss(m, x, y).backward()
    assert eng.step() is None
    with pytest.raises(TierError, match="gradient accumulation"):
        eng.state_dict()
    eng.close()


def test_piecewise_host_step_is_bitwise_torch_adamw(monkeypatch):
    # Pieces of 64 elements over parameters whose sizes are not multiples of 64 (d=18: 1296, 72, 18 ...):
    # the piecewise fused step equals torch.optim.AdamW(fused=True) stepping each tensor, in fp32 and with
    # a bf16 gradient / working copy under autocast.
    import vbhal.nn.offload as off

    monkeypatch.setattr(off, "HOST_STEP_CHUNK", 64)
    for autocast in (False, True):
        torch.manual_seed(26)
        ref = TinyLM(d=18, vocab=29)
        mod = copy.deepcopy(ref)
        data = _batches(10, vocab=29)
        l_ref, _ = _plain(ref, data, autocast=autocast)
        kw = {"work_dtype": torch.bfloat16} if autocast else {}
        l_off, _, eng = _offload(mod, data, autocast=autocast, skip_nonfinite=False, **kw)
        assert l_off == l_ref
        master = eng.master_state_dict()
        for n, p in ref.named_parameters():
            assert torch.equal(master[n], p.detach()), n
        eng.close()
