import triton
import triton.language as tl
from vbhal.backends.cuda.fp4_kernels import _grouped_tile, _k_range, _bias, _write_out, _tensor_scale, _load_words, _scale_f32_x2p14, _e2m1_word_tile


@triton.jit
def _pair_raw(w, P: tl.constexpr):
    """int32 code words -> int32 whose halves are the bfloat16 bits of E2M1 * 2^-126 of elements P (low)
    and P + 4 (high)."""
    if P == 0:
        mag = w << 6
    elif P == 1:
        mag = w << 2
    elif P == 2:
        mag = w >> 2
    else:
        mag = w >> 6
    if P < 3:
        sgn = w << (12 - 4 * P)
    else:
        sgn = w
    return (mag & 0x01C001C0) | (sgn & -2147450880)


@triton.jit
def _halves(h):
    lo = h.to(tl.int16).to(tl.bfloat16, bitcast=True)
    hi = (h >> 16).to(tl.int16).to(tl.bfloat16, bitcast=True)
    return lo, hi


@triton.jit
def _tile_bf16(w, sb, BN: tl.constexpr, BK: tl.constexpr):
    """[BN, NBK, WPB] code words + [BN, NBK] E8M0 bytes (all <= 128) -> [BN, BK] bf16 code * scale."""
    s = ((sb.to(tl.int32) + 126) << 7).to(tl.int16).to(tl.bfloat16, bitcast=True)[:, :, None]
    l0, h0 = _halves(_pair_raw(w, 0))
    l1, h1 = _halves(_pair_raw(w, 1))
    l2, h2 = _halves(_pair_raw(w, 2))
    l3, h3 = _halves(_pair_raw(w, 3))
    j0 = tl.join(l0 * s, h0 * s)
    j1 = tl.join(l1 * s, h1 * s)
    j2 = tl.join(l2 * s, h2 * s)
    j3 = tl.join(l3 * s, h3 * s)
    a0 = tl.join(j0, j2)
    a1 = tl.join(j1, j3)
    t = tl.join(a0, a1)
    return tl.reshape(t, (BN, BK))


@triton.jit
def _tile_bf16b(w, sb, BN: tl.constexpr, NBK: tl.constexpr, BLOCK: tl.constexpr):
    """variant: assemble the raw tile first, then one multiply by the block scale (packed pairs)."""
    s = ((sb.to(tl.int32) + 126) << 7).to(tl.int16).to(tl.bfloat16, bitcast=True)[:, :, None]
    l0, h0 = _halves(_pair_raw(w, 0))
    l1, h1 = _halves(_pair_raw(w, 1))
    l2, h2 = _halves(_pair_raw(w, 2))
    l3, h3 = _halves(_pair_raw(w, 3))
    t = tl.join(tl.join(tl.join(l0, h0), tl.join(l2, h2)), tl.join(tl.join(l1, h1), tl.join(l3, h3)))
    t = tl.reshape(t, (BN, NBK, BLOCK)) * s
    return tl.reshape(t, (BN, NBK * BLOCK))


@triton.jit
def fp4_mm_p_kernel(
    x_ptr, codes_ptr, scales_ptr, ts_ptr, bias_ptr, y_ptr, ws_ptr,
    M, N, K, NUM_BLOCKS, stride_xm, stride_cn, stride_sn, stride_ym, M_BUCKET,
    IS_NV: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, NBK: tl.constexpr, GROUP_M: tl.constexpr,
    SPLIT_K: tl.constexpr, SWAP: tl.constexpr = False, VAR: tl.constexpr = 0,
):
    pid = tl.program_id(0)
    pid_k = tl.program_id(1)
    WPB: tl.constexpr = BLOCK // 8
    BK: tl.constexpr = NBK * BLOCK
    NW: tl.constexpr = NBK * WPB
    if SWAP:
        pid_n, pid_m = _grouped_tile(pid, tl.cdiv(N, BLOCK_N), tl.cdiv(M, BLOCK_M), GROUP_M)
    else:
        pid_m, pid_n = _grouped_tile(pid, tl.cdiv(M, BLOCK_M), tl.cdiv(N, BLOCK_N), GROUP_M)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_ld = tl.minimum(offs_m, M - 1)
    r_ld = tl.minimum(rows, N - 1)
    blk_lo, blk_hi = _k_range(pid_k, NUM_BLOCKS, SPLIT_K, NBK)
    w_ptrs = (codes_ptr + r_ld[:, None, None].to(tl.int64) * stride_cn
              + (blk_lo * WPB + tl.arange(0, NBK)[None, :, None] * WPB + tl.arange(0, WPB)[None, None, :]))
    s_ptrs = scales_ptr + r_ld[:, None].to(tl.int64) * stride_sn + (blk_lo + tl.arange(0, NBK)[None, :])
    if SWAP:
        acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
        x_ptrs = x_ptr + m_ld[None, :].to(tl.int64) * stride_xm + (blk_lo * BLOCK + tl.arange(0, BK)[:, None])
    else:
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        x_ptrs = x_ptr + m_ld[:, None].to(tl.int64) * stride_xm + (blk_lo * BLOCK + tl.arange(0, BK)[None, :])
    for _ in range(blk_lo, blk_hi, NBK):
        w = tl.load(w_ptrs)
        sb = tl.load(s_ptrs)
        xv = tl.load(x_ptrs)
        if VAR == 1:
            wt = _tile_bf16b(w, sb, BLOCK_N, NBK, BLOCK)
        else:
            wt = _tile_bf16(w, sb, BLOCK_N, BK)
        if SWAP:
            acc = tl.dot(wt, xv, acc)
        else:
            acc = tl.dot(xv, tl.trans(wt), acc)
        w_ptrs += NW
        s_ptrs += NBK
        x_ptrs += BK
    acc = acc * _tensor_scale(ts_ptr, IS_NV)
    mmask = offs_m < M
    rmask = rows < N
    if SWAP:
        _write_out(acc, _bias(bias_ptr, rows, rmask, HAS_BIAS)[:, None],
                   y_ptr + offs_m[None, :].to(tl.int64) * stride_ym + rows[:, None],
                   ws_ptr + offs_m[None, :].to(tl.int64) * N + rows[:, None], mmask[None, :] & rmask[:, None], SPLIT_K)
    else:
        _write_out(acc, _bias(bias_ptr, rows, rmask, HAS_BIAS)[None, :],
                   y_ptr + offs_m[:, None].to(tl.int64) * stride_ym + rows[None, :],
                   ws_ptr + offs_m[:, None].to(tl.int64) * N + rows[None, :], mmask[:, None] & rmask[None, :], SPLIT_K)
