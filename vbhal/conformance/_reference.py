"""References and tolerances the conformance checks compare against."""

from __future__ import annotations

import torch
import torch.nn.functional as F

#: Relative-norm tolerances by activation dtype (‖out − ref‖ / ‖ref‖ against a float64 reference).
#: fp32 allows for TF32-class matrix units; bf16/fp16 for one rounding of inputs and outputs.
TOLERANCE = {torch.float32: 2e-3, torch.float16: 4e-3, torch.bfloat16: 2e-2}
#: Gradients accumulate one more rounding.
GRAD_TOLERANCE = {torch.float32: 3e-3, torch.float16: 8e-3, torch.bfloat16: 4e-2}


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    out = out.detach().double().cpu()
    ref = ref.detach().double().cpu()
    if torch.isnan(out).any() and not torch.isnan(ref).any():
        return float("inf")
    denom = ref.norm().item() or 1.0
    return (out - ref).norm().item() / denom


def dtypes_for(device) -> list[torch.dtype]:
    if device.device.type == "cpu":
        return [torch.float32, torch.bfloat16]
    return [torch.float16, torch.bfloat16] + ([torch.float32] if device.kind == "cuda" else [])


def attention_reference(q, k, v, *, causal=False, scale=None, cu_seqlens=None):
    """Float64 SDPA on the CPU, with grouped-query heads and packed documents."""
    q, k, v = (t.detach().double().cpu() for t in (q, k, v))
    if cu_seqlens is None:
        return F.scaled_dot_product_attention(q, k, v, is_causal=causal, scale=scale, enable_gqa=True)
    outs = []
    bounds = cu_seqlens.tolist()
    for a, b in zip(bounds[:-1], bounds[1:]):
        qi, ki, vi = (t[a:b].transpose(0, 1) for t in (q, k, v))
        outs.append(F.scaled_dot_product_attention(qi, ki, vi, is_causal=causal, scale=scale,
                                                   enable_gqa=True).transpose(0, 1))
    return torch.cat(outs)
