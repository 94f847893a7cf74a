"""References and tolerances the conformance checks compare against."""

from __future__ import annotations

import copy

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


def split_adamw_reference(base: torch.nn.Module, batches: list, loss_fn, device, lr: float,
                          device_names: frozenset[str] | set[str] = frozenset(), clip: float | None = None):
    """Ordinary training of a copy of `base` on `device` (its own parameter dtypes; the caller's `loss_fn(model,
    batch)` does any autocast) whose AdamW is split the way vbhal's offload engine splits it: parameters named in
    `device_names` by torch's fused AdamW on `device`, the rest by the fused CPU kernel on fp32 CPU copies (the
    engine's host step), copied back after each step. Clipping by clip_grad_norm_ before either step. The engine
    must match this bit for bit (the arithmetic is the same). Returns (losses, {name: CPU parameter})."""
    plain = copy.deepcopy(base).to(device)
    named = list(plain.named_parameters())
    dev_p = [p for n, p in named if n in device_names and p.requires_grad]
    host_p = [p for n, p in named if n not in device_names and p.requires_grad]
    masters = [p.detach().cpu().clone().requires_grad_(True) for p in host_p]
    opt_d = torch.optim.AdamW(dev_p, lr=lr, fused=True) if dev_p else None
    opt_h = torch.optim.AdamW(masters, lr=lr, fused=True) if masters else None
    losses = []
    for batch in batches:
        loss = loss_fn(plain, batch)
        loss.backward()
        if clip is not None:
            torch.nn.utils.clip_grad_norm_(plain.parameters(), clip)
        if opt_d is not None:
            opt_d.step()
            opt_d.zero_grad(set_to_none=True)
        if opt_h is not None:
            for m, p in zip(masters, host_p):
                m.grad = p.grad.cpu()
                p.grad = None
            opt_h.step()
            with torch.no_grad():
                for m, p in zip(masters, host_p):
                    p.copy_(m)
        losses.append(loss.item())
    return losses, {n: p.detach().cpu() for n, p in named}


def autocast_loss(device, dtype: torch.dtype = torch.bfloat16):
    """loss_fn for split_adamw_reference: the model's own output (a loss) under autocast to `dtype`."""
    dev_type = torch.device(device).type

    def loss_fn(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
        with torch.autocast(dev_type, dtype=dtype):
            return model(x)

    return loss_fn
