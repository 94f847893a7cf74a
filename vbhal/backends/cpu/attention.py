"""Attention on CPU (and the reference every other backend is checked against).

What: ``attention(q, k, v, *, causal, scale, attn_mask, cu_seqlens, max_seqlen)`` with the kernel
contract's semantics (docs/CONTRACT.md), computed with PyTorch's ``scaled_dot_product_attention``:
- dense (B, H, S, D): SDPA, GQA/MQA through ``enable_gqa`` (no repeated K/V);
- long sequences (``Sq >= BLOCKWISE_MIN_SEQ``): one SDPA call per block of ``QUERY_BLOCK`` queries,
  each block recomputed in backward (activation checkpointing), so memory grows as O(S) and never
  holds an S x S matrix, whatever SDPA backend the CPU build picks;
- packed variable length (T, H, D) + ``cu_seqlens``: one SDPA call per document, so no token
  attends across a document boundary.

Also home of the input checks shared by every backend (``validate_attention_inputs``) and of the
float64 reference used by tests and the conformance suite (``reference_attention``), so that all
backends reject the same inputs with the same messages.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch.utils.weak import WeakTensorKeyDictionary

from vbhal.errors import KernelError

__all__ = [
    "AttentionInputError",
    "autocast_inputs",
    "BLOCKWISE_MIN_SEQ",
    "QUERY_BLOCK",
    "KERNELS",
    "attention",
    "reference_attention",
    "validate_attention_inputs",
]

#: From this query length on, CPU attention runs in query blocks (memory O(S) instead of O(S^2)).
BLOCKWISE_MIN_SEQ = 8192
#: Queries per block in blockwise mode: a (QUERY_BLOCK x Sk) score block per head at a time.
QUERY_BLOCK = 1024


class AttentionInputError(KernelError, ValueError):
    """Attention inputs that no backend can take (shapes, dtypes, devices, offsets, masks)."""


# --------------------------------------------------------------------------------------------------
# validation (shared by all backends)
# --------------------------------------------------------------------------------------------------

# cu_seqlens checks need its values on the host; models pass the same offsets tensor to every layer,
# so results are remembered per tensor object (weakly: a freed tensor drops its entry, and a new tensor
# at a reused address is never mistaken for it) and per in-place version, to sync once per step.
_checked_offsets = WeakTensorKeyDictionary()


def _check_offsets(cu_seqlens: torch.Tensor, total: int, max_seqlen: Optional[int]) -> int:
    key = (cu_seqlens._version, total)
    hit = _checked_offsets.get(cu_seqlens)
    if hit is not None and hit[0] == key:
        actual = hit[1]
    else:
        offs = cu_seqlens.tolist()
        if offs[0] != 0:
            raise AttentionInputError(f"cu_seqlens must start at 0, got {offs[0]}; pass cumulative document "
                                      "offsets [0, len0, len0+len1, ..., T].")
        if offs[-1] != total:
            raise AttentionInputError(f"cu_seqlens must end at the number of packed tokens T={total}, got "
                                      f"{offs[-1]}.")
        lengths = [b - a for a, b in zip(offs[:-1], offs[1:])]
        bad = [i for i, n in enumerate(lengths) if n <= 0]
        if bad:
            raise AttentionInputError(f"cu_seqlens must be strictly increasing; documents {bad[:5]} have length "
                                      f"{[lengths[i] for i in bad[:5]]}. Drop empty documents before packing.")
        actual = max(lengths)
        _checked_offsets[cu_seqlens] = (key, actual)
    if max_seqlen is not None and max_seqlen < actual:
        raise AttentionInputError(f"max_seqlen={max_seqlen} is smaller than the longest document ({actual}); "
                                  "pass the true maximum or None to have it computed.")
    return actual if max_seqlen is None else max_seqlen


def autocast_inputs(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attn_mask: Optional[torch.Tensor] = None):
    """Under ``torch.autocast``, cast q/k/v (and a float mask) to the autocast dtype, as SDPA does.

    SDPA is on autocast's lower-precision list, so models hand it mixed dtypes (HF Llama: q/k in
    float32 after RoPE, v in bf16) and rely on that cast. Outside autocast nothing changes and the
    dtype checks of ``validate_attention_inputs`` apply.
    """
    dev = q.device.type
    if not torch.is_autocast_enabled(dev):
        return q, k, v, attn_mask
    dt = torch.get_autocast_dtype(dev)
    q, k, v = (t.to(dt) if t.is_floating_point() and t.dtype != dt else t for t in (q, k, v))
    if attn_mask is not None and attn_mask.is_floating_point() and attn_mask.dtype != dt:
        attn_mask = attn_mask.to(dt)
    return q, k, v, attn_mask


def validate_attention_inputs(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *,
                              attn_mask: Optional[torch.Tensor] = None,
                              cu_seqlens: Optional[torch.Tensor] = None,
                              max_seqlen: Optional[int] = None) -> Optional[int]:
    """Check inputs against the attention contract; return max_seqlen (computed when None, packed only).

    Raises ``AttentionInputError`` naming the offending argument and what it should be.
    """
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise AttentionInputError(f"{name} must be a torch.Tensor, got {type(t).__name__}.")
        if not t.is_floating_point():
            raise AttentionInputError(f"{name} has dtype {t.dtype}; attention needs floating point inputs "
                                      "(float16, bfloat16 or float32).")
    if not (q.dtype == k.dtype == v.dtype):
        raise AttentionInputError(f"q, k, v dtypes differ ({q.dtype}, {k.dtype}, {v.dtype}); cast them to one dtype.")
    if not (q.device == k.device == v.device):
        raise AttentionInputError(f"q, k, v are on different devices ({q.device}, {k.device}, {v.device}); move "
                                  "them to one device.")
    packed = cu_seqlens is not None
    rank = 3 if packed else 4
    layout = "(T, H, D) with cu_seqlens" if packed else "(B, H, S, D) as F.scaled_dot_product_attention"
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.dim() != rank:
            raise AttentionInputError(f"{name} has shape {tuple(t.shape)}; expected {layout}.")
    if not (q.shape[-1] == k.shape[-1] == v.shape[-1]):
        raise AttentionInputError(f"head dims differ: q {q.shape[-1]}, k {k.shape[-1]}, v {v.shape[-1]}; q, k and v "
                                  "must share the head dimension.")
    hq, hkv = q.shape[1], k.shape[1]  # heads are dim 1 in both layouts
    if v.shape[:-1] != k.shape[:-1]:
        raise AttentionInputError(f"k {tuple(k.shape)} and v {tuple(v.shape)} must have the same shape.")
    if hkv == 0 or hq % hkv != 0:
        raise AttentionInputError(f"the number of K/V heads ({hkv}) must divide the number of query heads ({hq}) "
                                  "(grouped-query attention).")
    if packed:
        if attn_mask is not None:
            raise AttentionInputError("attn_mask cannot be combined with cu_seqlens; packed sequences are masked by "
                                      "their document offsets (plus causal=True if needed).")
        if not isinstance(cu_seqlens, torch.Tensor) or cu_seqlens.dim() != 1 or cu_seqlens.numel() < 2 or \
                cu_seqlens.dtype not in (torch.int32, torch.int64):
            raise AttentionInputError("cu_seqlens must be a 1-D int32 tensor of ndocs+1 cumulative offsets "
                                      f"starting at 0, got {getattr(cu_seqlens, 'dtype', type(cu_seqlens))} "
                                      f"{tuple(getattr(cu_seqlens, 'shape', ()))}.")
        if cu_seqlens.device != q.device:
            raise AttentionInputError(f"cu_seqlens is on {cu_seqlens.device} but q on {q.device}; move it to {q.device}.")
        if q.shape[0] != k.shape[0]:
            raise AttentionInputError(f"packed q has {q.shape[0]} tokens but k has {k.shape[0]}; packed attention "
                                      "uses the same offsets for queries and keys.")
        if torch.compiler.is_compiling():
            if max_seqlen is None:
                raise AttentionInputError("under torch.compile pass max_seqlen with cu_seqlens (it cannot be "
                                          "read from the device while tracing).")
            return max_seqlen
        return _check_offsets(cu_seqlens, q.shape[0], max_seqlen)
    if q.shape[0] != k.shape[0]:
        raise AttentionInputError(f"batch sizes differ: q {q.shape[0]}, k {k.shape[0]}.")
    if k.shape[2] == 0:
        raise AttentionInputError("k and v have no positions (Sk = 0); attention over nothing is undefined.")
    if attn_mask is not None:
        if not isinstance(attn_mask, torch.Tensor):
            raise AttentionInputError(f"attn_mask must be a tensor, got {type(attn_mask).__name__}.")
        if attn_mask.dtype != torch.bool and attn_mask.dtype != q.dtype:
            raise AttentionInputError(f"attn_mask has dtype {attn_mask.dtype}; use bool (True = keep) or an "
                                      f"additive mask of q's dtype {q.dtype}.")
        if attn_mask.device != q.device:
            raise AttentionInputError(f"attn_mask is on {attn_mask.device} but q on {q.device}.")
    return max_seqlen


# --------------------------------------------------------------------------------------------------
# reference
# --------------------------------------------------------------------------------------------------


def reference_attention(q, k, v, *, causal=False, scale=None, attn_mask=None, cu_seqlens=None, max_seqlen=None,
                        dtype=torch.float64):
    """The contract's reference: SDPA's math in ``dtype`` (float64 by default), per document if packed.

    Differentiable; used by tests and the conformance suite. Not meant to be fast.
    """
    q, k, v = q.to(dtype), k.to(dtype), v.to(dtype)
    if attn_mask is not None and attn_mask.dtype != torch.bool:
        attn_mask = attn_mask.to(dtype)
    if cu_seqlens is None:
        return _math_attention(q, k, v, causal, scale, attn_mask)
    outs = []
    offs = cu_seqlens.tolist()
    for a, b in zip(offs[:-1], offs[1:]):
        qd, kd, vd = (t[a:b].transpose(0, 1).unsqueeze(0) for t in (q, k, v))
        outs.append(_math_attention(qd, kd, vd, causal, scale, None)[0].transpose(0, 1))
    return torch.cat(outs, 0)


def _math_attention(q, k, v, causal, scale, attn_mask):
    """softmax(q k^T * scale + mask) v, written out (what SDPA's math backend computes)."""
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    group = q.shape[1] // k.shape[1]
    if group > 1:
        k = k.repeat_interleave(group, dim=1)
        v = v.repeat_interleave(group, dim=1)
    s = (q @ k.transpose(-2, -1)) * scale
    if causal:
        keep = torch.ones(q.shape[-2], k.shape[-2], dtype=torch.bool, device=q.device).tril()
        s = s.masked_fill(~keep, float("-inf"))
    if attn_mask is not None:
        s = s.masked_fill(~attn_mask, float("-inf")) if attn_mask.dtype == torch.bool else s + attn_mask
    return torch.softmax(s, dim=-1) @ v


# --------------------------------------------------------------------------------------------------
# CPU kernel
# --------------------------------------------------------------------------------------------------


def _sdpa(q, k, v, *, causal, scale, attn_mask):
    gqa = q.shape[1] != k.shape[1]
    return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, is_causal=causal, scale=scale,
                                          enable_gqa=gqa)


def _query_block(q, k, v, start, stop, causal, scale, attn_mask):
    """Attention of queries [start, stop) against all keys, with causal top-left alignment kept."""
    qb = q[:, :, start:stop]
    mask = None
    if attn_mask is not None:
        mask = attn_mask[..., start:stop, :] if attn_mask.dim() >= 2 and attn_mask.shape[-2] != 1 else attn_mask
    if causal:
        # Query i (global index) sees keys j <= i; only keys < stop can be visible to this block.
        kv_end = min(stop, k.shape[2])
        k, v = k[:, :, :kv_end], v[:, :, :kv_end]
        rows = torch.arange(start, stop, device=q.device)[:, None]
        keep = torch.arange(kv_end, device=q.device)[None, :] <= rows
        if mask is None:
            mask = keep
        elif mask.dtype == torch.bool:
            mask = mask[..., :kv_end] & keep
        else:
            mask = mask[..., :kv_end].masked_fill(~keep, float("-inf"))
    return _sdpa(qb, k, v, causal=False, scale=scale, attn_mask=mask)


def _blockwise(q, k, v, causal, scale, attn_mask):
    """Query blocks, each recomputed in backward: peak memory O(QUERY_BLOCK * Sk) per head, not O(Sq * Sk)."""
    from torch.utils.checkpoint import checkpoint

    outs = []
    grad = torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v))
    for start in range(0, q.shape[2], QUERY_BLOCK):
        stop = min(start + QUERY_BLOCK, q.shape[2])
        if grad:
            outs.append(checkpoint(_query_block, q, k, v, start, stop, causal, scale, attn_mask, use_reentrant=False))
        else:
            outs.append(_query_block(q, k, v, start, stop, causal, scale, attn_mask))
    return torch.cat(outs, dim=2)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool = False,
              scale: Optional[float] = None, attn_mask: Optional[torch.Tensor] = None,
              cu_seqlens: Optional[torch.Tensor] = None, max_seqlen: Optional[int] = None) -> torch.Tensor:
    """CPU attention with the kernel contract's signature (see the module docstring for the strategy).

    Example::

        o = attention(q, k, v, causal=True)                      # q (B, Hq, S, D), k/v (B, Hkv, S, D)
        o = attention(q, k, v, causal=True, cu_seqlens=cu)        # packed q (T, Hq, D), cu int32
    """
    q, k, v, attn_mask = autocast_inputs(q, k, v, attn_mask)
    validate_attention_inputs(q, k, v, attn_mask=attn_mask, cu_seqlens=cu_seqlens, max_seqlen=max_seqlen)
    if cu_seqlens is not None:
        outs = []
        offs = cu_seqlens.tolist()
        for a, b in zip(offs[:-1], offs[1:]):
            qd, kd, vd = (t[a:b].transpose(0, 1).unsqueeze(0) for t in (q, k, v))
            outs.append(attention(qd, kd, vd, causal=causal, scale=scale)[0].transpose(0, 1))
        return torch.cat(outs, 0)
    if q.shape[2] >= BLOCKWISE_MIN_SEQ:
        return _blockwise(q, k, v, causal, scale, attn_mask)
    if attn_mask is not None and causal:
        # SDPA refuses attn_mask together with is_causal: fold the causal mask into the given one.
        return _query_block(q, k, v, 0, q.shape[2], True, scale, attn_mask)
    return _sdpa(q, k, v, causal=causal, scale=scale, attn_mask=attn_mask)


KERNELS = {"attention": attention}
