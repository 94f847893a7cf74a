"""Route a model's attention through a vbhal ``attention`` kernel (the "attention swap").

``swap_attention(model, *, kernel, report) -> int`` finds three kinds of attention and binds the
kernel (the contract's ``attention(q, k, v, *, causal, scale, attn_mask, cu_seqlens, max_seqlen)``,
resolved once by ``vbhal.optimize`` for the chosen device) into each, in place:

(a) **vbhal's reference GPT** (``vbhal/train/model.py``) and any module following the same slot
    convention: a module with the class or instance attribute ``vbhal_attention_slot = True`` has an
    attribute ``attn_fn`` with the kernel signature (called as ``attn_fn(q, k, v, causal=True)``,
    q (B, H, S, D), k/v (B, H_kv, S, D)); the swap sets ``attn_fn`` to the kernel.
(b) **HuggingFace transformers models** (GPT-2, Llama family, anything using transformers'
    attention-implementation registry): vbhal registers itself under the name ``"vbhal"`` through
    the public ``AttentionInterface.register`` (and ``AttentionMaskInterface.register`` with SDPA's
    mask builder, so padding masks are still built), then calls
    ``model.set_attn_implementation("vbhal")``. No transformers internals are patched. Calls our
    kernel cannot serve (dropout while training, soft-capping, attention sinks, position bias,
    ``output_attentions``) go to transformers' own ``"sdpa"`` function, counted in
    ``hf_fallback_calls``.
(c) **torch.nn.MultiheadAttention**: replaced by :class:`VbhalMultiheadAttention`, a subclass that
    shares the original's parameters (same state_dict keys, same tensors) and computes the same
    function through the kernel, ``batch_first`` either way. Calls with ``need_weights=True``
    (nn.MultiheadAttention's default!) or dropout while training run the original code path and are
    counted in ``fallback_calls``; modules built with ``add_bias_kv`` or ``add_zero_attn`` are left
    as they are and reported.

Under ``torch.autocast`` the kernels (and the HuggingFace adapter) cast q/k/v to the autocast
dtype first, as SDPA does, so mixed-dtype inputs (fp32 q/k after RoPE, bf16 v) work.

The return value is the number of attention modules now running through the kernel; every swap and
every module left alone is added to ``report`` (kinds ``"attention"`` and ``"skip"``).
"""

from __future__ import annotations

import math
from typing import Any, Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn

from vbhal.backends.cpu.attention import autocast_inputs

__all__ = ["swap_attention", "VbhalMultiheadAttention", "hf_attention_forward", "HF_IMPLEMENTATION"]

#: The name vbhal registers in transformers' AttentionInterface.
HF_IMPLEMENTATION = "vbhal"

# device type -> kernel for the HuggingFace path. transformers' registry is global (one function per
# name), so the registered function looks the kernel up by the device of the tensors it gets.
_HF_KERNELS: dict[str, Callable[..., torch.Tensor]] = {}
hf_fallback_calls = 0


def _fn(kernel: Any) -> Callable[..., torch.Tensor]:
    """The plain callable of a HAL ``Kernel`` (one indirection less on the hot path)."""
    return getattr(kernel, "fn", kernel)


def _kernel_name(kernel: Any) -> str:
    backend = getattr(kernel, "backend", None)
    return f"{backend} attention kernel" if backend else getattr(kernel, "__qualname__", "attention kernel")


# --------------------------------------------------------------------------------------------------
# (b) HuggingFace transformers
# --------------------------------------------------------------------------------------------------


def hf_attention_forward(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                         attention_mask: Optional[torch.Tensor], dropout: float = 0.0,
                         scaling: Optional[float] = None, is_causal: Optional[bool] = None,
                         **kwargs) -> tuple[torch.Tensor, None]:
    """transformers attention function (the ``AttentionInterface`` signature) running vbhal's kernel.

    query (B, Hq, Sq, D), key/value (B, Hkv, Sk, D); returns ((B, Sq, Hq, D), None) as transformers'
    own SDPA function does. Causality follows transformers' SDPA rule: causal when more than one
    query, no mask was built and the module is causal.
    """
    global hf_fallback_calls
    unsupported = (dropout and module.training) or kwargs.get("softcap") is not None or \
        kwargs.get("s_aux") is not None or kwargs.get("position_bias") is not None or \
        kwargs.get("output_attentions", False)
    kernel = _HF_KERNELS.get(query.device.type)
    if unsupported or kernel is None or query.shape[-1] != value.shape[-1]:
        from transformers import AttentionInterface

        hf_fallback_calls += 1
        return AttentionInterface()["sdpa"](module, query, key, value, attention_mask, dropout=dropout,
                                            scaling=scaling, is_causal=is_causal, **kwargs)
    is_causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    q_len = query.shape[2]
    causal = bool(q_len > 1 and attention_mask is None and is_causal)
    if causal and key.shape[2] > q_len:
        # Prefill into a larger (static) cache: positions past q_len are empty; top-left causal
        # alignment makes them invisible anyway, so drop them (as transformers' SDPA path does).
        key, value = key[:, :, :q_len], value[:, :, :q_len]
    if attention_mask is not None and attention_mask.dim() == 4:
        attention_mask = attention_mask[..., : key.shape[2]]
    # Under autocast (vbhal's mixed precision) Llama-family models hand over q/k in float32 (RoPE)
    # and v in bf16; SDPA casts them to the autocast dtype, and so do we, whichever backend's kernel.
    query, key, value, attention_mask = autocast_inputs(query, key, value, attention_mask)
    out = kernel(query, key, value, causal=causal, scale=scaling, attn_mask=attention_mask)
    return out.transpose(1, 2).contiguous(), None


def _register_hf() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(HF_IMPLEMENTATION, hf_attention_forward)
    # Our function takes SDPA-style masks (bool keep-mask or None when purely causal).
    AttentionMaskInterface.register(HF_IMPLEMENTATION, sdpa_mask)


def _hf_models(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """Outermost transformers PreTrainedModels inside ``model`` (set_attn_implementation reaches sub-models)."""
    try:
        from transformers import PreTrainedModel
    except ImportError:
        return []
    found: list[tuple[str, nn.Module]] = []
    for name, m in model.named_modules():
        if isinstance(m, PreTrainedModel) and not any(name.startswith(p + ".") or p == "" for p, _ in found):
            found.append((name, m))
    return found


def _hf_attention_modules(hf_model: nn.Module) -> list[str]:
    return [n for n, m in hf_model.named_modules() if type(m).__name__.endswith("Attention") and hasattr(m, "config")]


def _swap_hf(prefix: str, hf_model: nn.Module, kernel, report) -> int:
    name = prefix or type(hf_model).__name__
    before = getattr(hf_model.config, "_attn_implementation", None)
    can = getattr(hf_model, "_can_set_attn_implementation", None)
    if can is not None and not can():
        report.add("skip", name, f"{type(hf_model).__name__} does not use transformers' attention interface; "
                                 "its attention is left as it is")
        return 0
    _register_hf()
    _HF_KERNELS[_device_type(hf_model)] = _fn(kernel)
    try:
        hf_model.set_attn_implementation(HF_IMPLEMENTATION)
    except Exception as e:  # an old or unusual model: leave it working and say why
        report.add("skip", name, f"set_attn_implementation('{HF_IMPLEMENTATION}') failed: {type(e).__name__}: {e}")
        return 0
    layers = _hf_attention_modules(hf_model)
    report.add("attention", name, f"transformers attn_implementation {before!r} -> '{HF_IMPLEMENTATION}' "
                                  f"({len(layers)} attention modules, {_kernel_name(kernel)})")
    return len(layers)


def _device_type(module: nn.Module) -> str:
    for p in module.parameters():
        return p.device.type
    return "cpu"


# --------------------------------------------------------------------------------------------------
# (c) torch.nn.MultiheadAttention
# --------------------------------------------------------------------------------------------------


class VbhalMultiheadAttention(nn.MultiheadAttention):
    """nn.MultiheadAttention computed through a vbhal attention kernel; same parameters, same outputs.

    Built by :meth:`from_module`, which shares the original's parameter tensors. ``need_weights=True``
    (the attention weights are returned) and dropout during training use nn.MultiheadAttention's own
    code; ``fallback_calls`` counts them.
    """

    attn_kernel: Callable[..., torch.Tensor]
    fallback_calls: int

    @classmethod
    def from_module(cls, mha: nn.MultiheadAttention, kernel) -> "VbhalMultiheadAttention":
        new = cls(mha.embed_dim, mha.num_heads, dropout=mha.dropout, bias=mha.in_proj_bias is not None,
                  add_bias_kv=False, add_zero_attn=False, kdim=mha.kdim, vdim=mha.vdim,
                  batch_first=mha.batch_first, device="meta")
        new.load_state_dict(mha.state_dict(keep_vars=True), assign=True)  # the same Parameter objects
        new.train(mha.training)
        new.attn_kernel = _fn(kernel)
        new.fallback_calls = 0
        return new

    def forward(self, query, key, value, key_padding_mask=None, need_weights=True, attn_mask=None,
                average_attn_weights=True, is_causal=False):
        if need_weights or (self.training and self.dropout > 0.0) or (is_causal and attn_mask is None):
            self.fallback_calls += 1
            return super().forward(query, key, value, key_padding_mask=key_padding_mask, need_weights=need_weights,
                                   attn_mask=attn_mask, average_attn_weights=average_attn_weights,
                                   is_causal=is_causal)
        unbatched = query.dim() == 2
        if unbatched:
            query, key, value = query.unsqueeze(1), key.unsqueeze(1), value.unsqueeze(1)  # (L, 1, E)
            if key_padding_mask is not None:
                key_padding_mask = key_padding_mask.unsqueeze(0)
            batch_first = False
        else:
            batch_first = self.batch_first
        if not batch_first:
            query, key, value = query.transpose(0, 1), key.transpose(0, 1), value.transpose(0, 1)
        b, lq, e = query.shape
        h = self.num_heads
        d = e // h
        if self._qkv_same_embed_dim:
            wq, wk, wv = self.in_proj_weight.chunk(3)
        else:
            wq, wk, wv = self.q_proj_weight, self.k_proj_weight, self.v_proj_weight
        bq = bk = bv = None
        if self.in_proj_bias is not None:
            bq, bk, bv = self.in_proj_bias.chunk(3)
        q = F.linear(query, wq, bq).view(b, lq, h, d).transpose(1, 2)
        k = F.linear(key, wk, bk).view(b, key.shape[1], h, d).transpose(1, 2)
        v = F.linear(value, wv, bv).view(b, value.shape[1], h, d).transpose(1, 2)
        causal = False
        if is_causal and key_padding_mask is None:
            causal, mask = True, None  # is_causal: attn_mask is the causal mask (nn.MultiheadAttention's hint)
        else:
            mask = _sdpa_mask(attn_mask, key_padding_mask, b, h, lq, k.shape[2], q.dtype)
        out = self.attn_kernel(q, k, v, causal=causal, attn_mask=mask)
        out = self.out_proj(out.transpose(1, 2).reshape(b, lq, e))
        if not batch_first:
            out = out.transpose(0, 1)
        if unbatched:
            out = out.squeeze(1)
        return out, None


def _sdpa_mask(attn_mask, key_padding_mask, b, h, lq, lk, dtype):
    """nn.MultiheadAttention masks (bool True = *masked out*, or additive) as one SDPA mask (True = keep)."""
    masks = []
    if attn_mask is not None:
        m = attn_mask.view(b, h, lq, lk) if attn_mask.dim() == 3 else attn_mask
        masks.append(~m if m.dtype == torch.bool else m.to(dtype))
    if key_padding_mask is not None:
        m = key_padding_mask.view(b, 1, 1, lk)
        masks.append(~m if m.dtype == torch.bool else m.to(dtype))
    if not masks:
        return None
    if len(masks) == 1:
        return masks[0]
    if all(m.dtype == torch.bool for m in masks):
        return masks[0] & masks[1]
    add = [torch.zeros((), dtype=dtype, device=m.device).masked_fill(~m, float("-inf")) if m.dtype == torch.bool
           else m for m in masks]
    return add[0] + add[1]


def _mha_unsupported(m: nn.MultiheadAttention) -> Optional[str]:
    if m.bias_k is not None or m.bias_v is not None:
        return "add_bias_kv=True"
    if m.add_zero_attn:
        return "add_zero_attn=True"
    return None


# --------------------------------------------------------------------------------------------------
# the swap
# --------------------------------------------------------------------------------------------------


def swap_attention(model: nn.Module, *, kernel, report) -> int:
    """Bind ``kernel`` into every attention of ``model`` we can serve; return how many were swapped.

    Example::

        from vbhal.hal import get_kernel
        n = swap_attention(model, kernel=get_kernel("attention", "cuda"), report=report)
    """
    count = 0
    # (b) HuggingFace models first: their attention modules are driven by the registry.
    hf = _hf_models(model)
    for prefix, hf_model in hf:
        count += _swap_hf(prefix, hf_model, kernel, report)
    # (a) slot modules and (c) nn.MultiheadAttention
    for name, module in list(model.named_modules()):
        if getattr(module, "vbhal_attention_slot", False) is True:
            if not hasattr(module, "attn_fn"):
                report.add("skip", name, "vbhal_attention_slot is set but the module has no attn_fn")
                continue
            module.attn_fn = _fn(kernel)
            report.add("attention", name, f"attn_fn -> {_kernel_name(kernel)}")
            count += 1
        for child_name, child in list(module.named_children()):
            if type(child) is not nn.MultiheadAttention:
                continue
            full = f"{name}.{child_name}" if name else child_name
            reason = _mha_unsupported(child)
            if reason is not None:
                report.add("skip", full, f"nn.MultiheadAttention with {reason}: left as it is")
                continue
            setattr(module, child_name, VbhalMultiheadAttention.from_module(child, kernel))
            note = " (dropout>0: training calls use the original path)" if child.dropout > 0 else ""
            report.add("attention", full, f"nn.MultiheadAttention -> VbhalMultiheadAttention, {_kernel_name(kernel)}; "
                                          f"need_weights=True calls use the original path{note}")
            count += 1
    if type(model) is nn.MultiheadAttention:
        report.add("skip", "", "the model itself is an nn.MultiheadAttention: swap it in its parent module")
    return count
