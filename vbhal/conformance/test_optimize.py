"""`optimize` on the device under test: vbhal's small GPT and HuggingFace GPT-2 / Llama built from small
configs (no downloads). Outputs within the mode's tolerance, backward works, the report lists the changes."""

from __future__ import annotations

import pytest
import torch

import vbhal
from vbhal.conformance._reference import rel_err
from vbhal.train.model import GPT, GPTConfig

#: Relative tolerance of the logits per mode (bf16 autocast everywhere; FP4 weights add quantization error).
MODE_TOLERANCE = {"speed": 3e-2, "balanced": 3e-2, "full": 0.3}
VOCAB = 128


def _gpt():
    return GPT(GPTConfig(hidden_size=64, num_layers=2, num_heads=2, seq_length=64, vocab_size=VOCAB))


def _gpt2():
    transformers = pytest.importorskip("transformers", reason="transformers not installed (pip install vbhal[hf])")
    return transformers.GPT2LMHeadModel(transformers.GPT2Config(
        vocab_size=VOCAB, n_embd=64, n_layer=2, n_head=4, n_positions=64, resid_pdrop=0.0, embd_pdrop=0.0,
        attn_pdrop=0.0))


def _llama():
    transformers = pytest.importorskip("transformers", reason="transformers not installed (pip install vbhal[hf])")
    return transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64))


MODELS = {"gpt": _gpt, "hf-gpt2": _gpt2, "hf-llama": _llama}


def _logits(out):
    return out[0] if isinstance(out, tuple) else out.logits


@pytest.mark.parametrize("mode", list(MODE_TOLERANCE))
@pytest.mark.parametrize("which", list(MODELS))
def test_optimize_models(vbhal_device, record, which, mode):
    torch.manual_seed(0)
    model = MODELS[which]().to(vbhal_device.device)
    model.train()
    idx = torch.randint(0, VOCAB, (2, 48), device=vbhal_device.device)
    with torch.no_grad():
        ref = _logits(model(idx))
    vbhal.optimize(model, mode=mode, device=vbhal_device)
    logits = _logits(model(idx))
    logits.float().logsumexp(-1).mean().backward()
    err = rel_err(logits.float(), ref.float())
    report = vbhal.stats(model)
    grads_ok = all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters() if p.requires_grad)
    mem = f"params+buffers {report.param_bytes_before / 2**20:.2f} -> {report.param_bytes_after / 2**20:.2f} MiB"
    ok = err < MODE_TOLERANCE[mode] and bool(report.changes) and grads_ok
    record("optimize", f"{which}, mode {mode} ({mem})", err, MODE_TOLERANCE[mode], ok)
    assert ok, (err, grads_ok, report.format())
