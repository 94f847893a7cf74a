"""Session 5 experiment: GEMV variants without masks (N % BLOCK_N == 0, blocks % NBK == 0) and with pointers
advanced in the loop; gemv_even_nopf leaves the loads to Triton's pipeliner (num_stages), gemv_even double-buffers in
registers like fp4_gemv_pf_kernel. Offline SASS (sm_90, triton 3.9): 6.69 instructions per weight element for the
current gemv_pf (16, 32, 4 warps) against 6.0 (nopf, same tile) and 5.0-5.4 (nopf, 32-64 rows per program)."""
import triton
import triton.language as tl
from vbhal.backends.cuda.fp4_kernels import (_e2m1_pair_word, _x_streams, _block_factors, _tensor_scale, _bias,
                                             _write_out, _k_range, _word_dot)

@triton.jit
def gemv_even(
    x_ptr, codes_ptr, scales_ptr, ts_ptr, bias_ptr, y_ptr, ws_ptr,
    M, N, K, NUM_BLOCKS, stride_xm, stride_cn, stride_sn, stride_ym,
    IS_NV: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK: tl.constexpr,
    BLOCK_N: tl.constexpr, NBK: tl.constexpr, SPLIT_K: tl.constexpr,
):
    """no masks, pointers advanced, register double buffer"""
    pid_n = tl.program_id(0)
    m = tl.program_id(1)
    pid_k = tl.program_id(2)
    WPB: tl.constexpr = BLOCK // 8
    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    acc = tl.zeros((BLOCK_N, NBK), dtype=tl.float32)
    blk_lo, blk_hi = _k_range(pid_k, NUM_BLOCKS, SPLIT_K, NBK)
    word = tl.arange(0, NBK)[:, None] * WPB + tl.arange(0, WPB)[None, :]
    w_ptrs = codes_ptr + rows[:, None, None].to(tl.int64) * stride_cn + (blk_lo * WPB + word)[None, :, :]
    s_ptrs = scales_ptr + rows[:, None].to(tl.int64) * stride_sn + (blk_lo + tl.arange(0, NBK))[None, :]
    x_ptrs = x_ptr + m.to(tl.int64) * stride_xm + blk_lo * BLOCK + word[:, :, None] * 8 + tl.arange(0, 8)[None, None, :]
    w = tl.load(w_ptrs)
    sb = tl.load(s_ptrs)
    x8 = tl.load(x_ptrs)
    for blk0 in range(blk_lo, blk_hi, NBK):
        inc = (blk0 + NBK < blk_hi).to(tl.int32)  # the last step re-reads its own blocks: no mask, no branch
        w_ptrs += inc * (NBK * WPB)
        s_ptrs += inc * NBK
        x_ptrs += inc * (NBK * BLOCK)
        w_n = tl.load(w_ptrs)
        sb_n = tl.load(s_ptrs)
        x8_n = tl.load(x_ptrs)
        f, g = _block_factors(sb, IS_NV)
        acc += (_word_dot(w, x8.to(tl.float32), NBK, WPB) * f) * g
        w, sb, x8 = w_n, sb_n, x8_n
    out = tl.sum(acc, axis=1) * _tensor_scale(ts_ptr, IS_NV)
    rmask = rows < N
    _write_out(out, _bias(bias_ptr, rows, rmask, HAS_BIAS), y_ptr + m.to(tl.int64) * stride_ym + rows,
               ws_ptr + m.to(tl.int64) * N + rows, rmask, SPLIT_K)


@triton.jit
def gemv_even_nopf(
    x_ptr, codes_ptr, scales_ptr, ts_ptr, bias_ptr, y_ptr, ws_ptr,
    M, N, K, NUM_BLOCKS, stride_xm, stride_cn, stride_sn, stride_ym,
    IS_NV: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK: tl.constexpr,
    BLOCK_N: tl.constexpr, NBK: tl.constexpr, SPLIT_K: tl.constexpr,
):
    pid_n = tl.program_id(0)
    m = tl.program_id(1)
    pid_k = tl.program_id(2)
    WPB: tl.constexpr = BLOCK // 8
    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    acc = tl.zeros((BLOCK_N, NBK), dtype=tl.float32)
    blk_lo, blk_hi = _k_range(pid_k, NUM_BLOCKS, SPLIT_K, NBK)
    word = tl.arange(0, NBK)[:, None] * WPB + tl.arange(0, WPB)[None, :]
    w_ptrs = codes_ptr + rows[:, None, None].to(tl.int64) * stride_cn + (blk_lo * WPB + word)[None, :, :]
    s_ptrs = scales_ptr + rows[:, None].to(tl.int64) * stride_sn + (blk_lo + tl.arange(0, NBK))[None, :]
    x_ptrs = x_ptr + m.to(tl.int64) * stride_xm + blk_lo * BLOCK + word[:, :, None] * 8 + tl.arange(0, 8)[None, None, :]
    for blk0 in range(blk_lo, blk_hi, NBK):
        w = tl.load(w_ptrs)
        sb = tl.load(s_ptrs)
        x8 = tl.load(x_ptrs)
        f, g = _block_factors(sb, IS_NV)
        acc += (_word_dot(w, x8.to(tl.float32), NBK, WPB) * f) * g
        w_ptrs += NBK * WPB
        s_ptrs += NBK
        x_ptrs += NBK * BLOCK
    out = tl.sum(acc, axis=1) * _tensor_scale(ts_ptr, IS_NV)
    rmask = rows < N
    _write_out(out, _bias(bias_ptr, rows, rmask, HAS_BIAS), y_ptr + m.to(tl.int64) * stride_ym + rows,
               ws_ptr + m.to(tl.int64) * N + rows, rmask, SPLIT_K)
