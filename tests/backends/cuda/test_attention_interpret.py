"""vbhal's Triton flash attention under the Triton interpreter (CPU), against a float64 reference.

The kernels only run under ``TRITON_INTERPRET=1``, which must be set before triton is imported, so
``test_interpreter_suite`` re-runs this file in a subprocess with it set; inside that subprocess
the other tests run (and outside they are skipped with that reason). Shapes are small and blocks are
16 x 16 in the interpreter, so short sequences still cross the causal diagonal, the unmasked middle
and the ragged end. fp16 and fp32 only: the interpreter's tl.dot is wrong for bf16 (bf16 is checked
on the GPU by test_attention_gpu.py). Every kernel output buffer is allocated filled with NaN.
"""

from __future__ import annotations

import os

import pytest
import torch
from interpreter_run import run_file_under_interpreter

INTERP = os.environ.get("TRITON_INTERPRET") == "1"
kernel = pytest.mark.skipif(not INTERP, reason="kernel tests run under TRITON_INTERPRET=1 via test_interpreter_suite")

# max |error| allowed, as a fraction of max(1, max |reference|)
TOL = {torch.float32: 5e-5, torch.float16: 5e-3}


@pytest.mark.interpreter
def test_interpreter_suite():
    run_file_under_interpreter(__file__)


@pytest.fixture(autouse=True)
def _poison_outputs():
    if not INTERP:
        yield
        return
    from vbhal.backends.cuda import attention as A

    A.POISON_OUTPUTS = True
    yield
    A.POISON_OUTPUTS = False


def _inputs(shape_q, shape_kv, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(shape_q, generator=g).to(dtype)
    k = torch.randn(shape_kv, generator=g).to(dtype)
    v = torch.randn(shape_kv, generator=g).to(dtype)
    do = torch.randn(shape_q, generator=g).to(dtype)
    return q, k, v, do


def _compare(fn, ref_fn, q, k, v, do, dtype):
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    out = fn(*leaves)
    out.backward(do)
    ref_leaves = [t.double().requires_grad_() for t in (q, k, v)]
    ref = ref_fn(*ref_leaves)
    ref.backward(do.double())
    for name, got, want in zip(("out", "dq", "dk", "dv"), [out] + [t.grad for t in leaves],
                               [ref] + [t.grad for t in ref_leaves]):
        assert got.dtype == dtype and got.shape == want.shape, name
        assert not torch.isnan(got).any(), f"{name} has NaN: an element was not written"
        err = (got.double() - want).abs().max().item()
        tol = TOL[dtype] * max(1.0, want.abs().max().item())
        assert err <= tol, f"{name}: max error {err:.3g} > {tol:.3g}"


DENSE = [  # B, Hq, Hkv, Sq, Sk, D, causal, dtype
    (1, 2, 2, 37, 37, 16, True, torch.float32),
    (2, 4, 2, 33, 50, 32, False, torch.float16),
    (1, 2, 2, 50, 29, 16, True, torch.float32),    # Sq > Sk, causal (top-left)
    (1, 3, 1, 29, 50, 16, True, torch.float16),    # MQA, Sq < Sk
    (1, 2, 2, 1, 1, 16, False, torch.float32),     # single position
    (1, 2, 1, 64, 64, 64, True, torch.float16),    # exact block multiples, GQA
    (2, 2, 2, 48, 48, 128, False, torch.float32),  # head dim 128
]


@kernel
@pytest.mark.parametrize("case", DENSE, ids=[f"B{c[0]}H{c[1]}/{c[2]}S{c[3]}x{c[4]}D{c[5]}{'c' if c[6] else ''}-{str(c[7])[6:]}"
                                             for c in DENSE])
def test_dense_forward_and_gradients_match_float64(case):
    from vbhal.backends.cpu.attention import reference_attention
    from vbhal.backends.cuda.attention import flash_attention

    b, hq, hkv, sq, sk, d, causal, dtype = case
    q, k, v, do = _inputs((b, hq, sq, d), (b, hkv, sk, d), dtype, seed=sq * 31 + sk)
    _compare(lambda *t: flash_attention(*t, causal=causal), lambda *t: reference_attention(*t, causal=causal),
             q, k, v, do, dtype)


@kernel
@pytest.mark.parametrize("case", [DENSE[0], DENSE[1], DENSE[3]], ids=["causal", "gqa-full", "mqa-sq<sk"])
def test_tma_forward_matches_float64(monkeypatch, case):
    """The forward through TMA descriptors (used on sm_90+ when enabled), simulated by the interpreter."""
    from vbhal.backends.cpu.attention import reference_attention
    from vbhal.backends.cuda.attention import flash_attention

    monkeypatch.setenv("VBHAL_ATTN_TMA", "1")
    b, hq, hkv, sq, sk, d, causal, dtype = case
    q, k, v, do = _inputs((b, hq, sq, d), (b, hkv, sk, d), dtype, seed=sq * 7 + sk)
    _compare(lambda *t: flash_attention(*t, causal=causal), lambda *t: reference_attention(*t, causal=causal),
             q, k, v, do, dtype)


@kernel
@pytest.mark.parametrize("tma", ["0", "1"])
@pytest.mark.parametrize("case", [DENSE[0], DENSE[1], DENSE[3], DENSE[5], DENSE[4]],
                         ids=["causal", "gqa-full", "mqa-sq<sk", "even-gqa", "single"])
def test_pipelined_forward_matches_float64(monkeypatch, case, tma):
    """The forward whose unmasked loop issues the next q @ k^T before the softmax (VBHAL_ATTN_PIPE=1)."""
    from vbhal.backends.cpu.attention import reference_attention
    from vbhal.backends.cuda.attention import flash_attention

    monkeypatch.setenv("VBHAL_ATTN_PIPE", "1")
    monkeypatch.setenv("VBHAL_ATTN_TMA", tma)
    b, hq, hkv, sq, sk, d, causal, dtype = case
    q, k, v, do = _inputs((b, hq, sq, d), (b, hkv, sk, d), dtype, seed=sq * 5 + sk)
    _compare(lambda *t: flash_attention(*t, causal=causal), lambda *t: reference_attention(*t, causal=causal),
             q, k, v, do, dtype)
    cu = _cu([16, 1, 33, 7, 48])
    q, k, v, do = _inputs((105, 4, 16), (105, 2, 16), torch.float32, seed=13)
    _compare(lambda *x: flash_attention(*x, causal=causal, cu_seqlens=cu),
             lambda *x: reference_attention(*x, causal=causal, cu_seqlens=cu), q, k, v, do, torch.float32)


@kernel
@pytest.mark.parametrize("section", [1, 2, 3, 64], ids=["s1", "s2", "s3-partial", "all"])
def test_l2_sections_cover_every_block(monkeypatch, section):
    """Grid in L2 sections (_tile): 5 (batch, head) pairs in sections of 1, 2, 3 (the last one partial)
    or all; every block of the forward, dK/dV and dQ grids must be computed exactly once."""
    from vbhal.backends.cpu.attention import reference_attention
    from vbhal.backends.cuda import attention as A

    monkeypatch.delenv("VBHAL_ATTN_L2_MB", raising=False)
    monkeypatch.setattr(A, "_INTERPRET_SECTION", section)
    for causal, (hq, hkv) in ((True, (5, 5)), (False, (10, 5))):  # dK/dV has 5 K/V pairs, fwd/dQ 5 or 10
        q, k, v, do = _inputs((1, hq, 35, 16), (1, hkv, 35, 16), torch.float32, seed=section + hq)
        _compare(lambda *t: A.flash_attention(*t, causal=causal),
                 lambda *t: reference_attention(*t, causal=causal), q, k, v, do, torch.float32)
    cu = _cu([20, 3, 33])  # packed: 3 documents x 2 heads = 6 pairs
    q, k, v, do = _inputs((56, 2, 16), (56, 2, 16), torch.float32, seed=section)
    _compare(lambda *x: A.flash_attention(*x, causal=True, cu_seqlens=cu),
             lambda *x: reference_attention(*x, causal=True, cu_seqlens=cu), q, k, v, do, torch.float32)


@kernel
def test_custom_scale_and_strided_inputs():
    from vbhal.backends.cpu.attention import reference_attention
    from vbhal.backends.cuda.attention import flash_attention

    # (B, S, H, D) tensors viewed as (B, H, S, D): the kernel must honour strides.
    q, k, v, do = _inputs((2, 21, 4, 32), (2, 21, 2, 32), torch.float32, seed=3)
    q, k, v, do = (t.transpose(1, 2) for t in (q, k, v, do))
    _compare(lambda *t: flash_attention(*t, causal=True, scale=0.3),
             lambda *t: reference_attention(*t, causal=True, scale=0.3), q, k, v, do, torch.float32)


PACKED = [  # lengths, Hq, Hkv, D, causal, dtype
    ([16, 1, 33, 7, 48], 4, 2, 32, True, torch.float32),
    ([5, 37, 1, 20], 2, 2, 16, False, torch.float16),
    ([64], 2, 1, 64, True, torch.float16),
]


def _cu(lengths):
    return torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist(), dtype=torch.int32)


@kernel
@pytest.mark.parametrize("case", PACKED, ids=[f"{c[0]}-{'c' if c[4] else 'n'}" for c in PACKED])
def test_packed_forward_and_gradients_match_float64(case):
    from vbhal.backends.cpu.attention import reference_attention
    from vbhal.backends.cuda.attention import flash_attention

    lens, hq, hkv, d, causal, dtype = case
    cu = _cu(lens)
    t = sum(lens)
    q, k, v, do = _inputs((t, hq, d), (t, hkv, d), dtype, seed=t)
    _compare(lambda *x: flash_attention(*x, causal=causal, cu_seqlens=cu),
             lambda *x: reference_attention(*x, causal=causal, cu_seqlens=cu), q, k, v, do, dtype)


@kernel
@pytest.mark.parametrize("atomic", ["0", "1"])
def test_both_dq_schemes_dense_gqa_and_packed(monkeypatch, atomic):
    """dQ from the separate dQ kernel (0) or from fp32 atomics inside the dK/dV kernel (1)."""
    from vbhal.backends.cpu.attention import reference_attention
    from vbhal.backends.cuda.attention import flash_attention

    monkeypatch.setenv("VBHAL_ATTN_ATOMIC_DQ", atomic)
    q, k, v, do = _inputs((2, 4, 41, 32), (2, 2, 41, 32), torch.float32, seed=11)
    _compare(lambda *t: flash_attention(*t, causal=True), lambda *t: reference_attention(*t, causal=True),
             q, k, v, do, torch.float32)
    cu = _cu([16, 3, 30])
    q, k, v, do = _inputs((49, 4, 16), (49, 1, 16), torch.float16, seed=12)
    _compare(lambda *x: flash_attention(*x, causal=False, cu_seqlens=cu),
             lambda *x: reference_attention(*x, causal=False, cu_seqlens=cu), q, k, v, do, torch.float16)


@kernel
def test_packed_documents_do_not_see_each_other():
    from vbhal.backends.cuda.attention import flash_attention

    lens = [16, 9, 23]
    cu = _cu(lens)
    q, k, v, _ = _inputs((48, 2, 16), (48, 2, 16), torch.float32, seed=5)
    out = flash_attention(q, k, v, cu_seqlens=cu)
    k2, v2 = k.clone(), v.clone()
    k2[16:25] = torch.randn(9, 2, 16)
    v2[16:25] = torch.randn(9, 2, 16) * 10
    out2 = flash_attention(q, k2, v2, cu_seqlens=cu)
    assert torch.equal(out[:16], out2[:16]) and torch.equal(out[25:], out2[25:])
    assert not torch.allclose(out[16:25], out2[16:25])
    # and gradients: loss on document 0 only gives zero gradient to the keys of documents 1 and 2
    kk = k.clone().requires_grad_()
    flash_attention(q, kk, v, cu_seqlens=cu)[:16].sum().backward()
    assert torch.count_nonzero(kk.grad[16:]) == 0 and torch.count_nonzero(kk.grad[:16]) > 0


@kernel
def test_nan_propagates_like_the_reference():
    from vbhal.backends.cuda.attention import flash_attention

    q, k, v, _ = _inputs((1, 2, 40, 16), (1, 2, 40, 16), torch.float32, seed=9)
    k[0, 0, 20, 1] = float("nan")  # one key: causal rows >= 20 see it
    out = flash_attention(q, k, v, causal=True)
    nan_rows = torch.isnan(out[0, 0]).any(-1)
    assert nan_rows[20:].all() and not nan_rows[:20].any()
    assert not torch.isnan(out[0, 1]).any()
    q2 = q.clone()
    q2[0, 1, 7, 0] = float("nan")  # one query: only its own row
    out = flash_attention(q2, k.nan_to_num(), v, causal=False)
    nan_rows = torch.isnan(out[0, 1]).any(-1)
    assert nan_rows[7] and nan_rows.sum() == 1


@kernel
def test_opcheck_fake_and_autograd_registration():
    from vbhal.backends.cuda import attention as A

    q, k, v, _ = _inputs((1, 2, 20, 16), (1, 1, 20, 16), torch.float32, seed=1)
    args = (q.requires_grad_(), k.requires_grad_(), v.requires_grad_(), None, 0, True, 0.25)
    torch.library.opcheck(torch.ops.vbhal.flash_attn_fwd.default, args,
                          test_utils=("test_schema", "test_faketensor", "test_autograd_registration"))


@kernel
def test_torch_compile_fullgraph_matches_eager():
    from vbhal.backends.cuda.attention import flash_attention

    def loss(q, k, v):
        return flash_attention(q, k, v, causal=True).square().sum()

    q, k, v, _ = _inputs((1, 2, 24, 16), (1, 2, 24, 16), torch.float32, seed=2)
    eager = [t.clone().requires_grad_() for t in (q, k, v)]
    comp = [t.clone().requires_grad_() for t in (q, k, v)]
    le = loss(*eager)
    le.backward()
    lc = torch.compile(loss, fullgraph=True, backend="aot_eager")(*comp)
    lc.backward()
    assert torch.allclose(le, lc)
    for a, b in zip(eager, comp):
        assert torch.equal(a.grad, b.grad)


@kernel
def test_inputs_the_kernel_cannot_take_raise_with_a_reason():
    from vbhal.backends.cpu.attention import AttentionInputError
    from vbhal.backends.cuda.attention import flash_attention
    from vbhal.errors import KernelError

    q = torch.randn(1, 4, 8, 16)
    with pytest.raises(AttentionInputError, match="head dims differ"):
        flash_attention(q, torch.randn(1, 4, 8, 32), torch.randn(1, 4, 8, 32))
    with pytest.raises(AttentionInputError, match="must divide"):
        flash_attention(q, torch.randn(1, 3, 8, 16), torch.randn(1, 3, 8, 16))
    with pytest.raises(AttentionInputError, match="dtypes differ"):
        flash_attention(q, q.half(), q)
    with pytest.raises(AttentionInputError, match="floating point"):
        flash_attention(q.long(), q.long(), q.long())
    with pytest.raises(KernelError, match="attn_mask"):
        flash_attention(q, q, q, attn_mask=torch.ones(8, 8, dtype=torch.bool))
    with pytest.raises(KernelError, match="head dim 48"):
        x = torch.randn(1, 2, 8, 48)
        flash_attention(x, x, x)
    p = torch.randn(10, 2, 16)
    with pytest.raises(AttentionInputError, match="strictly increasing"):
        flash_attention(p, p, p, cu_seqlens=torch.tensor([0, 6, 4, 10], dtype=torch.int32))
    with pytest.raises(AttentionInputError, match="start at 0"):
        flash_attention(p, p, p, cu_seqlens=torch.tensor([1, 10], dtype=torch.int32))
    with pytest.raises(AttentionInputError, match="end at"):
        flash_attention(p, p, p, cu_seqlens=torch.tensor([0, 9], dtype=torch.int32))
    with pytest.raises(AttentionInputError, match="max_seqlen=3"):
        flash_attention(p, p, p, cu_seqlens=torch.tensor([0, 4, 10], dtype=torch.int32), max_seqlen=3)


@kernel
def test_swap_into_vbhal_gpt_runs_the_triton_kernel_and_matches():
    import copy

    from vbhal._report import OptimizeReport
    from vbhal.backends.cuda.attention import flash_attention
    from vbhal.nn.attention import swap_attention
    from vbhal.train.model import GPT, GPTConfig

    torch.manual_seed(0)
    ref = GPT(GPTConfig(vocab_size=50, hidden_size=32, num_layers=2, num_heads=2, seq_length=24))
    model = copy.deepcopy(ref)
    calls = []

    def kernel(*a, **kw):
        calls.append(1)
        return flash_attention(*a, **kw)

    assert swap_attention(model, kernel=kernel, report=OptimizeReport()) == 2
    idx = torch.randint(0, 50, (2, 21))
    loss_ref = ref(idx, idx)[1]
    loss = model(idx, idx)[1]
    assert len(calls) == 2 and torch.allclose(loss, loss_ref, atol=1e-5)
    loss.backward()
    loss_ref.backward()
    for (n, p), (_, pr) in zip(model.named_parameters(), ref.named_parameters()):
        assert torch.allclose(p.grad, pr.grad, atol=1e-5), n


def test_config_keys_by_length_bucket_and_l2_sections(monkeypatch):
    """Host-side launch choices: VBHAL_ATTN_CONFIG's most specific key (kernel@hd@causal@S bucket)
    wins; the L2 section holds as many (batch, head) pairs as the budget allows, at least 1, at most all."""
    from vbhal.backends.cuda import attention as A

    assert [A._seq_bucket(s) for s in (17, 1024, 3001, 4096, 5000, 70000)] == [1024, 1024, 4096, 4096, 8192, 16384]
    monkeypatch.setenv("VBHAL_ATTN_CONFIG", "fwd@128@1=128,64,8,3;fwd@128@1@4096=64,64,4,3")
    assert A._config("fwd", 128, True, 4096) == (64, 64, 4, 3)
    assert A._config("fwd", 128, True, 3000) == (64, 64, 4, 3)
    assert A._config("fwd", 128, True, 8192) == (128, 64, 8, 3)
    monkeypatch.setenv("VBHAL_ATTN_L2_MB", "32")
    assert A._section("fwd", 64, 2 * 2**20) == 16
    assert A._section("fwd", 8, 2 * 2**20) == 8
    assert A._section("fwd", 64, 64 * 2**20) == 1
    monkeypatch.setenv("VBHAL_ATTN_L2_MB", "fwd:16,dq:0")
    assert A._section("fwd", 64, 2 * 2**20) == 8
    assert A._section("dq", 64, 2 * 2**20) == 64  # 0: no sections (plain heads-fastest order)
