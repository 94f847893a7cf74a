"""The reference GPT: shapes, the attention slot, GQA, tying, checkpointing, counting, sampling, errors."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from vbhal.errors import ConfigError
from vbhal.train.model import GPT, PRESETS, CausalSelfAttention, GPTConfig


def small(**kw) -> GPTConfig:
    base = dict(hidden_size=32, num_layers=2, num_heads=4, seq_length=16)
    base.update(kw)
    return GPTConfig.from_preset("tiny", **base)


def test_presets_have_the_agreed_shapes():
    assert {k: (v.hidden_size, v.num_layers) for k, v in PRESETS.items()} == {
        "tiny": (128, 2), "small": (256, 4), "medium": (768, 12), "large": (1024, 24)}
    for cfg in PRESETS.values():
        assert cfg.hidden_size % cfg.num_heads == 0


def test_forward_shapes_and_loss_is_cross_entropy():
    torch.manual_seed(0)
    m = GPT(small())
    x = torch.randint(0, 256, (3, 16))
    y = torch.randint(0, 256, (3, 16))
    logits, loss = m(x, y)
    assert logits.shape == (3, 16, m.config.vocab_size)
    ref = F.cross_entropy(logits.double().reshape(-1, logits.shape[-1]), y.reshape(-1))
    assert torch.allclose(loss.double(), ref, atol=1e-6)
    logits2, none = m(x)
    assert none is None and torch.equal(logits2, logits)


def test_attention_slot_marker_and_attn_fn_is_called():
    m = GPT(small())
    slots = [mod for mod in m.modules() if getattr(mod, "vbhal_attention_slot", False)]
    assert len(slots) == 2 and all(isinstance(s, CausalSelfAttention) for s in slots)
    calls = []

    def spy(q, k, v, causal=False):
        calls.append((q.shape, k.shape, causal))
        return F.scaled_dot_product_attention(q, k, v, is_causal=causal)

    for s in slots:
        s.attn_fn = spy
    m(torch.randint(0, 256, (2, 8)))
    assert calls == [((2, 4, 8, 8), (2, 4, 8, 8), True)] * 2


def test_every_projection_is_nn_linear():
    m = GPT(small())
    linears = [n for n, mod in m.named_modules() if isinstance(mod, torch.nn.Linear)]
    assert len(linears) == 2 * 4 + 1  # qkv, proj, fc, proj per block + lm_head


def test_gqa_matches_repeated_kv_heads_in_float64():
    torch.manual_seed(1)
    m = GPT(small(num_kv_heads=2)).double()
    x = torch.randint(0, 256, (2, 16))

    def repeated(q, k, v, causal=False):
        r = q.shape[1] // k.shape[1]
        return F.scaled_dot_product_attention(q, k.repeat_interleave(r, 1), v.repeat_interleave(r, 1),
                                              is_causal=causal)
    out = m(x)[0]
    for b in m.blocks:
        b.attn.attn_fn = repeated
    ref = m(x)[0]
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)
    assert m.blocks[0].attn.qkv.out_features == (4 + 2 * 2) * 8


def test_causality_future_tokens_do_not_change_past_logits():
    torch.manual_seed(2)
    m = GPT(small()).double()
    x = torch.randint(0, 256, (1, 16))
    x2 = x.clone()
    x2[0, 10:] = torch.randint(0, 256, (6,))
    torch.testing.assert_close(m(x)[0][:, :10], m(x2)[0][:, :10], rtol=0, atol=0)


def test_tied_and_untied_embeddings():
    tied = GPT(small())
    assert tied.lm_head.weight is tied.wte.weight
    untied = GPT(small(tie_embeddings=False))
    assert untied.lm_head.weight is not untied.wte.weight
    assert untied.num_parameters() - tied.num_parameters() == tied.wte.weight.numel()


def test_parameter_count_matches_formula():
    c = small(num_kv_heads=2, bias=False)
    m = GPT(c)
    C, L, V, S, I = c.hidden_size, c.num_layers, c.vocab_size, c.seq_length, c.intermediate_size
    kv = c.kv_heads * c.head_dim
    per_block = C * (C + 2 * kv) + C * C + 2 * C * I + 2 * C  # qkv, proj, mlp, two LayerNorm weights
    assert m.num_parameters() == V * C + S * C + L * per_block + C
    assert m.num_parameters(non_embedding=True) == L * per_block + C
    # flops: 6 * (params without position table) + 12 * L * C * S
    assert m.flops_per_token() == 6 * (m.num_parameters() - S * C) + 12 * L * C * S


def test_gradient_checkpointing_gives_identical_gradients():
    torch.manual_seed(3)
    m = GPT(small(dropout=0.0))
    x = torch.randint(0, 256, (2, 16))

    def grads():
        m.zero_grad()
        m(x, x)[1].backward()
        return [p.grad.clone() for p in m.parameters()]
    g0 = grads()
    m.gradient_checkpointing_enable()
    assert m.gradient_checkpointing
    g1 = grads()
    for a, b in zip(g0, g1):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_generate_greedy_is_deterministic_and_extends():
    torch.manual_seed(4)
    m = GPT(small()).eval()
    x = torch.randint(0, 256, (2, 4))
    a = m.generate(x, 20, temperature=0)     # runs past seq_length: the context is cropped
    b = m.generate(x, 20, temperature=0)
    assert a.shape == (2, 24) and torch.equal(a, b) and torch.equal(a[:, :4], x)
    g = torch.Generator().manual_seed(0)
    s = m.generate(x, 5, temperature=1.0, top_k=3, generator=g)
    assert s.shape == (2, 9)


@pytest.mark.parametrize("kw, word", [
    (dict(hidden_size=30, num_heads=4), "divisible"),
    (dict(num_kv_heads=3), "num_kv_heads"),
    (dict(num_layers=0), "num_layers"),
    (dict(dropout=1.5), "dropout"),
])
def test_bad_shapes_raise_config_error_naming_the_field(kw, word):
    with pytest.raises(ConfigError, match=word):
        small(**kw)


def test_unknown_preset_and_field():
    with pytest.raises(ConfigError, match="unknown model preset"):
        GPTConfig.from_preset("huge")
    with pytest.raises(ConfigError, match="unknown GPTConfig field"):
        GPTConfig.from_preset("tiny", width=3)


def test_input_longer_than_context_is_refused():
    m = GPT(small())
    with pytest.raises(ConfigError, match="seq_length"):
        m(torch.zeros(1, 17, dtype=torch.long))
