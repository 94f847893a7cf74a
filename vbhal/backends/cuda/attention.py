"""Flash attention in Triton: forward and backward, dense (SDPA layout) and packed variable-length.

What: ``flash_attention(q, k, v, *, causal, scale, cu_seqlens, max_seqlen)`` computes
``softmax(q @ k^T * scale [+ causal mask]) @ v`` without materialising the S x S score matrix, in
the FlashAttention-2 scheme (Dao 2023, arXiv:2307.08691): each program keeps one block of queries,
streams key/value blocks through an online softmax with fp32 accumulators, and stores the
log-sum-exp (LSE) of every row so that the backward pass can recompute the probabilities block by
block instead of saving them.

Why our own kernel when PyTorch has SDPA: SDPA's fused backends cannot take packed variable-length
sequences, and for grouped-query attention (GQA/MQA) they expand K/V to the query head count. This
kernel reads K/V head ``h // (Hq // Hkv)`` directly (no repeat, no copy) and takes ``cu_seqlens``
offsets so documents packed into one sequence never attend to each other. The dispatcher
(``attention_dispatch.py``) picks between this kernel and SDPA's backends from measured numbers.

Layouts:
- dense: q (B, Hq, Sq, D), k/v (B, Hkv, Sk, D) (SDPA's layout); any strides with a unit last stride.
- packed: q (T, Hq, D), k/v (T, Hkv, D) and ``cu_seqlens`` int32 (ndocs + 1), starting at 0.

Causal masking is SDPA's ``is_causal``: aligned to the top-left corner (query i sees keys j <= i),
which is the usual mask when Sq == Sk.

Structure follows Triton's fused-attention tutorial (06) and FlashAttention-2, written for the plain
pointer API of Triton 3.x (no tensor descriptors, so it also runs under ``TRITON_INTERPRET=1``):
- grid order (all three kernels, ``_tile``): one flat grid over (batch * heads) x blocks, cut into
  L2 sections of a few (batch, head) pairs whose K/V (or Q/dO) fit in L2 together; inside a
  section heads run fastest and, causal, the longest blocks go first (FlashAttention-3's LPT tile
  scheduler), so the programs resident at once share their inputs through L2.
- forward: the key loop is split into blocks that need no mask (fully
  visible, fully inside the sequence) and the few blocks on the causal diagonal or the ragged end,
  so the hot loop carries no masking work (and with EVEN lengths no load masks anywhere). One inner
  loop serves pointer loads and TMA descriptor loads (``TMA`` constexpr); the per-block softmax
  update is one helper (``_online_softmax_step``).
- backward: ``delta = rowsum(dO * O)`` (a small kernel), then one kernel for dK/dV (grid over *K/V*
  heads and key blocks; it loops over the query heads of its group, so GQA needs no atomics and no
  repeated K/V) and one for dQ (grid over q heads and query blocks); only blocks on the causal
  diagonal or the ragged end carry masks.
Softmax is computed in base 2 (``exp2``) with ``log2(e)`` folded into the scale, as the tutorial does;
the stored LSE is in base 2 as well (an internal quantity, never returned to users).

The op is registered as ``torch.ops.vbhal.flash_attn_fwd`` / ``flash_attn_bwd`` with fake (meta)
implementations and autograd, so ``torch.compile`` traces it and autograd differentiates it.
"""


import math
import os
from typing import Optional

import torch
import triton
import triton.language as tl

from vbhal.backends.cpu.attention import AttentionInputError, autocast_inputs, validate_attention_inputs

__all__ = ["flash_attention", "KERNELS", "SUPPORTED_HEAD_DIMS", "supports"]

LOG2E = 1.4426950408889634  # log2(e): softmax in base 2, exp(x) = exp2(x * log2(e))
LN2 = 0.6931471805599453  # ln(2): converts a base-2 LSE back to natural log

#: Head dimensions the kernel takes. tl.arange needs a power of two; 16..256 covers the models we swap.
SUPPORTED_HEAD_DIMS = (16, 32, 64, 128, 256)
_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


#: Tests set this to fill every output buffer with NaN before the kernels run, so that an element a
#: kernel fails to write shows up as NaN instead of stale memory that happens to look right.
POISON_OUTPUTS = False


def _empty(shape, like: torch.Tensor, dtype=None) -> torch.Tensor:
    dtype = like.dtype if dtype is None else dtype
    if POISON_OUTPUTS:
        return torch.full(shape, float("nan"), device=like.device, dtype=dtype)
    return torch.empty(shape, device=like.device, dtype=dtype)


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


# --------------------------------------------------------------------------------------------------
# forward
# --------------------------------------------------------------------------------------------------


@triton.jit
def _online_softmax_step(acc, l_i, m_i, qk, keep, qk_scale, MASKED: tl.constexpr):
    """One key block of the online softmax (FlashAttention-2, base 2).

    ``qk`` is the raw ``q @ k^T`` block; returns the unnormalised probabilities ``p`` and the
    updated ``acc`` (rescaled, before ``p @ v`` is added), ``l_i`` and ``m_i``. Unmasked blocks fold
    the scale into one FMA (``qk * scale - m``); masked blocks set hidden scores to -inf first.
    """
    if MASKED:
        qk = tl.where(keep, qk * qk_scale, float("-inf"))
        m_ij = tl.maximum(m_i, tl.max(qk, 1))
        qk = qk - m_ij[:, None]
    else:
        m_ij = tl.maximum(m_i, tl.max(qk, 1) * qk_scale)
        qk = qk * qk_scale - m_ij[:, None]
    p = tl.math.exp2(qk)
    alpha = tl.math.exp2(m_i - m_ij)
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None]
    return p, acc, l_i, m_ij


@triton.jit
def _load_kv(ptrs, desc, kv_row, start_n, cols, seq_k, BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr,
             TRANS: tl.constexpr, MASKED: tl.constexpr, EVEN_K: tl.constexpr, TMA: tl.constexpr):
    """One K (TRANS: as K^T, (D, BLOCK_N)) or V ((BLOCK_N, D)) tile by TMA or by pointers.

    Pointer loads are masked at the sequence end only in MASKED blocks of uneven lengths; TMA
    zero-fills out-of-range rows by itself.
    """
    if TMA:
        t = desc.load([kv_row, start_n, 0]).reshape(BLOCK_N, HEAD_DIM)
        if TRANS:
            t = tl.trans(t)
    else:
        if MASKED:
            if EVEN_K:
                t = tl.load(ptrs)
            else:
                if TRANS:
                    t = tl.load(ptrs, mask=cols[None, :] < seq_k, other=0.0)
                else:
                    t = tl.load(ptrs, mask=cols[:, None] < seq_k, other=0.0)
        else:
            t = tl.load(ptrs)
    return t


@triton.jit
def _fwd_inner(acc, l_i, m_i, q, K, V, kv_row, stride_kn, stride_vn, offs_m, offs_n, offs_d,
               seq_k, qk_scale, lo, hi,
               BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr, CAUSAL: tl.constexpr, MASKED: tl.constexpr,
               EVEN_K: tl.constexpr, TMA: tl.constexpr, PIPE: tl.constexpr):
    """Online softmax over key blocks [lo, hi) of one query block.

    K/V are base pointers (with token strides) or, with TMA, descriptors over (B*Hkv, S, D) whose
    plane ``kv_row`` is read (tiles past Sk arrive zero-filled). MASKED adds the causal mask and,
    unless EVEN_K (Sk a multiple of BLOCK_N), the sequence-end mask; unmasked blocks carry no mask work.
    PIPE (unmasked blocks only) rotates the loop so that ``q @ k^T`` of block j+1 is issued before
    the softmax of block j, letting the tensor cores work while the softmax runs (FlashAttention-3's
    intra-warpgroup overlap, written as plain Triton; costs one more (BLOCK_M, BLOCK_N) fp32 tile).
    """
    if TMA:
        kt_ptrs = 0
        v_ptrs = 0
    else:
        kt_ptrs = K + (lo + offs_n)[None, :] * stride_kn + offs_d[:, None]
        v_ptrs = V + (lo + offs_n)[:, None] * stride_vn + offs_d[None, :]
    if PIPE:  # the caller passes PIPE only for its unmasked stage
        if lo < hi:
            kt = _load_kv(kt_ptrs, K, kv_row, lo, offs_n, seq_k, BLOCK_N, HEAD_DIM, True, False, EVEN_K, TMA)
            qk = tl.dot(q, kt)
            for start_n in range(lo + BLOCK_N, hi, BLOCK_N):
                start_n = tl.multiple_of(start_n, BLOCK_N)
                if not TMA:
                    kt_ptrs += BLOCK_N * stride_kn
                kt = _load_kv(kt_ptrs, K, kv_row, start_n, offs_n, seq_k, BLOCK_N, HEAD_DIM, True, False, EVEN_K, TMA)
                qk_next = tl.dot(q, kt)
                p, acc, l_i, m_i = _online_softmax_step(acc, l_i, m_i, qk, qk, qk_scale, False)
                v = _load_kv(v_ptrs, V, kv_row, start_n - BLOCK_N, offs_n, seq_k, BLOCK_N, HEAD_DIM, False, False, EVEN_K, TMA)
                acc = tl.dot(p.to(v.dtype), v, acc)
                if not TMA:
                    v_ptrs += BLOCK_N * stride_vn
                qk = qk_next
            p, acc, l_i, m_i = _online_softmax_step(acc, l_i, m_i, qk, qk, qk_scale, False)
            v = _load_kv(v_ptrs, V, kv_row, hi - BLOCK_N, offs_n, seq_k, BLOCK_N, HEAD_DIM, False, False, EVEN_K, TMA)
            acc = tl.dot(p.to(v.dtype), v, acc)
    else:
        for start_n in range(lo, hi, BLOCK_N):
            start_n = tl.multiple_of(start_n, BLOCK_N)
            cols = start_n + offs_n
            kt = _load_kv(kt_ptrs, K, kv_row, start_n, cols, seq_k, BLOCK_N, HEAD_DIM, True, MASKED, EVEN_K, TMA)
            qk = tl.dot(q, kt)
            keep = cols[None, :] < seq_k  # only used when MASKED
            if MASKED:
                if CAUSAL:
                    if EVEN_K:
                        keep = offs_m[:, None] >= cols[None, :]
                    else:
                        keep = keep & (offs_m[:, None] >= cols[None, :])
            p, acc, l_i, m_i = _online_softmax_step(acc, l_i, m_i, qk, keep, qk_scale, MASKED)
            v = _load_kv(v_ptrs, V, kv_row, start_n, cols, seq_k, BLOCK_N, HEAD_DIM, False, MASKED, EVEN_K, TMA)
            acc = tl.dot(p.to(v.dtype), v, acc)
            if not TMA:
                kt_ptrs += BLOCK_N * stride_kn
                v_ptrs += BLOCK_N * stride_vn
    return acc, l_i, m_i


@triton.jit
def _sequence(CU, off_b, SEQ_Q, SEQ_K, VARLEN: tl.constexpr):
    """(first token, query length, key length) of batch entry ``off_b``: read from the cumulative
    offsets CU when VARLEN (packed documents: queries and keys are the same tokens), else the fixed
    lengths from a token offset of 0."""
    if VARLEN:
        tok0 = tl.load(CU + off_b).to(tl.int64)
        seq = (tl.load(CU + off_b + 1) - tl.load(CU + off_b)).to(tl.int32)
        return tok0, seq, seq
    else:
        return 0, SEQ_Q, SEQ_K


@triton.jit
def _tile(pid, n_bh, n_blocks, section, REVERSE: tl.constexpr):
    """Grid index -> (batch * head, block) in L2 sections (FlashAttention-3's LPT tile scheduler).

    The (batch, head) pairs are cut into sections of ``section`` pairs whose K/V (forward, dQ) or
    Q/dO (dK/dV) fit in L2 together; sections run one after another, and inside a section the
    block index runs slowest and the pair fastest, so that the programs resident at once share a
    few pairs' tensors through L2 instead of streaming every pair's from HBM. REVERSE (causal
    forward and dQ) issues the last query blocks, the longest under the causal mask, first in each
    section (longest-processing-time-first). ``section >= n_bh`` is the plain heads-fastest order.
    """
    per = section * n_blocks
    sec = pid // per
    r = pid - sec * per
    width = tl.minimum(section, n_bh - sec * section)  # the last section may hold fewer pairs
    blk = r // width
    off_bh = sec * section + (r - blk * width)
    if REVERSE:
        blk = n_blocks - 1 - blk
    return off_bh, blk


@triton.jit
def _fwd_kernel(Q, K, V, O, LSE, CU,
                stride_qb, stride_qh, stride_qm,
                stride_kb, stride_kh, stride_kn,
                stride_vb, stride_vh, stride_vn,
                stride_ob, stride_oh, stride_om,
                stride_lb, stride_lh,
                H, GROUP, SEQ_Q, SEQ_K, qk_scale, N_BH, N_BLOCKS, SECTION,
                HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                CAUSAL: tl.constexpr, VARLEN: tl.constexpr, EVEN: tl.constexpr, TMA: tl.constexpr,
                PIPE: tl.constexpr):
    """Forward of one (query block, batch * q head). Grid: (B * Hq * query blocks,), see ``_tile``.

    Within an L2 section the (batch, head) index runs fastest so that the programs resident at once
    take the *same* query block of several heads; with causal masking the longest blocks (last rows)
    are launched first and each section ends with short ones (longest-processing-time-first).
    EVEN: dense, Sq % BLOCK_M == 0 and Sk % BLOCK_N == 0 (no sequence-end masks anywhere).
    TMA: Q/K/V/O are tensor descriptors over (B*H, S, D) views (dense, contiguous, sm_90+).
    PIPE: the unmasked key loop overlaps the next ``q @ k^T`` with the softmax (see ``_fwd_inner``).
    """
    off_bh, start_m = _tile(tl.program_id(0), N_BH, N_BLOCKS, SECTION, CAUSAL)
    off_b = off_bh // H
    off_h = off_bh % H
    off_hk = off_h // GROUP  # GQA: the K/V head this query head reads (no repeat)
    tok0, seq_q, seq_k = _sequence(CU, off_b, SEQ_Q, SEQ_K, VARLEN)
    if start_m * BLOCK_M < seq_q:
        offs_m = start_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_n = tl.arange(0, BLOCK_N)
        offs_d = tl.arange(0, HEAD_DIM)
        row_ok = offs_m < seq_q
        kv_row = off_b * (H // GROUP) + off_hk
        if TMA:
            q = Q.load([off_bh, start_m * BLOCK_M, 0]).reshape(BLOCK_M, HEAD_DIM)
            k_base = K
            v_base = V
        else:
            q_base = Q + off_b.to(tl.int64) * stride_qb + off_h.to(tl.int64) * stride_qh + tok0 * stride_qm
            k_base = K + off_b.to(tl.int64) * stride_kb + off_hk.to(tl.int64) * stride_kh + tok0 * stride_kn
            v_base = V + off_b.to(tl.int64) * stride_vb + off_hk.to(tl.int64) * stride_vh + tok0 * stride_vn
            q_ptrs = q_base + offs_m[:, None] * stride_qm + offs_d[None, :]
            if EVEN:
                q = tl.load(q_ptrs)
            else:
                q = tl.load(q_ptrs, mask=row_ok[:, None], other=0.0)

        m_i = tl.zeros([BLOCK_M], dtype=tl.float32) - float("inf")
        l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
        acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
        if CAUSAL:
            hi = tl.minimum(seq_k, (start_m + 1) * BLOCK_M)
            full = tl.minimum(seq_k, start_m * BLOCK_M)
        else:
            hi = seq_k
            full = seq_k
        full = (full // BLOCK_N) * BLOCK_N
        # Stage 1: key blocks every row of this query block sees completely: no mask work.
        acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q, k_base, v_base, kv_row, stride_kn, stride_vn, offs_m,
                                   offs_n, offs_d, seq_k, qk_scale, 0, full,
                                   BLOCK_N, HEAD_DIM, CAUSAL, False, EVEN, TMA, PIPE)
        # Stage 2: the causal diagonal and the ragged end of the sequence.
        acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q, k_base, v_base, kv_row, stride_kn, stride_vn, offs_m,
                                   offs_n, offs_d, seq_k, qk_scale, full, hi,
                                   BLOCK_N, HEAD_DIM, CAUSAL, True, EVEN, TMA, False)
        acc = acc / l_i[:, None]
        lse = m_i + tl.math.log2(l_i)
        lse_ptrs = LSE + off_b.to(tl.int64) * stride_lb + off_h.to(tl.int64) * stride_lh + tok0 + offs_m
        if TMA:
            O.store([off_bh, start_m * BLOCK_M, 0], acc.to(q.dtype).reshape(1, BLOCK_M, HEAD_DIM))
            tl.store(lse_ptrs, lse, mask=row_ok)
        else:
            o_base = O + off_b.to(tl.int64) * stride_ob + off_h.to(tl.int64) * stride_oh + tok0 * stride_om
            o_ptrs = o_base + offs_m[:, None] * stride_om + offs_d[None, :]
            if EVEN:
                tl.store(o_ptrs, acc.to(O.dtype.element_ty))
                tl.store(lse_ptrs, lse)
            else:
                tl.store(o_ptrs, acc.to(O.dtype.element_ty), mask=row_ok[:, None])
                tl.store(lse_ptrs, lse, mask=row_ok)


# --------------------------------------------------------------------------------------------------
# backward
# --------------------------------------------------------------------------------------------------


@triton.jit
def _bwd_delta_kernel(O, DO, DELTA, N_ROWS, H,
                      stride_or, stride_oh, stride_dor, stride_doh, stride_dr, stride_dh,
                      HEAD_DIM: tl.constexpr, BLOCK: tl.constexpr):
    """delta[h, r] = sum_d O[r, h, d] * dO[r, h, d] in fp32, for rows r of one head."""
    pid = tl.program_id(0)
    off_h = tl.program_id(1)
    rows = pid * BLOCK + tl.arange(0, BLOCK)
    offs_d = tl.arange(0, HEAD_DIM)
    ok = rows < N_ROWS
    o = tl.load(O + off_h.to(tl.int64) * stride_oh + rows[:, None].to(tl.int64) * stride_or + offs_d[None, :],
                mask=ok[:, None], other=0.0).to(tl.float32)
    do = tl.load(DO + off_h.to(tl.int64) * stride_doh + rows[:, None].to(tl.int64) * stride_dor + offs_d[None, :],
                 mask=ok[:, None], other=0.0).to(tl.float32)
    tl.store(DELTA + off_h.to(tl.int64) * stride_dh + rows.to(tl.int64) * stride_dr, tl.sum(o * do, 1), mask=ok)


@triton.jit
def _bwd_dkdv_inner(dk, dv, k, v, q_base, do_base, lse_base, delta_base, stride_qm, stride_dom,
                    dq_base, stride_dqm, sm_scale, col_ok,
                    offs_n, offs_d, seq_q, qk_scale, lo, hi,
                    BLOCK_M: tl.constexpr, CAUSAL_MASK: tl.constexpr, BOUNDARY: tl.constexpr,
                    ATOMIC_DQ: tl.constexpr):
    """Accumulate dK, dV of one key block over query blocks [lo, hi) of one query head.

    Rows past the sequence end load q = dO = lse = delta = 0, which makes their contribution exactly
    zero (p = 1 but dO = 0 and dS = p * (0 - 0) = 0), so the boundary needs masked loads only.
    With ATOMIC_DQ, dQ is accumulated here too (FlashAttention-2's scheme: fp32 atomic adds of
    dS @ K into a zeroed buffer), saving the dQ kernel's recomputation of P and dP.
    """
    offs_mb = tl.arange(0, BLOCK_M)
    qt_ptrs = q_base + (lo + offs_mb)[None, :] * stride_qm + offs_d[:, None]
    do_ptrs = do_base + (lo + offs_mb)[:, None] * stride_dom + offs_d[None, :]
    for start_m in range(lo, hi, BLOCK_M):
        start_m = tl.multiple_of(start_m, BLOCK_M)
        rows = start_m + offs_mb
        if BOUNDARY:
            ok = rows < seq_q
            qt = tl.load(qt_ptrs, mask=ok[None, :], other=0.0)
            lse = tl.load(lse_base + rows, mask=ok, other=0.0)
            do = tl.load(do_ptrs, mask=ok[:, None], other=0.0)
            delta = tl.load(delta_base + rows, mask=ok, other=0.0)
        else:
            qt = tl.load(qt_ptrs)
            lse = tl.load(lse_base + rows)
            do = tl.load(do_ptrs)
            delta = tl.load(delta_base + rows)
        qkt = tl.dot(k, qt)  # (BLOCK_N, BLOCK_M): scores transposed
        pt = tl.math.exp2(qkt * qk_scale - lse[None, :])
        if CAUSAL_MASK:
            pt = tl.where(rows[None, :] >= offs_n[:, None], pt, 0.0)
        dv = tl.dot(pt.to(do.dtype), do, dv)
        dpt = tl.dot(v, tl.trans(do))
        dst = pt * (dpt - delta[None, :])
        if ATOMIC_DQ:
            # Padded key rows (k = 0) must not add exp2(-lse) * 0 = inf * 0 into dQ.
            dst = tl.where(col_ok[:, None], dst, 0.0)
        dst = dst.to(qt.dtype)
        dk = tl.dot(dst, tl.trans(qt), dk)
        if ATOMIC_DQ:
            dq = tl.dot(tl.trans(dst), k) * sm_scale  # (BLOCK_M, HEAD_DIM)
            dq_ptrs = dq_base + rows[:, None] * stride_dqm + offs_d[None, :]
            if BOUNDARY:
                tl.atomic_add(dq_ptrs, dq, mask=(rows < seq_q)[:, None], sem="relaxed")
            else:
                tl.atomic_add(dq_ptrs, dq, sem="relaxed")
        qt_ptrs += BLOCK_M * stride_qm
        do_ptrs += BLOCK_M * stride_dom
    return dk, dv


@triton.jit
def _bwd_dkdv_kernel(Q, K, V, DO, DK, DV, DQ, LSE, DELTA, CU,
                     stride_qb, stride_qh, stride_qm,
                     stride_kb, stride_kh, stride_kn,
                     stride_vb, stride_vh, stride_vn,
                     stride_dob, stride_doh, stride_dom,
                     stride_dkb, stride_dkh, stride_dkn,
                     stride_dvb, stride_dvh, stride_dvn,
                     stride_dqb, stride_dqh, stride_dqm,
                     stride_lb, stride_lh,
                     H_KV, GROUP, SEQ_Q, SEQ_K, qk_scale, sm_scale, N_BH, N_BLOCKS, SECTION,
                     HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                     CAUSAL: tl.constexpr, VARLEN: tl.constexpr, ATOMIC_DQ: tl.constexpr):
    # Grid (B * Hkv * key blocks,) in L2 sections (``_tile``): heads run fastest within a section,
    # so with causal masking the longest key blocks (the first ones, seen by the most queries)
    # start first in each section.
    off_bh, pid_n = _tile(tl.program_id(0), N_BH, N_BLOCKS, SECTION, False)
    off_b = off_bh // H_KV
    off_hk = off_bh % H_KV
    tok0, seq_q, seq_k = _sequence(CU, off_b, SEQ_Q, SEQ_K, VARLEN)
    start_n = pid_n * BLOCK_N
    if start_n < seq_k:
        offs_n = start_n + tl.arange(0, BLOCK_N)
        offs_d = tl.arange(0, HEAD_DIM)
        col_ok = offs_n < seq_k
        k_base = K + off_b.to(tl.int64) * stride_kb + off_hk.to(tl.int64) * stride_kh + tok0 * stride_kn
        v_base = V + off_b.to(tl.int64) * stride_vb + off_hk.to(tl.int64) * stride_vh + tok0 * stride_vn
        k = tl.load(k_base + offs_n[:, None] * stride_kn + offs_d[None, :], mask=col_ok[:, None], other=0.0)
        v = tl.load(v_base + offs_n[:, None] * stride_vn + offs_d[None, :], mask=col_ok[:, None], other=0.0)
        dk = tl.zeros([BLOCK_N, HEAD_DIM], dtype=tl.float32)
        dv = tl.zeros([BLOCK_N, HEAD_DIM], dtype=tl.float32)
        # Query-block ranges: [lo, mid) crosses the causal diagonal (masked), [mid, full) needs no
        # mask, [max(mid, full), seq_q) is the ragged end (masked loads).
        full = (seq_q // BLOCK_M) * BLOCK_M
        if CAUSAL:
            lo = (start_n // BLOCK_M) * BLOCK_M
            mid = tl.cdiv(start_n + BLOCK_N, BLOCK_M) * BLOCK_M
            mid = tl.minimum(mid, tl.cdiv(seq_q, BLOCK_M) * BLOCK_M)
            lo = tl.minimum(lo, mid)
        else:
            lo = 0
            mid = 0
        tail = tl.maximum(mid, full)
        for g in range(0, GROUP):
            off_h = off_hk * GROUP + g
            q_base = Q + off_b.to(tl.int64) * stride_qb + off_h.to(tl.int64) * stride_qh + tok0 * stride_qm
            do_base = DO + off_b.to(tl.int64) * stride_dob + off_h.to(tl.int64) * stride_doh + tok0 * stride_dom
            lse_base = LSE + off_b.to(tl.int64) * stride_lb + off_h.to(tl.int64) * stride_lh + tok0
            delta_base = DELTA + off_b.to(tl.int64) * stride_lb + off_h.to(tl.int64) * stride_lh + tok0
            dq_base = DQ + off_b.to(tl.int64) * stride_dqb + off_h.to(tl.int64) * stride_dqh + tok0 * stride_dqm
            if CAUSAL:
                dk, dv = _bwd_dkdv_inner(dk, dv, k, v, q_base, do_base, lse_base, delta_base, stride_qm,
                                         stride_dom, dq_base, stride_dqm, sm_scale, col_ok,
                                         offs_n, offs_d, seq_q, qk_scale, lo, mid,
                                         BLOCK_M, True, True, ATOMIC_DQ)
            dk, dv = _bwd_dkdv_inner(dk, dv, k, v, q_base, do_base, lse_base, delta_base, stride_qm,
                                     stride_dom, dq_base, stride_dqm, sm_scale, col_ok,
                                     offs_n, offs_d, seq_q, qk_scale, mid, full,
                                     BLOCK_M, False, False, ATOMIC_DQ)
            dk, dv = _bwd_dkdv_inner(dk, dv, k, v, q_base, do_base, lse_base, delta_base, stride_qm,
                                     stride_dom, dq_base, stride_dqm, sm_scale, col_ok,
                                     offs_n, offs_d, seq_q, qk_scale, tail, seq_q,
                                     BLOCK_M, False, True, ATOMIC_DQ)
        dk = dk * sm_scale
        dk_base = DK + off_b.to(tl.int64) * stride_dkb + off_hk.to(tl.int64) * stride_dkh + tok0 * stride_dkn
        dv_base = DV + off_b.to(tl.int64) * stride_dvb + off_hk.to(tl.int64) * stride_dvh + tok0 * stride_dvn
        tl.store(dk_base + offs_n[:, None] * stride_dkn + offs_d[None, :], dk.to(DK.dtype.element_ty),
                 mask=col_ok[:, None])
        tl.store(dv_base + offs_n[:, None] * stride_dvn + offs_d[None, :], dv.to(DV.dtype.element_ty),
                 mask=col_ok[:, None])


@triton.jit
def _bwd_dq_inner(dq, q, do, lse, delta, k_base, v_base, stride_kn, stride_vn, offs_m, offs_d,
                  seq_k, qk_scale, lo, hi,
                  BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr, MASKED: tl.constexpr):
    offs_nb = tl.arange(0, BLOCK_N)
    kt_ptrs = k_base + (lo + offs_nb)[None, :] * stride_kn + offs_d[:, None]
    vt_ptrs = v_base + (lo + offs_nb)[None, :] * stride_vn + offs_d[:, None]
    for start_n in range(lo, hi, BLOCK_N):
        start_n = tl.multiple_of(start_n, BLOCK_N)
        cols = start_n + offs_nb
        if MASKED:
            kt = tl.load(kt_ptrs, mask=cols[None, :] < seq_k, other=0.0)
            vt = tl.load(vt_ptrs, mask=cols[None, :] < seq_k, other=0.0)
        else:
            kt = tl.load(kt_ptrs)
            vt = tl.load(vt_ptrs)
        qk = tl.dot(q, kt)
        p = tl.math.exp2(qk * qk_scale - lse[:, None])
        if MASKED:
            # Must be explicit: exp2(0 - lse) of a padded column need not be small.
            keep = cols[None, :] < seq_k
            if CAUSAL:
                keep = keep & (offs_m[:, None] >= cols[None, :])
            p = tl.where(keep, p, 0.0)
        dp = tl.dot(do, vt)
        ds = p * (dp - delta[:, None])
        dq = tl.dot(ds.to(kt.dtype), tl.trans(kt), dq)
        kt_ptrs += BLOCK_N * stride_kn
        vt_ptrs += BLOCK_N * stride_vn
    return dq


@triton.jit
def _bwd_dq_kernel(Q, K, V, DO, DQ, LSE, DELTA, CU,
                   stride_qb, stride_qh, stride_qm,
                   stride_kb, stride_kh, stride_kn,
                   stride_vb, stride_vh, stride_vn,
                   stride_dob, stride_doh, stride_dom,
                   stride_dqb, stride_dqh, stride_dqm,
                   stride_lb, stride_lh,
                   H, GROUP, SEQ_Q, SEQ_K, qk_scale, sm_scale, N_BH, N_BLOCKS, SECTION,
                   HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                   CAUSAL: tl.constexpr, VARLEN: tl.constexpr):
    # Grid (B * Hq * query blocks,) in L2 sections (``_tile``): longest causal blocks first.
    off_bh, start_m = _tile(tl.program_id(0), N_BH, N_BLOCKS, SECTION, CAUSAL)
    off_b = off_bh // H
    off_h = off_bh % H
    off_hk = off_h // GROUP
    tok0, seq_q, seq_k = _sequence(CU, off_b, SEQ_Q, SEQ_K, VARLEN)
    if start_m * BLOCK_M < seq_q:
        offs_m = start_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_d = tl.arange(0, HEAD_DIM)
        row_ok = offs_m < seq_q
        q_base = Q + off_b.to(tl.int64) * stride_qb + off_h.to(tl.int64) * stride_qh + tok0 * stride_qm
        do_base = DO + off_b.to(tl.int64) * stride_dob + off_h.to(tl.int64) * stride_doh + tok0 * stride_dom
        k_base = K + off_b.to(tl.int64) * stride_kb + off_hk.to(tl.int64) * stride_kh + tok0 * stride_kn
        v_base = V + off_b.to(tl.int64) * stride_vb + off_hk.to(tl.int64) * stride_vh + tok0 * stride_vn
        lse_base = LSE + off_b.to(tl.int64) * stride_lb + off_h.to(tl.int64) * stride_lh + tok0
        delta_base = DELTA + off_b.to(tl.int64) * stride_lb + off_h.to(tl.int64) * stride_lh + tok0
        q = tl.load(q_base + offs_m[:, None] * stride_qm + offs_d[None, :], mask=row_ok[:, None], other=0.0)
        do = tl.load(do_base + offs_m[:, None] * stride_dom + offs_d[None, :], mask=row_ok[:, None], other=0.0)
        lse = tl.load(lse_base + offs_m, mask=row_ok, other=0.0)
        delta = tl.load(delta_base + offs_m, mask=row_ok, other=0.0)
        dq = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
        if CAUSAL:
            hi = tl.minimum(seq_k, (start_m + 1) * BLOCK_M)
            full = tl.minimum(seq_k, start_m * BLOCK_M)
        else:
            hi = seq_k
            full = seq_k
        full = (full // BLOCK_N) * BLOCK_N
        dq = _bwd_dq_inner(dq, q, do, lse, delta, k_base, v_base, stride_kn, stride_vn, offs_m, offs_d,
                           seq_k, qk_scale, 0, full, BLOCK_N, CAUSAL, False)
        dq = _bwd_dq_inner(dq, q, do, lse, delta, k_base, v_base, stride_kn, stride_vn, offs_m, offs_d,
                           seq_k, qk_scale, full, hi, BLOCK_N, CAUSAL, True)
        dq = dq * sm_scale
        dq_base = DQ + off_b.to(tl.int64) * stride_dqb + off_h.to(tl.int64) * stride_dqh + tok0 * stride_dqm
        tl.store(dq_base + offs_m[:, None] * stride_dqm + offs_d[None, :], dq.to(DQ.dtype.element_ty),
                 mask=row_ok[:, None])


# --------------------------------------------------------------------------------------------------
# launch configuration
# --------------------------------------------------------------------------------------------------

# (BLOCK_M, BLOCK_N, num_warps, num_stages) per kernel and head dim, for sm_90 (H100). Measured
# choices live here (see benchmarks/tune_attention.py; round 1 found the TMA forward and the
# atomic-dQ backward slower, so both stay off); VBHAL_ATTN_CONFIG="fwd=128,64,8,3;..." overrides for
# tuning runs. Keys: (kernel, hd), (kernel, hd, causal) and (kernel, hd, causal, S bucket) (see
# ``_seq_bucket``), the most specific present wins. Other GPUs get the same blocks.
_GPU_CONFIGS: dict[tuple, tuple[int, int, int, int]] = {
    # H100 sweep, round 4 (bf16, 16k tokens, S=4k/8k/16k, hd128 causal): forward 128x64 blocks 8 warps
    # 3 stages 416/474/500 TFLOP/s vs 385/452/486 with 128x128 (the pipe and TMA variants slower);
    # dK/dV 32x64 4 warps 3 stages 385 fwd+bwd TFLOP/s mean vs 373 with the old 64x128x8 (which
    # spills at hd128); dQ 128x64x8x3 stays. Round 1: non-causal prefers 128x64 (478 vs 465).
    ("fwd", 128, True): (128, 64, 8, 3),
    ("dkdv", 128, True): (32, 64, 4, 3),
    # round 2 sweep, hd64 causal: 128x64 blocks with 4 stages 351 TFLOP/s vs 327 with 3 (round 4: 396,
    # best of five, pipe variant 350)
    ("fwd", 64, True): (128, 64, 4, 4),
    ("fwd", 16): (128, 64, 4, 3),
    ("fwd", 32): (128, 64, 4, 3),
    ("fwd", 64): (128, 64, 4, 3),
    ("fwd", 128): (128, 64, 8, 3),
    ("fwd", 256): (64, 32, 4, 2),
    ("dkdv", 16): (64, 128, 8, 3),
    ("dkdv", 32): (64, 128, 8, 3),
    ("dkdv", 64): (64, 128, 8, 3),
    ("dkdv", 128): (64, 128, 8, 3),
    ("dkdv", 256): (32, 64, 4, 2),
    ("dq", 16): (128, 64, 8, 3),
    ("dq", 32): (128, 64, 8, 3),
    ("dq", 64): (128, 64, 8, 3),
    ("dq", 128): (128, 64, 8, 3),
    ("dq", 256): (64, 32, 4, 2),
}
for _d in SUPPORTED_HEAD_DIMS:
    _GPU_CONFIGS[("dkdv_atomic", _d)] = _GPU_CONFIGS[("dkdv", _d)]
for _d in SUPPORTED_HEAD_DIMS:
    _GPU_CONFIGS[("fwd_tma", _d)] = _GPU_CONFIGS[("fwd", _d)]
_GPU_CONFIGS[("fwd_tma", 128, True)] = _GPU_CONFIGS[("fwd", 128, True)]
#: Head dims whose dense forward uses TMA descriptors on sm_90+ (measured choice; see tune_attention.py).
TMA_FWD_HEAD_DIMS: frozenset = frozenset()
#: Head dims whose forward issues the next q @ k^T before the softmax (measured choice; see tune_attention.py;
#: pin together with a config that fits, e.g. 128x64 blocks at hd128: 128x128 with PIPE exceeds sm_90's smem).
PIPE_QK_HEAD_DIMS: frozenset = frozenset()
#: Whether dQ is accumulated with atomics in the dK/dV kernel (measured choice; see tune_attention.py).
ATOMIC_DQ_DEFAULT = False
#: L2 bytes one grid section's shared tensors may take (``_tile``): the pairs of a section read the
#: same K/V (forward, dQ) or Q/dO (dK/dV) while resident together. FlashAttention-3 assumes 32 MiB of
#: the H100's 50 MiB for this. VBHAL_ATTN_L2_MB overrides ("0": no sections, the plain heads-fastest
#: order; "32" for every kernel; "fwd:32,dkdv:16,dq:0" per kernel).
#: Off by default: on the H100 (R5, bf16 hd128 causal, 16k tokens per batch) 32 MiB sections measured slower than
#: the plain order in the benchmark grid (forward 344/418/442 TFLOP/s at S=4k/8k/16k against 381/417/456, and
#: forward+backward 0.61-0.66x cuDNN against 0.72-0.78x), so the plain heads-fastest order stays.
L2_SECTION_MB = {"fwd": 0.0, "dkdv": 0.0, "dq": 0.0}

# Under the interpreter every block is simulated in numpy: small blocks keep CPU tests quick and make
# short test sequences cross several blocks (diagonal, unmasked middle and ragged end all exercised).
_INTERPRET_CONFIG = (16, 16, 4, 1)
#: Interpreter section size (pairs): small, so that tests cross section boundaries and partial sections.
_INTERPRET_SECTION = 2


def _flag(var: str, default: bool, head_dim: int) -> bool:
    """An on/off environment override: "1"/"0", or the head dims it applies to ("128" or "128,64")."""
    flag = os.environ.get(var)
    if flag is None:
        return default
    if flag in ("0", "1"):
        return flag == "1"
    return str(head_dim) in flag.split(",")


def _use_tma(q, k, v) -> bool:
    """TMA forward (VBHAL_ATTN_TMA=1/0/head dims overrides the default): dense contiguous tensors on sm_90+."""
    if not _flag("VBHAL_ATTN_TMA", q.shape[-1] in TMA_FWD_HEAD_DIMS, q.shape[-1]):
        return False
    if not all(t.is_contiguous() for t in (q, k, v)):
        return False
    if _interpreting():
        return True
    return q.is_cuda and torch.cuda.get_device_capability(q.device)[0] >= 9


def _pipe_qk(head_dim: int) -> bool:
    """Forward loop overlapping the next q @ k^T with the softmax (VBHAL_ATTN_PIPE=1/0/head dims overrides)."""
    return _flag("VBHAL_ATTN_PIPE", head_dim in PIPE_QK_HEAD_DIMS, head_dim)


def _atomic_dq() -> bool:
    """dQ by fp32 atomics inside the dK/dV kernel (VBHAL_ATTN_ATOMIC_DQ=1/0 overrides the default)."""
    flag = os.environ.get("VBHAL_ATTN_ATOMIC_DQ")
    return ATOMIC_DQ_DEFAULT if flag is None else flag == "1"


def _seq_bucket(seq: int) -> int:
    """The S bucket of per-length configs: the power of two >= seq, clamped to [1024, 16384]."""
    return min(16384, max(1024, 1 << max(0, int(seq) - 1).bit_length()))


def _config(kernel: str, head_dim: int, causal: Optional[bool] = None,
            seq: Optional[int] = None) -> tuple[int, int, int, int]:
    """(BLOCK_M, BLOCK_N, num_warps, num_stages) of one kernel.

    VBHAL_ATTN_CONFIG overrides, for tuning runs: ``"fwd=128,64,8,3;dq@128=64,64,4,2;fwd@64@1=...;
    fwd@128@1@4096=..."``; a key names the kernel, optionally ``@head_dim``, ``@causal`` (1/0) and
    ``@S bucket`` (``_seq_bucket``); the most specific wins.
    """
    c = "" if causal is None else str(int(causal))
    b = None if seq is None or causal is None else _seq_bucket(seq)
    override = os.environ.get("VBHAL_ATTN_CONFIG")
    if override:
        found = {}
        for part in filter(None, override.split(";")):
            name, _, values = part.partition("=")
            found[name.strip()] = tuple(int(x) for x in values.split(","))
        keys = ([f"{kernel}@{head_dim}@{c}@{b}"] if b else []) + [f"{kernel}@{head_dim}@{c}", f"{kernel}@{head_dim}", kernel]
        for key in keys:
            if key in found:
                return found[key]
    if _interpreting():
        return _INTERPRET_CONFIG
    return (_GPU_CONFIGS.get((kernel, head_dim, causal, b)) or _GPU_CONFIGS.get((kernel, head_dim, causal))
            or _GPU_CONFIGS[(kernel, head_dim)])


def _l2_budget_mb(kernel: str) -> Optional[float]:
    """VBHAL_ATTN_L2_MB for one kernel ("32", or "fwd:32,dkdv:16"), else None (the default)."""
    flag = os.environ.get("VBHAL_ATTN_L2_MB")
    if not flag:
        return None
    if ":" not in flag:
        return float(flag)
    for part in flag.split(","):
        name, _, mb = part.partition(":")
        if name.strip() == kernel:
            return float(mb)
    return None


def _section(kernel: str, n_bh: int, bytes_per_bh: int) -> int:
    """(batch, head) pairs per grid section (``_tile``): as many as share L2 (at least 1, at most all)."""
    mb = _l2_budget_mb(kernel)
    if mb is None:
        if _interpreting():
            return min(n_bh, _INTERPRET_SECTION)
        mb = L2_SECTION_MB.get(kernel, 32.0)
    if mb <= 0:
        return max(1, n_bh)
    return max(1, min(n_bh, int(mb * 2**20) // max(1, bytes_per_bh)))


# --------------------------------------------------------------------------------------------------
# launchers
# --------------------------------------------------------------------------------------------------


def _unit_last(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


def _strides(t: torch.Tensor, varlen: bool) -> tuple[int, int, int]:
    """(batch, head, token) strides; packed tensors have no batch dimension (stride 0)."""
    if varlen:
        return 0, t.stride(1), t.stride(0)
    return t.stride(0), t.stride(1), t.stride(2)


def _shape(q: torch.Tensor, k: torch.Tensor, cu_seqlens: Optional[torch.Tensor], max_seqlen: int):
    """(batch, q heads, kv heads, Sq, Sk, grid extent along the sequence)."""
    if cu_seqlens is not None:
        return cu_seqlens.numel() - 1, q.shape[1], k.shape[1], 0, 0, max_seqlen
    return q.shape[0], q.shape[1], k.shape[1], q.shape[2], k.shape[2], max(q.shape[2], k.shape[2])


def _lse_layout(q: torch.Tensor, varlen: bool) -> tuple[tuple[int, ...], tuple[int, int]]:
    """LSE/delta: dense (B, Hq, Sq); packed (Hq, T). Returns shape and (batch, head) strides."""
    if varlen:
        t, h = q.shape[0], q.shape[1]
        return (h, t), (0, t)
    b, h, s = q.shape[0], q.shape[1], q.shape[2]
    return (b, h, s), (h * s, s)


def _forward(q, k, v, cu_seqlens, max_seqlen, causal, scale):
    varlen = cu_seqlens is not None
    q, k, v = _unit_last(q), _unit_last(k), _unit_last(v)
    batch, hq, hkv, sq, sk, seq_grid = _shape(q, k, cu_seqlens, max_seqlen)
    d = q.shape[-1]
    out = _empty(q.shape, q)
    lse_shape, (slb, slh) = _lse_layout(q, varlen)
    lse = _empty(lse_shape, q, torch.float32)
    tma = not varlen and _use_tma(q, k, v)
    bm, bn, warps, stages = _config("fwd_tma" if tma else "fwd", d, causal, seq_grid)
    even = not varlen and sq % bm == 0 and sk % bn == 0
    n_blocks = triton.cdiv(seq_grid, bm)
    # L2 per q head: its share of the K/V head it reads (GQA: Hq / Hkv q heads share one).
    kv_bytes = 2 * (seq_grid if varlen else sk) * d * k.element_size()
    section = _section("fwd", batch * hq, kv_bytes * hkv // hq)
    grid = (batch * hq * n_blocks,)
    if tma:
        from triton.tools.tensor_descriptor import TensorDescriptor

        def desc(t, rows, block):
            t3 = t.reshape(-1, rows, d)  # (B*H, S, D): a view for the contiguous tensors _use_tma allows
            return TensorDescriptor(t3, list(t3.shape), list(t3.stride()), [1, block, d])

        args = (desc(q, sq, bm), desc(k, sk, bn), desc(v, sk, bn), desc(out, sq, bm), lse, q,
                0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0)
    else:
        cu = cu_seqlens if varlen else q  # unused pointer when dense
        args = (q, k, v, out, lse, cu,
                *_strides(q, varlen), *_strides(k, varlen), *_strides(v, varlen), *_strides(out, varlen))
    _fwd_kernel[grid](
        *args, slb, slh, hq, hq // hkv, sq, sk, scale * LOG2E, batch * hq, n_blocks, section,
        HEAD_DIM=d, BLOCK_M=bm, BLOCK_N=bn, CAUSAL=causal, VARLEN=varlen, EVEN=even, TMA=tma, PIPE=_pipe_qk(d),
        num_warps=warps, num_stages=stages,
    )
    return out, lse


def _backward(do, q, k, v, out, lse, cu_seqlens, max_seqlen, causal, scale):
    varlen = cu_seqlens is not None
    do, q, k, v, out = (_unit_last(t) for t in (do, q, k, v, out))
    batch, hq, hkv, sq, sk, seq_grid = _shape(q, k, cu_seqlens, max_seqlen)
    d = q.shape[-1]
    cu = cu_seqlens if varlen else q
    _, (slb, slh) = _lse_layout(q, varlen)

    # delta = rowsum(dO * O): one program per (row block, head); rows = batch * tokens of that head.
    delta = _empty(lse.shape, lse)
    if varlen:
        rows, o_r, do_r, d_r = q.shape[0], out.stride(0), do.stride(0), 1
        o_h, do_h, d_h = out.stride(1), do.stride(1), slh
        heads = hq
        o_view, do_view, delta_view = out, do, delta
    else:
        # (B, H, S, D) viewed per (b, h) pair as a "head" of S rows.
        rows, heads = sq, batch * hq
        o_view, do_view, delta_view = out, do, delta
        o_r, do_r, d_r = out.stride(2), do.stride(2), 1
        o_h, do_h, d_h = out.stride(1), do.stride(1), slh
        if batch > 1 and (out.stride(0) != hq * out.stride(1) or do.stride(0) != hq * do.stride(1)):
            o_view, do_view = out.contiguous(), do.contiguous()
            o_r, do_r, o_h, do_h = o_view.stride(2), do_view.stride(2), o_view.stride(1), do_view.stride(1)
    block = 64 if d <= 128 else 32
    if _interpreting():
        block = 16
    _bwd_delta_kernel[(triton.cdiv(rows, block), heads)](
        o_view, do_view, delta_view, rows, heads, o_r, o_h, do_r, do_h, d_r, d_h,
        HEAD_DIM=d, BLOCK=block,
    )

    dk, dv = _empty(k.shape, k), _empty(v.shape, v)
    atomic_dq = _atomic_dq()
    # With atomic dQ the dK/dV kernel accumulates dQ in fp32 (zeroed); else the dQ kernel writes it.
    dq = torch.zeros(q.shape, device=q.device, dtype=torch.float32) if atomic_dq else _empty(q.shape, q)
    qk_scale = scale * LOG2E
    bm, bn, warps, stages = _config("dkdv_atomic" if atomic_dq else "dkdv", d, causal, seq_grid)
    sk_grid = seq_grid if varlen else sk
    sq_len = seq_grid if varlen else sq
    n_blocks = triton.cdiv(sk_grid, bn)
    # L2 per K/V head: Q and dO of its Hq / Hkv query heads (plus LSE and delta, 8 bytes a row).
    section = _section("dkdv", batch * hkv, (hq // hkv) * sq_len * (2 * d * q.element_size() + 8))
    _bwd_dkdv_kernel[(batch * hkv * n_blocks,)](
        q, k, v, do, dk, dv, dq, lse, delta, cu,
        *_strides(q, varlen), *_strides(k, varlen), *_strides(v, varlen), *_strides(do, varlen),
        *_strides(dk, varlen), *_strides(dv, varlen), *_strides(dq, varlen), slb, slh,
        hkv, hq // hkv, sq, sk, qk_scale, scale, batch * hkv, n_blocks, section,
        HEAD_DIM=d, BLOCK_M=bm, BLOCK_N=bn, CAUSAL=causal, VARLEN=varlen, ATOMIC_DQ=atomic_dq,
        num_warps=warps, num_stages=stages,
    )
    if atomic_dq:
        return dq.to(q.dtype), dk, dv
    bm, bn, warps, stages = _config("dq", d, causal, seq_grid)
    sq_grid = seq_grid if varlen else sq
    n_blocks = triton.cdiv(sq_grid, bm)
    kv_bytes = 2 * (seq_grid if varlen else sk) * d * k.element_size()
    section = _section("dq", batch * hq, kv_bytes * hkv // hq)
    _bwd_dq_kernel[(batch * hq * n_blocks,)](
        q, k, v, do, dq, lse, delta, cu,
        *_strides(q, varlen), *_strides(k, varlen), *_strides(v, varlen), *_strides(do, varlen),
        *_strides(dq, varlen), slb, slh,
        hq, hq // hkv, sq, sk, qk_scale, scale, batch * hq, n_blocks, section,
        HEAD_DIM=d, BLOCK_M=bm, BLOCK_N=bn, CAUSAL=causal, VARLEN=varlen,
        num_warps=warps, num_stages=stages,
    )
    return dq, dk, dv


# --------------------------------------------------------------------------------------------------
# custom ops (torch.library) + autograd
# --------------------------------------------------------------------------------------------------


@torch.library.custom_op("vbhal::flash_attn_fwd", mutates_args=())
def _flash_attn_fwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: Optional[torch.Tensor],
                    max_seqlen: int, causal: bool, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    return _forward(q, k, v, cu_seqlens, max_seqlen, causal, scale)


@_flash_attn_fwd.register_fake
def _(q, k, v, cu_seqlens, max_seqlen, causal, scale):
    lse_shape, _ = _lse_layout(q, cu_seqlens is not None)
    return (torch.empty_like(q, memory_format=torch.contiguous_format),
            q.new_empty(lse_shape, dtype=torch.float32))


@torch.library.custom_op("vbhal::flash_attn_bwd", mutates_args=())
def _flash_attn_bwd(do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
                    lse: torch.Tensor, cu_seqlens: Optional[torch.Tensor], max_seqlen: int, causal: bool,
                    scale: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return _backward(do, q, k, v, out, lse, cu_seqlens, max_seqlen, causal, scale)


@_flash_attn_bwd.register_fake
def _(do, q, k, v, out, lse, cu_seqlens, max_seqlen, causal, scale):
    return (torch.empty_like(q, memory_format=torch.contiguous_format),
            torch.empty_like(k, memory_format=torch.contiguous_format),
            torch.empty_like(v, memory_format=torch.contiguous_format))


def _setup_context(ctx, inputs, output):
    q, k, v, cu_seqlens, max_seqlen, causal, scale = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, cu_seqlens)
    ctx.max_seqlen, ctx.causal, ctx.scale = max_seqlen, causal, scale


def _backward_rule(ctx, grad_out, grad_lse):
    q, k, v, out, lse, cu_seqlens = ctx.saved_tensors
    dq, dk, dv = _flash_attn_bwd(grad_out, q, k, v, out, lse, cu_seqlens, ctx.max_seqlen, ctx.causal,
                                 ctx.scale)
    return dq, dk, dv, None, None, None, None


_flash_attn_fwd.register_autograd(_backward_rule, setup_context=_setup_context)


class _FlashFunction(torch.autograd.Function):
    """The same forward/backward as the custom op, for eager mode.

    A Python ``torch.library.custom_op`` costs tens of microseconds of host time per call (schema
    handling, dispatch through Python); an ``autograd.Function`` a fraction of that. Eager calls take
    this path, traced calls (``torch.compile``) the custom op, which compile needs.
    """

    @staticmethod
    def forward(ctx, q, k, v, cu_seqlens, max_seqlen, causal, scale):
        out, lse = _forward(q, k, v, cu_seqlens, max_seqlen, causal, scale)
        ctx.save_for_backward(q, k, v, out, lse, cu_seqlens)
        ctx.max_seqlen, ctx.causal, ctx.scale = max_seqlen, causal, scale
        return out

    @staticmethod
    def backward(ctx, grad_out):
        q, k, v, out, lse, cu_seqlens = ctx.saved_tensors
        dq, dk, dv = _backward(grad_out, q, k, v, out, lse, cu_seqlens, ctx.max_seqlen, ctx.causal, ctx.scale)
        return dq, dk, dv, None, None, None, None


def _flash(q, k, v, cu_seqlens, max_seqlen: int, causal: bool, scale: float) -> torch.Tensor:
    """Run the kernel on already-validated inputs (custom op when tracing, autograd.Function in eager)."""
    if torch.compiler.is_compiling():
        return _flash_attn_fwd(q, k, v, cu_seqlens, max_seqlen, causal, scale)[0]
    return _FlashFunction.apply(q, k, v, cu_seqlens, max_seqlen, causal, scale)


# --------------------------------------------------------------------------------------------------
# public entry point
# --------------------------------------------------------------------------------------------------


def supports(q: torch.Tensor, k: torch.Tensor, *, attn_mask: Optional[torch.Tensor] = None) -> Optional[str]:
    """Return None when this kernel can take the inputs, else the reason it cannot (for the dispatcher)."""
    if attn_mask is not None:
        return "an explicit attn_mask (the kernel handles causal and packed masks only)"
    if q.dtype not in _DTYPES:
        return f"dtype {q.dtype}"
    if q.shape[-1] not in SUPPORTED_HEAD_DIMS:
        return f"head dim {q.shape[-1]} (supported: {SUPPORTED_HEAD_DIMS})"
    if not (q.is_cuda or _interpreting()):
        return f"device {q.device} (the Triton kernel needs a CUDA device)"
    return None


def flash_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool = False,
                    scale: Optional[float] = None, attn_mask: Optional[torch.Tensor] = None,
                    cu_seqlens: Optional[torch.Tensor] = None, max_seqlen: Optional[int] = None) -> torch.Tensor:
    """Flash attention with the kernel contract's signature (see docs/CONTRACT.md).

    Example::

        o = flash_attention(q, k, v, causal=True)                          # (B, Hq, S, D)
        o = flash_attention(q, k, v, causal=True, cu_seqlens=cu, max_seqlen=m)  # packed (T, Hq, D)

    Raises ``AttentionInputError`` for inputs the contract rejects and ``KernelError`` for valid
    inputs this kernel cannot take (an explicit ``attn_mask``, an unsupported head dim): use the
    dispatcher (``attention_dispatch.attention``), which falls back to SDPA for those.
    """
    q, k, v, attn_mask = autocast_inputs(q, k, v, attn_mask)
    max_seqlen = validate_attention_inputs(q, k, v, attn_mask=attn_mask, cu_seqlens=cu_seqlens,
                                           max_seqlen=max_seqlen)
    reason = supports(q, k, attn_mask=attn_mask)
    if reason is not None:
        from vbhal.errors import KernelError

        raise KernelError(f"vbhal's Triton flash attention cannot take {reason}; call "
                          "vbhal.backends.cuda.attention_dispatch.attention, which falls back to SDPA.")
    if scale is None:
        scale = 1.0 / math.sqrt(q.shape[-1])
    if cu_seqlens is not None and cu_seqlens.dtype != torch.int32:
        cu_seqlens = cu_seqlens.to(torch.int32)
    return _flash(q, k, v, cu_seqlens, int(max_seqlen or 0), bool(causal), float(scale))


KERNELS = {"flash_attention": flash_attention}
