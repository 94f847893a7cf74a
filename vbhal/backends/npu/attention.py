"""Attention on Ascend NPUs through ``torch_npu.npu_fusion_attention`` (forward and backward).

NOT RUN ON ASCEND HARDWARE. Written against the op as documented for torch_npu 2.13 / op-plugin
(``docs/context/torch_npu-npu_fusion_attention.md`` in Ascend/op-plugin; schema in torch_npu 2.13.0's
``csrc/aten/npu_native_functions_by_codegen.yaml``:
``npu_fusion_attention(Tensor query, Tensor key, Tensor value, int head_num, str input_layout,
Tensor? pse=None, Tensor? padding_mask=None, Tensor? atten_mask=None, float scale=1.,
float keep_prob=1., int pre_tockens=2147483647, int next_tockens=2147483647, int inner_precise=0,
int[]? prefix=None, int[]? actual_seq_qlen=None, int[]? actual_seq_kvlen=None, int sparse_mode=0,
bool gen_mask_parallel=True, bool sync=False, str softmax_layout="", Tensor? sink=None,
Tensor? dropout_mask=None, int seed=0, int offset=0) -> (Tensor, Tensor, Tensor, Tensor, int, int, int)``;
its backward is ``npu_fusion_attention_grad`` in the same file);
the calls are checked on CPU against a stand-in module (tests/backends/npu/), and an Ascend user checks
the numbers with ``vbhal conformance --device npu``.

How the kernel contract (docs/CONTRACT.md, ``attention``) maps onto the op:
- dense (B, H, S, D) is the op's ``"BNSD"`` layout as is; packed (T, H, D) + ``cu_seqlens`` is ``"TND"``
  with ``actual_seq_qlen = actual_seq_kvlen = cu_seqlens[1:]`` (cumulative, WITHOUT the leading 0: the
  op's doc example, lengths 2 2 2 2 2 -> ``[2, 4, 6, 8, 10]``).
- GQA: the op takes Nq != Nkv when Nq / Nkv is an integer (its constraints: "Nq/Nkv must be a non-zero
  integer"), ``head_num`` = the number of QUERY heads; K/V are passed with their own head count, never
  repeated.
- ``scale`` is always passed (the op's default is 1.0, not 1/sqrt(D)); ``keep_prob=1.0`` (no dropout).
- causal: the op's ``atten_mask`` is True where a score is MASKED OUT, the opposite of SDPA's boolean
  mask. Causal attention uses the op's compressed 2048 x 2048 ``triu(diagonal=1)`` mask with
  ``sparse_mode=2`` (leftUpCausal: query i sees keys j <= i, SDPA's ``is_causal``) for dense inputs and
  ``sparse_mode=3`` (rightDownCausal) for packed ones, where each document has Sq == Skv so both modes
  are the same mask. A user's mask goes through :func:`to_npu_atten_mask`, the one place where the
  polarity is inverted.
- backward: the op has an autograd formula in torch_npu (``npu_fusion_attention_grad``), so gradients
  flow through this function unchanged.

What the op cannot take falls back to the CPU backend's kernel (plain torch SDPA, which runs on the
NPU): numbers are then those of the reference path, and the reason is counted and logged once
(``vbhal.backends.npu._runtime.FALLBACKS``). See :func:`fused_attention_unsupported`.
"""

from __future__ import annotations

import math

import torch

from vbhal.backends.cpu import attention as _cpu
from vbhal.backends.cpu.attention import validate_attention_inputs

from . import _runtime

__all__ = [
    "COMPRESSED_MASK_SIZE",
    "KERNELS",
    "SPARSE_MODE_DEFAULT",
    "SPARSE_MODE_LEFT_UP_CAUSAL",
    "SPARSE_MODE_RIGHT_DOWN_CAUSAL",
    "attention",
    "fused_attention_unsupported",
    "to_npu_atten_mask",
]

# -- limits and modes of npu_fusion_attention (op-plugin docs, torch_npu 2.13) ------------------------
#: sparse_mode 0: defaultMask; ``atten_mask`` (if any) is the full mask (BNSS / B1SS / 11SS / SS).
SPARSE_MODE_DEFAULT = 0
#: sparse_mode 2: leftUpCausal, mask anchored at the top-left corner (= SDPA's ``is_causal``).
SPARSE_MODE_LEFT_UP_CAUSAL = 2
#: sparse_mode 3: rightDownCausal, anchored at the bottom-right corner.
SPARSE_MODE_RIGHT_DOWN_CAUSAL = 3
#: Side of the compressed lower-triangular mask that sparse_mode 2/3 take ("优化后的压缩下三角矩阵 2048*2048").
COMPRESSED_MASK_SIZE = 2048
#: Chip families for which the op's kernels are documented: torch_npu 2.13.0's own doc lists Atlas A2
#: training; CANN's ops-transformer ``aclnnFlashAttentionScore.md`` lists A2 and A3 (and not the 950).
FUSED_ATTENTION_CHIPS = ("A2", "A3")
#: The varlen (TND) kernel, ``aclnnFlashAttentionVarLenScore``, is documented for Atlas A2 training only.
VARLEN_ATTENTION_CHIPS = ("A2",)
#: Input dtypes the op documents for query/key/value.
FUSED_ATTENTION_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
#: "D: Head Dim ... range 1~768".
MAX_HEAD_DIM = 768
#: "Nq range 1~256".
MAX_QUERY_HEADS = 256
#: "varlen ... actual_seq_qlen length at most 1K": longer packs are split into several calls.
MAX_VARLEN_DOCS = 1024
#: Values of the op's keyword defaults we rely on, passed explicitly so a changed default cannot bite.
KEEP_PROB = 1.0

_compressed_masks: dict[torch.device, torch.Tensor] = {}
_offsets_cache = None  # WeakTensorKeyDictionary: cu_seqlens tensor -> (version, host offsets)


# --------------------------------------------------------------------------------------------------
# the mask, in one audited place
# --------------------------------------------------------------------------------------------------


def compressed_causal_mask(device: torch.device) -> torch.Tensor:
    """The op's 2048 x 2048 bool ``triu(diagonal=1)`` mask (True = masked out) for sparse_mode 2/3, cached."""
    m = _compressed_masks.get(device)
    if m is None:
        n = COMPRESSED_MASK_SIZE
        m = _compressed_masks[device] = torch.ones(n, n, dtype=torch.bool, device=device).triu(diagonal=1)
    return m


def to_npu_atten_mask(attn_mask: torch.Tensor, *, causal: bool, batch: int, heads: int, sq: int,
                      sk: int) -> torch.Tensor:
    """SDPA boolean mask (True = KEEP) -> npu_fusion_attention ``atten_mask`` (True = MASKED OUT).

    The single place where the polarity flips. ``attn_mask`` broadcasts to (B, Hq, Sq, Sk) as for SDPA;
    the result has one of the shapes the op takes (SS, B1SS or BNSS, in that order of preference),
    is contiguous, and already contains the causal (top-left, SDPA ``is_causal``) constraint when
    ``causal`` is set, for use with ``sparse_mode=0``.
    """
    keep = attn_mask
    while keep.dim() < 4:
        keep = keep.unsqueeze(0)
    b, h = keep.shape[0], keep.shape[1]
    bad = keep.dim() != 4 or b not in (1, batch) or h not in (1, heads) or keep.shape[2] not in (1, sq) or \
        keep.shape[3] not in (1, sk)
    if bad:
        raise _cpu.AttentionInputError(
            f"attn_mask of shape {tuple(attn_mask.shape)} does not broadcast to (B={batch}, H={heads}, "
            f"Sq={sq}, Sk={sk}); pass a mask of shape (Sq, Sk), (B, 1, Sq, Sk) or (B, H, Sq, Sk)."
        )
    keep = keep.expand(b, h, sq, sk)
    if causal:
        keep = keep & torch.ones(sq, sk, dtype=torch.bool, device=keep.device).tril()
    masked = ~keep  # SDPA True = attend  ->  NPU True = do not attend
    if b == 1 and h == 1:
        return masked[0, 0].contiguous()  # "SS"
    return masked.contiguous()  # "B1SS" (h == 1) or "BNSS"


# --------------------------------------------------------------------------------------------------
# dispatch
# --------------------------------------------------------------------------------------------------


def fused_attention_unsupported(q: torch.Tensor, k: torch.Tensor, attn_mask: torch.Tensor | None,
                                packed: bool = False) -> str:
    """Why ``npu_fusion_attention`` cannot take these inputs ("" when it can). Cheap: no device sync."""
    chip = _runtime.chip_of(q.device)
    if chip not in FUSED_ATTENTION_CHIPS:
        return f"npu_fusion_attention is documented for {FUSED_ATTENTION_CHIPS} chips, this is {chip!r}"
    if packed and chip not in VARLEN_ATTENTION_CHIPS:
        return f"npu_fusion_attention's TND (varlen) kernel is documented for {VARLEN_ATTENTION_CHIPS}, this is {chip!r}"
    if q.dtype not in FUSED_ATTENTION_DTYPES:
        return f"npu_fusion_attention takes float16/bfloat16/float32, got {q.dtype}"
    if q.shape[-1] > MAX_HEAD_DIM:
        return f"head dim {q.shape[-1]} exceeds npu_fusion_attention's limit of {MAX_HEAD_DIM}"
    if q.shape[1] > MAX_QUERY_HEADS:
        return f"{q.shape[1]} query heads exceed npu_fusion_attention's limit of {MAX_QUERY_HEADS}"
    if attn_mask is not None and attn_mask.dtype != torch.bool:
        return "additive float attn_mask (npu_fusion_attention takes only boolean masks)"
    return ""


def _host_offsets(cu_seqlens: torch.Tensor) -> list[int]:
    """cu_seqlens on the host: one sync per offsets tensor (models pass the same one to every layer).

    Keyed by the tensor object (weakly) and its version counter, NOT by its address: a caching
    allocator hands a freed tensor's memory to the next step's offsets, which must be read again.
    """
    global _offsets_cache
    if _offsets_cache is None:
        from torch.utils.weak import WeakTensorKeyDictionary

        _offsets_cache = WeakTensorKeyDictionary()
    hit = _offsets_cache.get(cu_seqlens)
    if hit is not None and hit[0] == cu_seqlens._version:
        return hit[1]
    offs = [int(o) for o in cu_seqlens.tolist()]
    _offsets_cache[cu_seqlens] = (cu_seqlens._version, offs)
    return offs


def _fusion_attention(q, k, v, *, layout: str, scale: float, atten_mask=None, sparse_mode: int = SPARSE_MODE_DEFAULT,
                      actual_seq_qlen=None, actual_seq_kvlen=None) -> torch.Tensor:
    """One npu_fusion_attention call; returns its first output (the attention result)."""
    out = _runtime.torch_npu().npu_fusion_attention(
        q, k, v, q.shape[1], layout,  # head_num = query heads (N1): dim 1 in both BNSD and TND
        atten_mask=atten_mask,
        scale=scale,
        keep_prob=KEEP_PROB,
        actual_seq_qlen=actual_seq_qlen,
        actual_seq_kvlen=actual_seq_kvlen,
        sparse_mode=sparse_mode,
    )
    return out[0]


def _dense(q, k, v, causal, scale, attn_mask):
    b, hq, sq, _ = q.shape
    sk = k.shape[2]
    if attn_mask is not None:
        masked = to_npu_atten_mask(attn_mask, causal=causal, batch=b, heads=hq, sq=sq, sk=sk)
        # A query row with every key masked has no defined softmax; the op's output for it is not
        # documented (NPU.md: "fully masked rows" is a known trap), so such calls take the reference.
        if bool(masked.all(dim=-1).any()):
            return None, "attn_mask masks out every key of some query row"
        return _fusion_attention(q, k, v, layout="BNSD", scale=scale, atten_mask=masked,
                                 sparse_mode=SPARSE_MODE_DEFAULT), ""
    if causal:
        return _fusion_attention(q, k, v, layout="BNSD", scale=scale, atten_mask=compressed_causal_mask(q.device),
                                 sparse_mode=SPARSE_MODE_LEFT_UP_CAUSAL), ""
    return _fusion_attention(q, k, v, layout="BNSD", scale=scale), ""


def _packed(q, k, v, cu_seqlens, causal, scale):
    offs = _host_offsets(cu_seqlens)
    outs = []
    # The op takes at most MAX_VARLEN_DOCS documents per call; documents are independent, so a longer
    # pack is cut at document boundaries and each part's offsets rebased to start at its first token.
    for d0 in range(0, len(offs) - 1, MAX_VARLEN_DOCS):
        d1 = min(d0 + MAX_VARLEN_DOCS, len(offs) - 1)
        t0, t1 = offs[d0], offs[d1]
        ends = [o - t0 for o in offs[d0 + 1 : d1 + 1]]  # cumulative, WITHOUT the leading 0
        mask = compressed_causal_mask(q.device) if causal else None
        mode = SPARSE_MODE_RIGHT_DOWN_CAUSAL if causal else SPARSE_MODE_DEFAULT
        outs.append(_fusion_attention(q[t0:t1], k[t0:t1], v[t0:t1], layout="TND", scale=scale, atten_mask=mask,
                                      sparse_mode=mode, actual_seq_qlen=ends, actual_seq_kvlen=list(ends)))
    return outs[0] if len(outs) == 1 else torch.cat(outs, 0)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool = False,
              scale: float | None = None, attn_mask: torch.Tensor | None = None,
              cu_seqlens: torch.Tensor | None = None, max_seqlen: int | None = None) -> torch.Tensor:
    """The ``attention`` kernel (docs/CONTRACT.md) through ``torch_npu.npu_fusion_attention``.

    Same signature, layouts and errors as the CPU kernel; inputs the op cannot take run the CPU kernel
    (plain torch) on the NPU instead, with the reason counted (see the module docstring).

    Example::

        o = attention(q, k, v, causal=True)                  # q (B, Hq, S, D), k/v (B, Hkv, S, D) on npu
        o = attention(q, k, v, causal=True, cu_seqlens=cu)   # packed q (T, Hq, D), cu int32 [0, ..., T]
    """
    validate_attention_inputs(q, k, v, attn_mask=attn_mask, cu_seqlens=cu_seqlens, max_seqlen=max_seqlen)
    reason = fused_attention_unsupported(q, k, attn_mask, packed=cu_seqlens is not None)
    if not reason:
        scale_f = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
        if cu_seqlens is not None:
            return _packed(q, k, v, cu_seqlens, causal, scale_f)
        out, reason = _dense(q, k, v, causal, scale_f, attn_mask)
        if out is not None:
            return out
    _runtime.record_fallback("attention", reason)
    return _cpu.attention(q, k, v, causal=causal, scale=scale, attn_mask=attn_mask, cu_seqlens=cu_seqlens,
                          max_seqlen=max_seqlen)


KERNELS = {"attention": attention}
