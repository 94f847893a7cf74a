"""CONTRACT TESTS of the NPU attention kernel against a stand-in torch_npu (see conftest.py).

They check the arguments we pass to ``npu_fusion_attention`` (layout, head_num, scale, keep_prob, mask
polarity, sparse_mode, TND cumulative lengths without the leading 0, GQA without repeated K/V) and the
fallbacks, and compare results and gradients with the float64 reference through the stand-in's CPU
model of the op. They do not verify an Ascend NPU.
"""

from __future__ import annotations

import logging
import math

import pytest
import torch

from vbhal.backends.cpu.attention import AttentionInputError, reference_attention
from vbhal.backends.cpu.attention import attention as cpu_attention
from vbhal.backends.npu import _runtime
from vbhal.backends.npu import attention as npa

TOL = {torch.float32: dict(atol=2e-5, rtol=2e-5), torch.float16: dict(atol=2e-3, rtol=2e-3),
       torch.bfloat16: dict(atol=2e-2, rtol=2e-2)}


def _qkv(b, hq, hkv, sq, sk, d, dtype=torch.float32, grad=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    mk = lambda *s: torch.randn(*s, generator=g).to(dtype).requires_grad_(grad)
    return mk(b, hq, sq, d), mk(b, hkv, sk, d), mk(b, hkv, sk, d)


def _close(out, ref, dtype):
    torch.testing.assert_close(out.double(), ref.double(), **TOL[dtype])


# -- the mask polarity, in its one function ----------------------------------------------------------


def test_to_npu_atten_mask_inverts_polarity_and_picks_the_smallest_shape():
    keep = torch.rand(5, 7, generator=torch.Generator().manual_seed(1)) > 0.5
    m = npa.to_npu_atten_mask(keep, causal=False, batch=2, heads=4, sq=5, sk=7)
    assert m.shape == (5, 7) and m.dtype == torch.bool and m.is_contiguous()
    assert torch.equal(m, ~keep)  # NPU: True = masked out; SDPA: True = keep
    b1 = torch.rand(2, 1, 5, 7, generator=torch.Generator().manual_seed(2)) > 0.5
    m = npa.to_npu_atten_mask(b1, causal=False, batch=2, heads=4, sq=5, sk=7)
    assert m.shape == (2, 1, 5, 7) and torch.equal(m, ~b1)
    pad = torch.rand(2, 1, 1, 7, generator=torch.Generator().manual_seed(3)) > 0.3  # padding mask (B, 1, 1, Sk)
    m = npa.to_npu_atten_mask(pad, causal=False, batch=2, heads=4, sq=5, sk=7)
    assert m.shape == (2, 1, 5, 7) and torch.equal(m, ~pad.expand(2, 1, 5, 7))


def test_to_npu_atten_mask_folds_causal_top_left():
    keep = torch.ones(4, 6, dtype=torch.bool)
    m = npa.to_npu_atten_mask(keep, causal=True, batch=1, heads=1, sq=4, sk=6)
    # query i sees keys j <= i (SDPA's is_causal: top-left)
    assert torch.equal(m, torch.ones(4, 6, dtype=torch.bool).triu(1))


def test_to_npu_atten_mask_rejects_non_broadcastable():
    with pytest.raises(AttentionInputError, match="does not broadcast"):
        npa.to_npu_atten_mask(torch.ones(3, 2, 5, 7, dtype=torch.bool), causal=False, batch=2, heads=4, sq=5, sk=7)
    with pytest.raises(AttentionInputError, match="does not broadcast"):
        npa.to_npu_atten_mask(torch.ones(5, 8, dtype=torch.bool), causal=False, batch=2, heads=4, sq=5, sk=7)


# -- dense BNSD ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("causal,sq,sk", [(False, 9, 9), (True, 9, 9), (True, 5, 11), (True, 11, 5), (False, 6, 13)])
@pytest.mark.parametrize("hq,hkv", [(4, 4), (4, 2), (6, 1)])
def test_dense_calls_bnsd_with_documented_arguments(fake_npu, causal, sq, sk, hq, hkv):
    q, k, v = _qkv(2, hq, hkv, sq, sk, 16)
    out = npa.attention(q, k, v, causal=causal)
    (call,) = fake_npu.calls_of("npu_fusion_attention")
    assert call["input_layout"] == "BNSD" and call["head_num"] == hq
    assert call["key"] is k and call["value"] is v and call["key"].shape[1] == hkv  # GQA: K/V never repeated
    assert call["scale"] == pytest.approx(1 / math.sqrt(16)) and call["keep_prob"] == 1.0
    if causal:
        assert call["sparse_mode"] == npa.SPARSE_MODE_LEFT_UP_CAUSAL == 2
        assert torch.equal(call["atten_mask"], torch.ones(2048, 2048, dtype=torch.bool).triu(1))
    else:
        assert call["sparse_mode"] == 0 and call["atten_mask"] is None
    _close(out, reference_attention(q, k, v, causal=causal), torch.float32)
    assert not _runtime.FALLBACKS


def test_explicit_scale_is_passed(fake_npu):
    q, k, v = _qkv(1, 2, 2, 4, 4, 8)
    out = npa.attention(q, k, v, scale=0.3)
    assert fake_npu.calls_of("npu_fusion_attention")[0]["scale"] == 0.3
    _close(out, reference_attention(q, k, v, scale=0.3), torch.float32)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("shape", [(7, 9), (2, 1, 7, 9), (2, 4, 7, 9)])
def test_bool_mask_is_inverted_for_the_op(fake_npu, causal, shape):
    q, k, v = _qkv(2, 4, 2, 7, 9, 16, seed=5)
    keep = torch.rand(*shape, generator=torch.Generator().manual_seed(7)) > 0.4
    keep[..., 0] = True  # no fully masked rows (those take the reference, see below)
    out = npa.attention(q, k, v, attn_mask=keep, causal=causal)
    (call,) = fake_npu.calls_of("npu_fusion_attention")
    assert call["sparse_mode"] == 0
    want = ~(keep.expand(2, shape[1] if len(shape) == 4 else 1, 7, 9) if len(shape) == 4 else keep)
    if causal:
        want = want | torch.ones(7, 9, dtype=torch.bool).triu(1)
    assert torch.equal(call["atten_mask"], want)
    _close(out, reference_attention(q, k, v, attn_mask=keep, causal=causal), torch.float32)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_dtypes_go_to_the_op(fake_npu, dtype):
    q, k, v = _qkv(1, 4, 2, 8, 8, 32, dtype=dtype)
    out = npa.attention(q, k, v, causal=True)
    assert out.dtype == dtype and len(fake_npu.calls_of("npu_fusion_attention")) == 1
    _close(out, reference_attention(q, k, v, causal=True), dtype)


@pytest.mark.parametrize("causal,mask", [(True, False), (False, True)])
def test_dense_gradients_match_reference(fake_npu, causal, mask):
    q, k, v = _qkv(2, 4, 2, 6, 6, 16, grad=True, seed=11)
    keep = None
    if mask:
        keep = torch.rand(6, 6, generator=torch.Generator().manual_seed(3)) > 0.5
        keep[:, 2] = True
    out = npa.attention(q, k, v, causal=causal, attn_mask=keep)
    go = torch.randn(out.shape, generator=torch.Generator().manual_seed(4))
    gq, gk, gv = torch.autograd.grad(out, (q, k, v), go)
    rq, rk, rv = (t.detach().double().requires_grad_() for t in (q, k, v))
    ref = reference_attention(rq, rk, rv, causal=causal, attn_mask=keep)
    eq, ek, ev = torch.autograd.grad(ref, (rq, rk, rv), go.double())
    for got, exp in ((gq, eq), (gk, ek), (gv, ev)):
        torch.testing.assert_close(got.double(), exp, atol=1e-4, rtol=1e-4)
    assert gk.shape == k.shape  # GQA gradient lands on the Hkv heads


# -- packed TND ---------------------------------------------------------------------------------------


def _packed(lengths, hq, hkv, d, grad=False, seed=0):
    t = sum(lengths)
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(t, h, d, generator=g).requires_grad_(grad) for h in (hq, hkv, hkv))
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
    return q, k, v, cu


@pytest.mark.parametrize("causal", [False, True])
def test_packed_calls_tnd_with_cumulative_lengths_without_leading_zero(fake_npu, causal):
    q, k, v, cu = _packed([3, 5, 1, 7], 4, 2, 16)
    out = npa.attention(q, k, v, causal=causal, cu_seqlens=cu)
    (call,) = fake_npu.calls_of("npu_fusion_attention")
    assert call["input_layout"] == "TND" and call["head_num"] == 4
    assert call["actual_seq_qlen"] == [3, 8, 9, 16] == call["actual_seq_kvlen"]
    assert call["query"].shape == (16, 4, 16) and call["key"].shape == (16, 2, 16)
    if causal:
        assert call["sparse_mode"] == npa.SPARSE_MODE_RIGHT_DOWN_CAUSAL == 3
        assert torch.equal(call["atten_mask"], torch.ones(2048, 2048, dtype=torch.bool).triu(1))
    else:
        assert call["sparse_mode"] == 0 and call["atten_mask"] is None
    _close(out, reference_attention(q, k, v, causal=causal, cu_seqlens=cu), torch.float32)


def test_packed_gradients_match_reference(fake_npu):
    q, k, v, cu = _packed([4, 2, 6], 4, 1, 8, grad=True, seed=2)
    out = npa.attention(q, k, v, causal=True, cu_seqlens=cu)
    go = torch.randn(out.shape, generator=torch.Generator().manual_seed(9))
    grads = torch.autograd.grad(out, (q, k, v), go)
    rq, rk, rv = (t.detach().double().requires_grad_() for t in (q, k, v))
    ref = reference_attention(rq, rk, rv, causal=True, cu_seqlens=cu)
    exp = torch.autograd.grad(ref, (rq, rk, rv), go.double())
    for got, e in zip(grads, exp):
        torch.testing.assert_close(got.double(), e, atol=1e-4, rtol=1e-4)


def test_packed_over_doc_limit_is_split_at_document_boundaries(fake_npu, monkeypatch):
    monkeypatch.setattr(npa, "MAX_VARLEN_DOCS", 2)
    q, k, v, cu = _packed([2, 3, 1, 4, 2], 2, 2, 8, seed=4)
    out = npa.attention(q, k, v, causal=True, cu_seqlens=cu)
    calls = fake_npu.calls_of("npu_fusion_attention")
    assert [c["actual_seq_qlen"] for c in calls] == [[2, 5], [1, 5], [2]]
    assert [c["query"].shape[0] for c in calls] == [5, 5, 2]
    _close(out, reference_attention(q, k, v, causal=True, cu_seqlens=cu), torch.float32)


# -- fallbacks: counted, logged once, numbers identical to the reference path ------------------------


def _assert_fallback(fake_npu, out, expected, substring):
    assert not fake_npu.calls_of("npu_fusion_attention")
    assert torch.equal(out, expected)
    reasons = [r for (kernel, r) in _runtime.FALLBACKS if kernel == "attention"]
    assert len(reasons) == 1 and substring in reasons[0], reasons


def test_float64_falls_back(fake_npu, caplog):
    q, k, v = _qkv(1, 2, 2, 5, 5, 8, dtype=torch.float64)
    with caplog.at_level(logging.WARNING, logger="vbhal.npu"):
        out = npa.attention(q, k, v, causal=True)
        npa.attention(q, k, v, causal=True)
    _assert_fallback(fake_npu, out, cpu_attention(q, k, v, causal=True), "float64")
    assert sum("reference" in r.getMessage() for r in caplog.records) == 1  # warned once
    assert list(_runtime.FALLBACKS.values()) == [2]  # counted every time
    assert any("float64" in line for line in _runtime.fallback_report())


def test_additive_mask_falls_back(fake_npu):
    q, k, v = _qkv(1, 2, 2, 5, 6, 8)
    add = torch.randn(5, 6, generator=torch.Generator().manual_seed(0))
    out = npa.attention(q, k, v, attn_mask=add)
    _assert_fallback(fake_npu, out, cpu_attention(q, k, v, attn_mask=add), "additive")


def test_fully_masked_row_falls_back(fake_npu):
    q, k, v = _qkv(1, 2, 2, 4, 6, 8)
    keep = torch.ones(4, 6, dtype=torch.bool)
    keep[2] = False
    out = npa.attention(q, k, v, attn_mask=keep)
    assert len(fake_npu.calls_of("npu_fusion_attention")) == 0
    exp = cpu_attention(q, k, v, attn_mask=keep)
    assert torch.equal(out.isnan(), exp.isnan()) and torch.equal(out.nan_to_num(), exp.nan_to_num())
    assert any("every key" in r for (_, r) in _runtime.FALLBACKS)


def test_large_head_dim_falls_back(fake_npu):
    q, k, v = _qkv(1, 1, 1, 2, 3, npa.MAX_HEAD_DIM + 16)
    out = npa.attention(q, k, v)
    _assert_fallback(fake_npu, out, cpu_attention(q, k, v), "head dim")


@pytest.mark.parametrize("chip", ["Ascend310P3", "Ascend950PR", "SomethingElse"])
def test_undocumented_chip_falls_back(fake_npu, chip):
    fake_npu.set_chip(chip)
    q, k, v = _qkv(1, 2, 2, 5, 5, 8)
    out = npa.attention(q, k, v, causal=True)
    _assert_fallback(fake_npu, out, cpu_attention(q, k, v, causal=True), "documented for")


@pytest.mark.parametrize("chip", ["Ascend910B2", "Ascend910_9391"])
def test_a2_and_a3_use_the_op(fake_npu, chip):
    fake_npu.set_chip(chip)
    q, k, v = _qkv(1, 2, 2, 5, 5, 8)
    npa.attention(q, k, v)
    assert len(fake_npu.calls_of("npu_fusion_attention")) == 1


def test_invalid_inputs_raise_the_shared_errors(fake_npu):
    q, k, v = _qkv(1, 3, 2, 4, 4, 8)
    with pytest.raises(AttentionInputError, match="must divide"):
        npa.attention(q, k, v)
    q, k, v, cu = _packed([2, 2], 2, 2, 8)
    with pytest.raises(AttentionInputError, match="start at 0"):
        npa.attention(q, k, v, cu_seqlens=cu[1:].contiguous())
    assert not fake_npu.calls_of("npu_fusion_attention")


def test_kernels_table_and_backend_lookup():
    from vbhal.backends.npu import _TABLE

    assert npa.KERNELS == {"attention": npa.attention}
    assert _TABLE.lookup("attention") is npa.attention


def test_new_offsets_tensor_is_never_served_stale_lengths(fake_npu):
    # A new cu_seqlens tensor often reuses a freed one's memory (same data_ptr, _version 0): the
    # host copy of the offsets must follow the tensor, not its address.
    q, k, v, _ = _packed([16], 2, 2, 8)
    ptrs = set()
    for lengths in ([3, 5, 8], [8, 5, 3], [1, 1, 14], [6, 6, 4]):
        want = torch.tensor(lengths).cumsum(0).tolist()
        cu = torch.tensor([0, *want], dtype=torch.int32)
        ptrs.add(cu.data_ptr())
        npa.attention(q, k, v, cu_seqlens=cu)
        assert fake_npu.calls_of("npu_fusion_attention")[-1]["actual_seq_qlen"] == want
        del cu


def test_in_place_change_of_offsets_is_seen(fake_npu):
    q, k, v, cu = _packed([3, 5, 8], 2, 2, 8)
    npa.attention(q, k, v, cu_seqlens=cu)
    cu.copy_(torch.tensor([0, 8, 13, 16], dtype=torch.int32))
    npa.attention(q, k, v, cu_seqlens=cu)
    assert fake_npu.calls_of("npu_fusion_attention")[-1]["actual_seq_qlen"] == [8, 13, 16]


def test_offsets_at_a_reused_address_are_read_again(fake_npu):
    np = pytest.importorskip("numpy")
    q, k, v, _ = _packed([16], 2, 2, 8)
    buf = np.array([0, 3, 8, 16], dtype=np.int32)
    npa.attention(q, k, v, cu_seqlens=torch.from_numpy(buf))
    buf[:] = [0, 8, 13, 16]  # same memory, a new tensor object, _version 0: what a caching allocator produces
    npa.attention(q, k, v, cu_seqlens=torch.from_numpy(buf))
    assert fake_npu.calls_of("npu_fusion_attention")[-1]["actual_seq_qlen"] == [8, 13, 16]


def test_packed_on_a3_falls_back_dense_does_not(fake_npu):
    fake_npu.set_chip("Ascend910_9392")
    q, k, v, cu = _packed([3, 4], 2, 1, 8)
    out = npa.attention(q, k, v, causal=True, cu_seqlens=cu)
    _assert_fallback(fake_npu, out, cpu_attention(q, k, v, causal=True, cu_seqlens=cu), "varlen")
    qd, kd, vd = _qkv(1, 2, 1, 4, 4, 8)
    npa.attention(qd, kd, vd, causal=True)
    assert len(fake_npu.calls_of("npu_fusion_attention")) == 1
