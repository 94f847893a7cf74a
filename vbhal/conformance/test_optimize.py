"""`optimize` on a small GPT on the device under test: outputs within tolerance, backward, the report."""

from __future__ import annotations

import pytest
import torch

import vbhal
from vbhal.conformance._reference import rel_err
from vbhal.train.model import GPT, GPTConfig

#: Relative tolerance of the logits per mode (bf16 autocast everywhere; FP4 weights add quantization error).
MODE_TOLERANCE = {"speed": 3e-2, "balanced": 3e-2, "full": 0.25}


@pytest.mark.parametrize("mode", ["speed", "balanced", "full"])
def test_optimize_small_gpt(vbhal_device, record, mode):
    torch.manual_seed(0)
    model = GPT(GPTConfig(hidden_size=64, num_layers=2, num_heads=2, seq_length=64, vocab_size=128))
    model.to(vbhal_device.device)
    idx = torch.randint(0, 128, (2, 48), device=vbhal_device.device)
    with torch.no_grad():
        ref, _ = model(idx)
    vbhal.optimize(model, mode=mode, device=vbhal_device)
    logits, loss = model(idx, idx)
    loss.backward()
    err = rel_err(logits.float(), ref.float())
    report = vbhal.stats(model)
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    ok = err < MODE_TOLERANCE[mode] and report.changes and all(g is not None for g in grads)
    record("optimize", f"small GPT, mode {mode}", err, MODE_TOLERANCE[mode], ok)
    assert ok, (err, report.format())
