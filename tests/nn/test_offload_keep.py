"""The keep plan: copies that stay on the device between uses instead of a round trip through host memory
(working copies of device-stepped units across steps, saved inputs and working copies of the last units of the
forward into their backward). Only where data lives changes: the numbers must be bit for bit those of the engine
without a keep plan (CPU test mode: the "device" is the budgeted CPU tier, the device step runs synchronously)."""

from __future__ import annotations

import copy
import io
import sys

import pytest
import torch

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from test_offload import SharedBlockNet, TinyLM, _batches
from test_offload_hybrid import _run, _state_equal

from vbhal.nn import offload as off_mod
from vbhal.nn.offload import apply_offload

BIG = 1 << 30


@pytest.fixture
def small_acts(monkeypatch):
    monkeypatch.setattr(off_mod, "MIN_OFFLOAD_ACT_BYTES", 0)  # TinyLM's inputs are tiny: offload them all


@pytest.mark.parametrize("mode", [{"skip_nonfinite": False}, {}, {"max_grad_norm": 0.3}])
@pytest.mark.parametrize("frac", [0.5, 0.0])
def test_keep_plan_bitwise_equals_no_keep(small_acts, mode, frac):
    torch.manual_seed(11)
    ref = TinyLM(n=4)
    a, b = copy.deepcopy(ref), copy.deepcopy(ref)
    data = _batches(10)
    la, ea = _run(a, data, gpu_step_fraction=frac, resident_cache_bytes=0, offload_activations=True, poison=True, **mode)
    lb, eb = _run(b, data, gpu_step_fraction=frac, resident_cache_bytes=BIG, offload_activations=True, poison=True, **mode)
    assert ea.keep_plan["used_bytes"] == 0 and not any(u.keep or u.keep_act for u in ea.units)
    plan = eb.keep_plan
    gpu = sorted(u.idx for u in eb.units if u.gpu_step)
    assert plan["all"] == gpu and (frac == 0.0 or gpu)
    assert plan["fb"] and plan["acts"], plan
    assert set(plan["fb"]).isdisjoint(plan["all"])
    for u in eb.units:  # kept across the step boundary (and newer than the host copy) exactly when planned
        assert (u.dev_buf is not None) == (u.keep == "all")
        assert u.host_stale == (u.keep == "all")
    assert la == lb
    _state_equal(ea.state_dict(), eb.state_dict())
    ma, mb = ea.master_state_dict(), eb.master_state_dict()
    for k in ma:
        assert torch.equal(ma[k], mb[k]), k
    # Fewer bytes: no fetch of the kept units, no write-back of their working copies, fewer saved inputs moved.
    ra, rb = ea.stats.steps[-1], eb.stats.steps[-1]
    assert rb["bytes_weights_up"] < ra["bytes_weights_up"]
    assert rb["bytes_acts_up"] < ra["bytes_acts_up"] and rb["bytes_acts_down"] < ra["bytes_acts_down"]
    if frac:
        assert rb["bytes_weights_down"] == 0 and rb["kept_bytes"] > 0
    assert not eb.plan_pending and eb.memory_summary()["keep_plan"] is plan
    ea.close()
    eb.close()


def test_keep_budget_bounds_the_plan():
    torch.manual_seed(12)
    ref = TinyLM(n=6)
    data = _batches(4)
    _, e_all = _run(copy.deepcopy(ref), data, gpu_step_fraction=0.5, resident_cache_bytes=BIG)
    unit_bytes = max(u.work_bytes for u in e_all.units if u.gpu_step)
    budget = unit_bytes + 1  # room for one device-stepped unit and nothing bigger
    _, e = _run(copy.deepcopy(ref), data, gpu_step_fraction=0.5, resident_cache_bytes=budget)
    plan = e.keep_plan
    assert len(plan["all"]) == 1 and plan["used_bytes"] <= budget and plan["budget_bytes"] == budget
    kept = sum(u.work_bytes for u in e.units if u.keep)
    assert kept == plan["used_bytes"]
    _, e0 = _run(copy.deepcopy(ref), data, gpu_step_fraction=0.5)  # CPU default: no keep
    assert e0.keep_plan["used_bytes"] == 0
    for x in (e_all, e, e0):
        x.close()


def test_keep_switch_share_and_state_dict_roundtrip(small_acts):
    """Switching the share writes kept working copies home first; loading a checkpoint into an engine with kept
    copies refreshes them; both continue bit for bit like the engine without a keep plan."""
    torch.manual_seed(13)
    ref = TinyLM(n=4)
    data = _batches(12)
    la, ea = _run(copy.deepcopy(ref), data, gpu_step_fraction=0.0, resident_cache_bytes=0, offload_activations=True)
    b = copy.deepcopy(ref)
    lb1, eb = _run(b, data[:5], gpu_step_fraction=0.5, resident_cache_bytes=BIG, offload_activations=True)
    assert eb.keep_plan["all"]
    sd = io.BytesIO()
    torch.save(eb.state_dict(), sd)
    eb.set_gpu_step_fraction(0.0)  # kept copies go home (they are newer than the host copies)
    assert not any(u.keep or u.dev_buf is not None or u.host_stale for u in eb.units) and eb.plan_pending
    lb2, _ = _run(b, data[5:8], eng=eb)
    assert not eb.plan_pending and not eb.keep_plan["all"] and eb.keep_plan["fb"]
    eb.set_gpu_step_fraction(1.0)
    lb3, _ = _run(b, data[8:], eng=eb)
    assert lb1 + lb2 + lb3 == la
    assert len(eb.keep_plan["all"]) == sum(1 for u in eb.units if u.n_train)
    # Resume the step-5 checkpoint into the (kept, hybrid) engine: its resident copies must follow.
    sd.seek(0)
    eb.load_state_dict(torch.load(sd, weights_only=True))
    assert all(not u.host_stale for u in eb.units)
    lb4, _ = _run(b, data[5:], eng=eb)
    assert lb1 + lb4 == la
    _state_equal(ea.state_dict(), eb.state_dict())
    ea.close()
    eb.close()


@pytest.mark.parametrize("checkpoint", [True, False])
def test_keep_with_unit_called_twice(checkpoint):
    torch.manual_seed(14)
    ref = SharedBlockNet()
    xs = [torch.randn(4, 16) for _ in range(8)]

    def run(**kw):
        m = copy.deepcopy(ref)
        eng = apply_offload(m, device="cpu", lr=1e-2, checkpoint=checkpoint, skip_nonfinite=False, **kw)
        out = []
        for x in xs:
            loss = m(x)
            loss.backward()
            eng.step()
            out.append(loss.item())
        eng.synchronize()
        return out, eng

    la, ea = run(gpu_step_fraction=0.5, resident_cache_bytes=0)
    lb, eb = run(gpu_step_fraction=0.5, resident_cache_bytes=BIG)
    assert eb.keep_plan["all"] and eb.keep_plan["fb"]
    assert la == lb
    _state_equal(ea.state_dict(), eb.state_dict())
    ea.close()
    eb.close()


def test_inference_between_steps_keeps_resident_copies():
    torch.manual_seed(15)
    ref = TinyLM(n=4)
    data = _batches(6)
    la, ea = _run(copy.deepcopy(ref), data, gpu_step_fraction=0.5, resident_cache_bytes=0)
    b = copy.deepcopy(ref)
    lb1, eb = _run(b, data[:3], gpu_step_fraction=0.5, resident_cache_bytes=BIG)
    with torch.no_grad():
        y = b(data[0][0])
    assert torch.isfinite(y).all()
    assert all(u.dev_buf is not None for u in eb.units if u.keep == "all")
    lb2, _ = _run(b, data[3:], eng=eb)
    assert lb1 + lb2 == la
    ea.close()
    eb.close()


def test_replan_measures_the_step_after_next():
    """set_gpu_step_fraction(None) / replan(): the auto choice measures optimizer step step_count + 1 (not step 1
    again, which would decide at once from no measurement), and the keep plan waits for the share."""
    torch.manual_seed(16)
    m = TinyLM(n=4)
    _, eng = _run(m, _batches(5), gpu_step_fraction=0.5, resident_cache_bytes=BIG)
    assert not eng.plan_pending
    eng.set_gpu_step_fraction(None)  # on CPU auto means off, but the measured step is what accelerators use
    assert eng._auto_tag == eng.step_count + 1 == 6
    eng.cfg.gpu_step_fraction = 0.5
    eng.replan()
    assert eng._keep_tag == eng.step_count and eng.plan_pending and eng.keep_plan is None
    _run(m, _batches(1), eng=eng)
    assert not eng.plan_pending and eng.keep_plan["all"]
    eng.close()
