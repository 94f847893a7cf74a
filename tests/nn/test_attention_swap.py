"""swap_attention: vbhal's GPT slot, HuggingFace models (GPT-2, Llama with GQA), nn.MultiheadAttention.

The kernel bound here is the CPU backend's attention wrapped in a call counter, so each test checks
both that the kernel really runs and that outputs and gradients match the unswapped model.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from vbhal._report import OptimizeReport
from vbhal.backends.cpu.attention import attention as cpu_attention
from vbhal.nn.attention import VbhalMultiheadAttention, swap_attention


class CountingKernel:
    def __init__(self):
        self.calls = 0
        self.backend = "test"

    def fn(self, *args, **kwargs):
        self.calls += 1
        return cpu_attention(*args, **kwargs)

    __call__ = fn


def _grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _assert_same(a, b, tol=1e-5):
    assert a.shape == b.shape
    assert (a - b).abs().max().item() <= tol * max(1.0, b.abs().max().item())


def _assert_same_grads(ga, gb, tol=1e-5):
    assert ga.keys() == gb.keys() and ga
    for n in ga:
        _assert_same(ga[n], gb[n], tol)


# ---------------------------------------------------------------- (a) vbhal GPT slot


def test_vbhal_gpt_slot_is_bound_and_matches():
    from vbhal.train.model import GPT, GPTConfig

    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=97, hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2, seq_length=32))
    swapped = copy.deepcopy(model)
    k = CountingKernel()
    report = OptimizeReport()
    assert swap_attention(swapped, kernel=k, report=report) == 2
    assert [c.kind for c in report.changes] == ["attention", "attention"]
    idx = torch.randint(0, 97, (2, 32))
    out_a = model(idx, idx)
    out_b = swapped(idx, idx)
    la = out_a[1] if isinstance(out_a, tuple) else out_a
    lb = out_b[1] if isinstance(out_b, tuple) else out_b
    _assert_same(lb, la)
    la.backward()
    lb.backward()
    _assert_same_grads(_grads(swapped), _grads(model))
    assert k.calls == 2


# ---------------------------------------------------------------- (b) HuggingFace


def _hf_pair(kind):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    if kind == "gpt2":
        cfg = transformers.GPT2Config(vocab_size=101, n_positions=64, n_embd=64, n_layer=2, n_head=4,
                                      attn_pdrop=0.0, resid_pdrop=0.0, embd_pdrop=0.0)
        model = transformers.GPT2LMHeadModel(cfg)
    else:
        cfg = transformers.LlamaConfig(vocab_size=101, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
        model = transformers.LlamaForCausalLM(cfg)
    model.set_attn_implementation("sdpa")
    return model, copy.deepcopy(model)


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
@pytest.mark.parametrize("padded", [False, True])
def test_hf_model_uses_vbhal_and_matches(kind, padded):
    ref, model = _hf_pair(kind)
    k = CountingKernel()
    report = OptimizeReport()
    assert swap_attention(model, kernel=k, report=report) == 2
    assert model.config._attn_implementation == "vbhal"
    assert any("'sdpa' -> 'vbhal'" in c.detail for c in report.changes)
    ids = torch.randint(0, 101, (2, 16))
    mask = torch.ones(2, 16, dtype=torch.long)
    if padded:
        mask[1, :5] = 0  # left padding in the second row
    out_ref = ref(input_ids=ids, attention_mask=mask, labels=ids)
    out = model(input_ids=ids, attention_mask=mask, labels=ids)
    assert k.calls == 2
    keep = mask.bool()
    _assert_same(out.logits[keep], out_ref.logits[keep], 1e-4)
    out_ref.loss.backward()
    out.loss.backward()
    _assert_same_grads(_grads(model), _grads(ref), 1e-4)


def test_hf_generate_with_cache_matches():
    ref, model = _hf_pair("llama")
    swap_attention(model, kernel=CountingKernel(), report=OptimizeReport())
    ids = torch.randint(0, 101, (1, 7))
    a = ref.generate(ids, max_new_tokens=5, do_sample=False)
    b = model.generate(ids, max_new_tokens=5, do_sample=False)
    assert torch.equal(a, b)


def test_hf_dropout_in_training_falls_back_to_transformers_sdpa():
    import vbhal.nn.attention as A

    ref, model = _hf_pair("gpt2")
    model.config.attn_pdrop = 0.1
    for m in model.modules():
        if hasattr(m, "attn_dropout"):
            m.attn_dropout.p = 0.1
    k = CountingKernel()
    swap_attention(model, kernel=k, report=OptimizeReport())
    before = A.hf_fallback_calls
    model.train()
    model(input_ids=torch.randint(0, 101, (1, 8)))
    assert A.hf_fallback_calls - before == 2 and k.calls == 0


# ---------------------------------------------------------------- (c) nn.MultiheadAttention


def _mha_inputs(batch_first, b=2, lq=7, lk=9, e=32, kdim=None):
    torch.manual_seed(1)
    shape = (lambda L, E: (b, L, E)) if batch_first else (lambda L, E: (L, b, E))
    return torch.randn(*shape(lq, e)), torch.randn(*shape(lk, kdim or e)), torch.randn(*shape(lk, kdim or e))


@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize("masks", ["none", "kpm", "bool_attn", "float_attn", "both", "3d"])
def test_mha_matches_original(batch_first, masks):
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(32, 4, batch_first=batch_first)
    holder = nn.Sequential(mha)
    ref = copy.deepcopy(mha)
    k = CountingKernel()
    report = OptimizeReport()
    assert swap_attention(holder, kernel=k, report=report) == 1
    new = holder[0]
    assert isinstance(new, VbhalMultiheadAttention)
    assert new.in_proj_weight is mha.in_proj_weight  # the same parameters, not copies
    q, kk, v = _mha_inputs(batch_first)
    kw = {}
    kpm = torch.zeros(2, 9, dtype=torch.bool)
    kpm[0, -3:] = True
    am = torch.rand(7, 9) > 0.7
    am[:, 0] = False
    if masks in ("kpm", "both"):
        kw["key_padding_mask"] = kpm
    if masks in ("bool_attn", "both"):
        kw["attn_mask"] = am
    if masks == "float_attn":
        kw["attn_mask"] = torch.randn(7, 9)
    if masks == "3d":
        kw["attn_mask"] = torch.randn(2 * 4, 7, 9)
    leaves = [t.clone().requires_grad_() for t in (q, kk, v)]
    rleaves = [t.clone().requires_grad_() for t in (q, kk, v)]
    out, w = new(*leaves, need_weights=False, **kw)
    out_ref, _ = ref(*rleaves, need_weights=False, **kw)
    assert w is None and k.calls == 1
    _assert_same(out, out_ref)
    g = torch.randn_like(out)
    out.backward(g)
    out_ref.backward(g)
    for a, b in zip(leaves, rleaves):
        _assert_same(a.grad, b.grad)
    _assert_same_grads(_grads(new), _grads(ref))


def test_mha_causal_hint_kdim_vdim_and_unbatched():
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(32, 4, kdim=16, vdim=16, batch_first=True)
    ref = copy.deepcopy(mha)
    holder = nn.ModuleDict({"attn": mha})
    swap_attention(holder, kernel=CountingKernel(), report=OptimizeReport())
    q, k, v = _mha_inputs(True, kdim=16)
    _assert_same(holder["attn"](q, k, v, need_weights=False)[0], ref(q, k, v, need_weights=False)[0])
    x = torch.randn(2, 9, 32)
    causal = nn.Transformer.generate_square_subsequent_mask(9)
    sa, sref = VbhalMultiheadAttention.from_module(nn.MultiheadAttention(32, 4, batch_first=True), CountingKernel()), None
    sref = nn.MultiheadAttention(32, 4, batch_first=True)
    sref.load_state_dict(sa.state_dict())
    _assert_same(sa(x, x, x, attn_mask=causal, is_causal=True, need_weights=False)[0],
                 sref(x, x, x, attn_mask=causal, is_causal=True, need_weights=False)[0])
    xu = torch.randn(9, 32)  # unbatched
    _assert_same(sa(xu, xu, xu, need_weights=False)[0], sref(xu, xu, xu, need_weights=False)[0])


def test_mha_need_weights_and_training_dropout_use_original_path():
    mha = nn.MultiheadAttention(32, 4, dropout=0.1, batch_first=True)
    holder = nn.Sequential(mha)
    k = CountingKernel()
    report = OptimizeReport()
    swap_attention(holder, kernel=k, report=report)
    assert "dropout>0" in report.changes[0].detail
    new = holder[0]
    x = torch.randn(2, 5, 32)
    new.eval()
    out, w = new(x, x, x)  # need_weights defaults to True
    assert w is not None and w.shape == (2, 5, 5) and new.fallback_calls == 1 and k.calls == 0
    new.train()
    new(x, x, x, need_weights=False)
    assert new.fallback_calls == 2 and k.calls == 0
    new.eval()
    new(x, x, x, need_weights=False)
    assert k.calls == 1


def test_mha_unsupported_options_are_left_and_reported():
    model = nn.Sequential(nn.MultiheadAttention(16, 2, add_bias_kv=True), nn.MultiheadAttention(16, 2, add_zero_attn=True))
    report = OptimizeReport()
    assert swap_attention(model, kernel=CountingKernel(), report=report) == 0
    assert [type(m) for m in model] == [nn.MultiheadAttention, nn.MultiheadAttention]
    assert [c.kind for c in report.changes] == ["skip", "skip"]
    assert "add_bias_kv" in report.changes[0].detail and "add_zero_attn" in report.changes[1].detail


def test_transformer_encoder_layer_swapped_matches():
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(32, 4, dim_feedforward=64, dropout=0.0, batch_first=True)
    ref = copy.deepcopy(layer)
    k = CountingKernel()
    swap_attention(layer, kernel=k, report=OptimizeReport())
    x = torch.randn(2, 11, 32, requires_grad=True)
    mask = nn.Transformer.generate_square_subsequent_mask(11)
    out = layer(x, src_mask=mask, is_causal=True)
    out_ref = ref(x, src_mask=mask, is_causal=True)
    _assert_same(out, out_ref)
    assert k.calls == 1


def test_hf_llama_under_autocast_bf16_matches_sdpa():
    """Llama hands q/k in float32 (RoPE) and v in bf16 under autocast: cast like SDPA, not an error."""
    ref, model = _hf_pair("llama")
    k = CountingKernel()
    swap_attention(model, kernel=k, report=OptimizeReport())
    ids = torch.randint(0, 101, (2, 12))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(input_ids=ids).logits
        out_ref = ref(input_ids=ids).logits
    assert k.calls == 2
    assert (out.float() - out_ref.float()).abs().max() <= 5e-2 * out_ref.float().abs().max()


def test_kernels_cast_mixed_dtypes_under_autocast_and_reject_them_outside():
    from vbhal.backends.cpu.attention import AttentionInputError

    q, k = torch.randn(1, 2, 5, 8), torch.randn(1, 2, 5, 8)
    v = torch.randn(1, 2, 5, 8, dtype=torch.bfloat16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = cpu_attention(q, k, v, causal=True)
    assert out.dtype == torch.bfloat16
    with pytest.raises(AttentionInputError, match="dtypes differ"):
        cpu_attention(q, k, v)
