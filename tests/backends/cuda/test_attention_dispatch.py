"""The attention dispatcher's choice (host-only logic) and its table file."""

from __future__ import annotations

import json

import pytest
import torch

pytest.importorskip("triton", reason="the dispatcher asks the Triton kernel which head dims it takes")

from vbhal.backends.cuda import attention_dispatch as D  # noqa: E402

GPU = "NVIDIA H100 80GB HBM3"
TABLE = {"devices": {GPU: {"entries": [
    {"dtype": "bfloat16", "head_dim": 128, "causal": True, "gqa": False, "seq": 1024, "fwd": "sdpa_flash",
     "fwdbwd": "sdpa_cudnn"},
    {"dtype": "bfloat16", "head_dim": 128, "causal": True, "gqa": False, "seq": 8192, "fwd": "vbhal",
     "fwdbwd": "sdpa_cudnn"},
    {"dtype": "bfloat16", "head_dim": 128, "causal": True, "gqa": True, "seq": 2048, "fwd": "sdpa_flash",
     "fwdbwd": "vbhal"},
]}}}


def choose(**kw):
    base = dict(dtype=torch.bfloat16, head_dim=128, seq=4096, causal=True, gqa=False, device_name=GPU, table=TABLE)
    return D.choose(**{**base, **kw})[0]


def test_table_entry_nearest_in_log_length_and_per_mode():
    assert choose(seq=900) == "sdpa_flash"
    assert choose(seq=2000) == "sdpa_flash"      # log2: nearer 1k than 8k
    assert choose(seq=4000) == "vbhal"           # log2(4000) is nearer 8192 than 1024
    assert choose(seq=60000) == "vbhal"
    assert choose(seq=60000, needs_grad=True) == "sdpa_cudnn"


def test_gqa_uses_its_own_entries_or_ours():
    assert choose(gqa=True, needs_grad=True) == "vbhal"
    assert choose(gqa=True) == "sdpa_flash"
    assert choose(gqa=True, causal=False) == "vbhal"   # no measurement: ours (no K/V repeat)


def test_rules_that_override_the_table():
    assert choose(packed=True) == "vbhal"
    assert choose(has_mask=True) == "sdpa_default"
    assert choose(dtype=torch.float32) == "sdpa_default"
    assert choose(head_dim=96) == "sdpa_default"
    assert choose(head_dim=96, packed=True) == "sdpa_default"  # per-document SDPA


def test_unknown_gpu_keeps_sdpa_default():
    assert choose(device_name="Some Other GPU") == "sdpa_default"
    assert choose(device_name="Some Other GPU", gqa=True) == "vbhal"


def test_committed_table_is_well_formed():
    table = D.load_table()
    for name, dev in table.get("devices", {}).items():
        for e in dev["entries"]:
            assert {"dtype", "head_dim", "causal", "seq"} <= set(e), (name, e)
            for mode in ("fwd", "fwdbwd"):
                if mode in e:
                    assert e[mode] in D.IMPLEMENTATIONS, (name, e)


def test_cpu_tensors_go_to_the_cpu_backend():
    q = torch.randn(1, 2, 5, 8)
    out = D.attention(q, q, q, causal=True)
    ref = torch.nn.functional.scaled_dot_product_attention(q, q, q, is_causal=True)
    assert torch.allclose(out, ref, atol=1e-6)


def _row(p, tf, mode="fwd", **extra):
    return {"provider": p, "head_dim": 128, "causal": True, "gqa": False, "seq": 4096, "mode": mode, "tflops": tf,
            **extra}


def _make(tmp_path, rows, **kw):
    from benchmarks.make_attention_table import make_table

    src = tmp_path / "bench.json"
    src.write_text(json.dumps({"meta": {"device": GPU, "dtype": "bfloat16", "torch": "2.11"}, "rows": rows}))
    table = make_table([src], **kw)
    (entry,) = table["devices"][GPU]["entries"]
    return table["devices"][GPU], entry


def test_make_table_routes_away_only_for_a_clear_margin(tmp_path):
    rows = [_row("sdpa_default", 300.0), _row("sdpa_flash", 280.0), _row("sdpa_cudnn", 330.0), _row("vbhal", 305.0),
            _row("sdpa_efficient", 0.0) | {"error": "RuntimeError"}]
    rows = [r for r in rows if r["tflops"]] + [
        _row("sdpa_default", 300.0, "fwdbwd"), _row("vbhal", 315.0, "fwdbwd")]  # +5%: inside the 6% margin
    dev, entry = _make(tmp_path, rows, source="round X")
    assert entry["fwd"] == "sdpa_cudnn" and entry["fwdbwd"] == "sdpa_default"
    assert dev["margin"] == 0.06 and dev["source"] == "round X" and "rule" in dev


def test_make_table_compares_with_the_best_measurement_of_the_default_call(tmp_path):
    # cuDNN is 8% above sdpa_default, but the same default call timed again (default2, and the
    # dispatcher where it ran the default) reached within 6% of it: noise, keep the default.
    rows = [_row("sdpa_default", 300.0), _row("sdpa_cudnn", 324.0), _row("sdpa_default2", 310.0)]
    assert _make(tmp_path, rows)[1]["fwd"] == "sdpa_default"
    rows = [_row("sdpa_default", 300.0), _row("sdpa_cudnn", 324.0), _row("vbhal_dispatch", 310.0)]
    assert _make(tmp_path, rows)[1]["fwd"] == "sdpa_cudnn"  # unknown what the dispatcher ran
    assert _make(tmp_path, rows, dispatch_ran_default=True)[1]["fwd"] == "sdpa_default"
    rows[-1]["dispatch_impl"] = "sdpa_default"
    assert _make(tmp_path, rows)[1]["fwd"] == "sdpa_default"


def test_make_table_never_routes_to_the_backend_sdpa_default_already_runs(tmp_path):
    rows = [_row("sdpa_default", 300.0, default_backend="sdpa_cudnn"), _row("sdpa_cudnn", 360.0),
            _row("vbhal", 330.0)]
    assert _make(tmp_path, rows)[1]["fwd"] == "vbhal"  # +10% over the default; cuDNN is the default itself


def test_dispatcher_ignores_entries_inside_the_margin():
    entry = {"dtype": "bfloat16", "head_dim": 128, "causal": True, "gqa": False, "seq": 4096,
             "fwd": "sdpa_cudnn", "fwd_tflops": {"sdpa_default": 300.0, "sdpa_cudnn": 310.0},
             "fwdbwd": "vbhal", "fwdbwd_tflops": {"sdpa_default": 300.0, "vbhal": 330.0}}
    table = {"devices": {GPU: {"margin": 0.03, "entries": [entry]}}}
    assert choose(table=table) == "sdpa_default"             # +3.3% < MIN_MARGIN: stale/noisy entry
    assert choose(table=table, needs_grad=True) == "vbhal"    # +10%
    entry["fwdbwd_default_best"] = 320.0
    assert choose(table=table, needs_grad=True) == "sdpa_default"


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("backend", ["sdpa_default", "sdpa_efficient"])
def test_sdpa_helper_gqa_with_mask_and_causal_matches_reference(causal, backend):
    from vbhal.backends.cpu.attention import reference_attention

    g = torch.Generator().manual_seed(0)
    q, k, v = torch.randn(2, 4, 9, 8, generator=g), torch.randn(2, 2, 11, 8, generator=g), torch.randn(2, 2, 11, 8, generator=g)
    mask = torch.rand(2, 1, 9, 11, generator=g) > 0.3
    mask[..., 0] = True
    out = D.sdpa(q, k, v, causal=causal, attn_mask=mask, backend=backend)
    ref = reference_attention(q, k, v, causal=causal, attn_mask=mask)
    assert torch.allclose(out.double(), ref, atol=1e-5)


def test_hot_path_plans_once_per_key_and_makes_the_plain_sdpa_call(monkeypatch):
    """Dense calls are validated and planned once per key; repeats go straight to F.sdpa."""
    monkeypatch.setattr(D, "_INTERPRET", True)  # take the CUDA code path with CPU tensors
    monkeypatch.setattr(D, "_PLANS", {})
    planned, sdpa_calls = [], []
    real_plan, real_sdpa = D._plan, D._sdpa
    monkeypatch.setattr(D, "_plan", lambda *a: planned.append(1) or real_plan(*a))
    monkeypatch.setattr(D, "_sdpa", lambda *a, **kw: sdpa_calls.append(kw) or real_sdpa(*a, **kw))
    g = torch.Generator().manual_seed(1)
    q = torch.randn(2, 4, 7, 8, generator=g)
    k, v = torch.randn(2, 2, 7, 8, generator=g), torch.randn(2, 2, 7, 8, generator=g)
    for _ in range(3):
        out = D.attention(q, k, v, causal=True)
    assert len(planned) == 1 and len(sdpa_calls) == 3
    assert sdpa_calls[-1] == {"is_causal": True, "scale": None, "enable_gqa": True}
    ref = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    assert torch.equal(out, ref)
    D.attention(q, k, v, causal=False)  # causality is part of the key
    assert len(planned) == 2


def test_hot_path_validates_each_new_key(monkeypatch):
    from vbhal.backends.cpu.attention import AttentionInputError

    monkeypatch.setattr(D, "_INTERPRET", True)
    monkeypatch.setattr(D, "_PLANS", {})
    q = torch.randn(1, 2, 5, 8)
    D.attention(q, q, q)
    with pytest.raises(AttentionInputError, match="dtypes differ"):
        D.attention(q, q, q.half())  # same shapes, new dtype: a new key, validated
    with pytest.raises(AttentionInputError, match="must divide"):
        D.attention(torch.randn(1, 3, 5, 8), q, q)


def test_hot_path_picks_the_grad_plan_only_when_grad_is_needed(monkeypatch):
    monkeypatch.setattr(D, "_INTERPRET", True)
    monkeypatch.setattr(D, "_PLANS", {})
    ran = []
    monkeypatch.setattr(D, "_choose_cached", lambda needs_grad, **kw: "sdpa_flash" if needs_grad else "sdpa_default")
    monkeypatch.setattr(D, "_run_dense", lambda impl, *a: ran.append(impl))
    q = torch.randn(1, 2, 5, 8)
    D.attention(q, q, q)
    assert ran == []  # sdpa_default: the direct call, not _run_dense
    D.attention(q.requires_grad_(), q, q)
    assert ran == ["sdpa_flash"]
    with torch.no_grad():
        D.attention(q, q, q)
    assert ran == ["sdpa_flash"]


def test_pinned_sdpa_restores_the_priority_order_even_on_error():
    if not hasattr(torch._C, "_get_sdp_priority_order"):
        pytest.skip("this torch cannot set SDPA's priority order")
    before = [int(b) for b in torch._C._get_sdp_priority_order()]
    q = torch.randn(1, 2, 5, 8)
    out = D._pinned_sdpa("sdpa_flash", q, q, q, True, None, False)
    assert torch.allclose(out, torch.nn.functional.scaled_dot_product_attention(q, q, q, is_causal=True))
    with pytest.raises(RuntimeError):
        D._pinned_sdpa("sdpa_cudnn", q, torch.randn(1, 2, 5, 4), q, True, None, False)
    assert [int(b) for b in torch._C._get_sdp_priority_order()] == before
