"""Triton kernels for FP4 (MXFP4 / NVFP4): quantize, dequantize, fused dequantize-matmul.

This module imports triton at the top: only the launchers in ``fp4_quantize.py`` / ``fp4_linear.py``
import it, lazily, the first time a kernel runs. Layout of the operands (docs/CONTRACT.md, "FP4 data
layout"): ``codes`` uint8 (N, Kp/2), element 2i in the LOW nibble of byte i; ``scales`` one byte per
block of BLOCK elements along K (E8M0 for mxfp4, block 32; E4M3 for nvfp4, block 16); nvfp4 adds a
float32 tensor scale. Every kernel reads a block's codes as a [rows, blocks, BLOCK/2] byte tile (or,
the ``*_w32``/``_pf``/``_t`` kernels, a [rows, blocks, BLOCK/8] tile of int32 words), so a block's
scale is loaded once per block, never gathered per element.

Kernels: ``fp4_quantize_kernel``, ``fp4_dequantize_kernel``; for the linear (see fp4_linear.py for
when each runs) the GEMVs ``fp4_gemv_kernel`` / ``fp4_gemv_w32_kernel`` / ``fp4_gemv_pf_kernel`` and
the tensor-core kernels ``fp4_mm_t_kernel`` (swap-AB, the one used) and ``fp4_mm_kernel`` /
``fp4_mm_w32_kernel`` (x @ W^T form; triton 3.6 cannot compile it with BLOCK_M >= 64).

Decoding E2M1 without a lookup table (``_e2m1_decode``): the three magnitude bits of a code
(exponent e1 e0, mantissa m) placed at bits 11..9 of a float16 and the sign at bit 15 make the
float16 number E2M1_value * 2^-14 exactly -- e = 0 lands in float16's subnormals (0.m * 2^-14),
e > 0 in its normals (2^(e-15) * 1.m), the same bias arithmetic as E2M1 (bias 1) shifted by 14.
So a code costs two masks, two shifts and an or, and the 2^14 is folded into the block scale.
"""

from __future__ import annotations

import triton
import triton.language as tl

#: The float16 decode yields E2M1_value * 2^-14 (see the module docstring); multiply by this to undo.
E2M1_F16_UNSCALE = tl.constexpr(16384.0)
#: OCP MX v1.0 section 6.3: emax of the E2M1 element type (2^2 = 4 is its largest power of two).
_E2M1_EMAX = tl.constexpr(2)
#: E2M1 largest magnitude (OCP MX v1.0 section 5.3.3).
_E2M1_MAX = tl.constexpr(6.0)
#: FP8 E4M3 largest finite value and smallest normal (NVFP4 block scale clamp, as vbhal.formats.nvfp4).
_E4M3_MAX = tl.constexpr(448.0)
_E4M3_MIN = tl.constexpr(0.015625)


# ---------------------------------------------------------------------------------------------------
# shared helpers
# ---------------------------------------------------------------------------------------------------
@triton.jit
def _e2m1_decode(b):
    """Packed uint8 codes -> (low nibble, high nibble) as float32 E2M1_value * 2^-14 (exact)."""
    w = b.to(tl.int32)
    lo = ((w & 0x7) << 9) | ((w & 0x8) << 12)
    hi = ((w & 0x70) << 5) | ((w & 0x80) << 8)
    lo = lo.to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32)
    hi = hi.to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32)
    return lo, hi


@triton.jit
def _e8m0_to_f32(s):
    """E8M0 scale bytes -> float32 2^(s - 127); 0 -> 2^-127 (subnormal), 0xFF -> NaN (OCP MX v1.0 5.2)."""
    c = s.to(tl.int32)
    bits = tl.where(c > 0, c << 23, 1 << 22)
    v = bits.to(tl.float32, bitcast=True)
    return tl.where(c == 255, float("nan"), v)


@triton.jit
def _e4m3_to_f32(s):
    """FP8 E4M3 (fn) bytes -> float32, exact; 0x7F/0xFF -> NaN."""
    c = s.to(tl.int32)
    mag = c & 0x7F
    # normal: exponent field e (bias 7) -> float32 field e + 120; mantissa 3 bits -> bits 22..20
    normal = ((mag << 20) + (120 << 23)).to(tl.float32, bitcast=True)
    sub = (mag & 0x7).to(tl.float32) * 0.001953125  # subnormal: m * 2^-9
    v = tl.where((mag >> 3) == 0, sub, normal)
    v = tl.where((c & 0x80) != 0, -v, v)
    return tl.where(mag == 0x7F, float("nan"), v)


@triton.jit
def _block_scale(s_ptrs, mask, ts, IS_NV: tl.constexpr):
    """Load a tile of scale bytes and return float32 block scales (times the nvfp4 tensor scale)."""
    s = tl.load(s_ptrs, mask=mask, other=0)
    if IS_NV:
        return _e4m3_to_f32(s) * ts
    else:
        return _e8m0_to_f32(s)


@triton.jit
def _e2m1_encode(v):
    """float32 (already divided by the block scale) -> E2M1 code (int32, 0..15).

    Round-to-nearest-even with saturation at 6, sign kept on zero (vbhal.formats.e2m1), on the bits:
    - |v| >= 1 (E2M1 normals): RNE of the float32 to one mantissa bit (add 0x1FFFFF plus the kept
      bit, carry into the exponent), then code = (biased exponent << 1 | mantissa bit) - 252;
    - |v| < 1 (E2M1 subnormals 0, 0.5 and the round-up to 1): adding 2^22 (whose ulp is 0.5) rounds
      |v| to a multiple of 0.5, ties to even, in one float add; the low bits are then 2|v| = the code.
    Clamping |v| to 6 first makes every larger value (and 5 < |v| < 6) round to 6 = code 7.
    """
    sign = (v.to(tl.int32, bitcast=True) >> 28) & 0x8
    a = tl.minimum(tl.abs(v), _E2M1_MAX)
    ab = a.to(tl.int32, bitcast=True)
    normal = ((ab + 0x1FFFFF + ((ab >> 22) & 1)) >> 22) - 252
    sub = (a + 4194304.0).to(tl.int32, bitcast=True) - 0x4A800000  # 0x4A800000 = bits of 2^22
    return tl.where(a < 1.0, sub, normal) | sign


# ---------------------------------------------------------------------------------------------------
# quantize
# ---------------------------------------------------------------------------------------------------
@triton.jit
def fp4_quantize_kernel(
    w_ptr, codes_ptr, scales_ptr, ts_ptr, bad_ptr,
    N, K, NUM_BLOCKS, stride_wn, stride_cn, stride_sn,
    IS_NV: tl.constexpr, RCEIL: tl.constexpr, BLOCK: tl.constexpr,
    ROWS: tl.constexpr, NBK: tl.constexpr,
):
    """Quantize a (N, K) float weight (K contiguous) to packed E2M1 codes + one scale byte per block.

    Program (r, c) does ROWS rows x NBK blocks. Elements beyond K are the zero padding of the format.
    Any NaN/Inf sets ``*bad_ptr`` (the launcher raises QuantizationError, as vbhal.formats does).
    """
    pid_r = tl.program_id(0)
    pid_c = tl.program_id(1)
    HB: tl.constexpr = BLOCK // 2
    rows = pid_r * ROWS + tl.arange(0, ROWS)
    blks = pid_c * NBK + tl.arange(0, NBK)
    r3 = rows[:, None, None]
    b3 = blks[None, :, None]
    k3 = b3 * BLOCK + tl.arange(0, BLOCK)[None, None, :]
    m3 = (r3 < N) & (k3 < K)
    x = tl.load(w_ptr + r3.to(tl.int64) * stride_wn + k3, mask=m3, other=0.0).to(tl.float32)
    # NaN * 0 and Inf * 0 are NaN: one flag per program, read once by the launcher.
    bad = tl.max(tl.max(tl.max(((x * 0.0) != 0.0).to(tl.int32), axis=2), axis=1), axis=0)
    if bad > 0:
        tl.atomic_max(bad_ptr, bad)
    amax = tl.max(tl.abs(x), axis=2)  # [ROWS, NBK]
    if IS_NV:
        ts = tl.load(ts_ptr)
        # s_b = e4m3(clamp((amax / 6) / ts, 2^-6, 448)), both divisions correctly rounded
        t = tl.math.div_rn(tl.math.div_rn(amax, _E2M1_MAX), ts)
        t = tl.minimum(tl.maximum(t, _E4M3_MIN), _E4M3_MAX)
        # round-to-nearest-even to 3 mantissa bits (t is a normal E4M3 after the clamp)
        tb = t.to(tl.int32, bitcast=True)
        tb = (tb + 0x7FFFF + ((tb >> 20) & 1)) & -1048576  # & ~0xFFFFF
        s_f32 = tb.to(tl.float32, bitcast=True)
        s_byte = ((((tb >> 23) & 0xFF) - 120) << 3) | ((tb >> 20) & 0x7)
        recip = tl.math.div_rn(tl.math.div_rn(1.0, ts), s_f32)
    else:
        if RCEIL:
            # 2^ceil(log2(amax / 6)) read off the bits of d = amax / 6 (cuBLAS / Blackwell rule)
            d = tl.math.div_rn(amax, _E2M1_MAX)
            db = d.to(tl.int32, bitcast=True)
            e = (db >> 23) & 0xFF
            up = e + ((db & 0x7FFFFF) != 0).to(tl.int32)
            s_code = tl.where(e > 0, up, (d > 5.877471754111438e-39).to(tl.int32))  # d > 2^-127
        else:
            # FLOOR (OCP MX v1.0 section 6.3): floor(log2(amax)) - emax_elem, clamped at 2^-127
            e = (amax.to(tl.int32, bitcast=True) >> 23) & 0xFF
            s_code = tl.maximum(e - _E2M1_EMAX, 0)
        # 1 / 2^(code - 127) = 2^(127 - code): a normal float32 for codes 0..253, so x * recip is the
        # correctly rounded x / scale.
        recip = ((254 - s_code) << 23).to(tl.float32, bitcast=True)
        s_byte = s_code
    v = x * recip[:, :, None]
    q = _e2m1_encode(v)  # [ROWS, NBK, BLOCK] int32
    q_even, q_odd = tl.split(tl.reshape(q, (ROWS, NBK, HB, 2)))
    packed = (q_even | (q_odd << 4)).to(tl.uint8)
    j3 = b3 * HB + tl.arange(0, HB)[None, None, :]
    rmask = r3 < N
    bmask = b3 < NUM_BLOCKS
    tl.store(codes_ptr + r3.to(tl.int64) * stride_cn + j3, packed, mask=rmask & bmask)
    r2 = rows[:, None]
    b2 = blks[None, :]
    tl.store(scales_ptr + r2.to(tl.int64) * stride_sn + b2, s_byte.to(tl.uint8), mask=(r2 < N) & (b2 < NUM_BLOCKS))


# ---------------------------------------------------------------------------------------------------
# dequantize
# ---------------------------------------------------------------------------------------------------
@triton.jit
def fp4_dequantize_kernel(
    codes_ptr, scales_ptr, ts_ptr, out_ptr,
    N, K, NUM_BLOCKS, stride_cn, stride_sn, stride_on,
    IS_NV: tl.constexpr, BLOCK: tl.constexpr, ROWS: tl.constexpr, NBK: tl.constexpr,
):
    """codes + scales -> (N, K) in out's dtype: value = code * block_scale (* tensor scale for nvfp4),
    formed in float32 exactly as vbhal.formats does, then cast."""
    pid_r = tl.program_id(0)
    pid_c = tl.program_id(1)
    HB: tl.constexpr = BLOCK // 2
    rows = pid_r * ROWS + tl.arange(0, ROWS)
    blks = pid_c * NBK + tl.arange(0, NBK)
    r3 = rows[:, None, None]
    b3 = blks[None, :, None]
    j3 = b3 * HB + tl.arange(0, HB)[None, None, :]
    cmask = (r3 < N) & (b3 < NUM_BLOCKS)
    b = tl.load(codes_ptr + r3.to(tl.int64) * stride_cn + j3, mask=cmask, other=0)
    r2 = rows[:, None]
    b2 = blks[None, :]
    if IS_NV:
        ts = tl.load(ts_ptr)
    else:
        ts = 1.0
    sc = _block_scale(scales_ptr + r2.to(tl.int64) * stride_sn + b2, (r2 < N) & (b2 < NUM_BLOCKS), ts, IS_NV)
    lo, hi = _e2m1_decode(b)
    lo = (lo * E2M1_F16_UNSCALE) * sc[:, :, None]
    hi = (hi * E2M1_F16_UNSCALE) * sc[:, :, None]
    vals = tl.reshape(tl.join(lo, hi), (ROWS, NBK, BLOCK))
    k3 = b3 * BLOCK + tl.arange(0, BLOCK)[None, None, :]
    tl.store(out_ptr + r3.to(tl.int64) * stride_on + k3, vals.to(out_ptr.dtype.element_ty),
             mask=(r3 < N) & (k3 < K))


# ---------------------------------------------------------------------------------------------------
# fused linear, small M: GEMV style (weights streamed once, FMA in float32)
# ---------------------------------------------------------------------------------------------------
@triton.jit
def fp4_gemv_kernel(
    x_ptr, codes_ptr, scales_ptr, ts_ptr, bias_ptr, y_ptr,
    M, N, K, NUM_BLOCKS, stride_xm, stride_cn, stride_sn, stride_ym,
    IS_NV: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK: tl.constexpr,
    BLOCK_N: tl.constexpr, NBK: tl.constexpr, SPLIT_K: tl.constexpr,
):
    """y[m, n] = sum_k x[m, k] * W[n, k] (+ bias[n]) for one row m per program column.

    Program (pid_n, m, pid_k) streams BLOCK_N weight rows over its share of K, NBK blocks at a time:
    per block, the code-times-x products are summed in float32 and the block scale is applied once.
    With SPLIT_K > 1 the partial sums are atomically added into a float32 y (zeroed by the launcher).
    """
    pid_n = tl.program_id(0)
    m = tl.program_id(1)
    pid_k = tl.program_id(2)
    HB: tl.constexpr = BLOCK // 2
    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rmask = rows < N
    r3 = rows[:, None, None]
    r2 = rows[:, None]
    bb = tl.arange(0, NBK)
    jj = tl.arange(0, HB)
    kk = tl.arange(0, BLOCK)
    if IS_NV:
        ts = tl.load(ts_ptr)
    else:
        ts = 1.0
    acc = tl.zeros((BLOCK_N, NBK), dtype=tl.float32)
    blocks_per_split = tl.cdiv(NUM_BLOCKS, SPLIT_K)
    blk_lo = pid_k * blocks_per_split
    blk_hi = tl.minimum(blk_lo + blocks_per_split, NUM_BLOCKS)
    x_row = x_ptr + m.to(tl.int64) * stride_xm
    for blk0 in range(blk_lo, blk_hi, NBK):
        blks = blk0 + bb
        bmask = blks < blk_hi
        b = tl.load(codes_ptr + r3.to(tl.int64) * stride_cn + (blks[None, :, None] * HB + jj[None, None, :]),
                    mask=rmask[:, None, None] & bmask[None, :, None], other=0)
        sc = _block_scale(scales_ptr + r2.to(tl.int64) * stride_sn + blks[None, :],
                          rmask[:, None] & bmask[None, :], 1.0, IS_NV)
        k2 = blks[:, None] * BLOCK + kk[None, :]
        xv = tl.load(x_row + k2, mask=bmask[:, None] & (k2 < K), other=0.0).to(tl.float32)
        xe, xo = tl.split(tl.reshape(xv, (NBK, HB, 2)))
        lo, hi = _e2m1_decode(b)
        part = tl.sum(lo * xe[None, :, :] + hi * xo[None, :, :], axis=2)
        acc += part * sc
    out = tl.sum(acc, axis=1) * (E2M1_F16_UNSCALE * ts)
    if HAS_BIAS:
        if pid_k == 0:
            out += tl.load(bias_ptr + rows, mask=rmask, other=0.0).to(tl.float32)
    y_ptrs = y_ptr + m.to(tl.int64) * stride_ym + rows
    if SPLIT_K > 1:
        tl.atomic_add(y_ptrs, out, mask=rmask)
    else:
        tl.store(y_ptrs, out.to(y_ptr.dtype.element_ty), mask=rmask)


# ---------------------------------------------------------------------------------------------------
# fused linear, tiled: tensor-core GEMM dequantizing the weight tile in the K loop
# ---------------------------------------------------------------------------------------------------
@triton.jit
def fp4_mm_kernel(
    x_ptr, codes_ptr, scales_ptr, ts_ptr, bias_ptr, y_ptr,
    M, N, K, NUM_BLOCKS, stride_xm, stride_cn, stride_sn, stride_ym, M_BUCKET,
    IS_NV: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, NBK: tl.constexpr, GROUP_M: tl.constexpr,
    SPLIT_K: tl.constexpr,
):
    """y = x @ dequant(W)^T (+ bias): (BLOCK_M x BLOCK_N) tiles, K stepped NBK blocks at a time.

    The weight tile is decoded (code * block scale, in float32, then cast to x's dtype) and fed to
    tl.dot with the activation tile; accumulation is float32. Grouped tile order for L2 reuse of x.
    With SPLIT_K > 1 the K range is split over grid axis 1 and partial tiles are atomically added into
    a float32 y (zeroed by the launcher). M_BUCKET (M rounded up to a power of two) is only an
    autotuning key.
    """
    pid = tl.program_id(0)
    pid_k = tl.program_id(1)
    HB: tl.constexpr = BLOCK // 2
    BK: tl.constexpr = NBK * BLOCK
    num_m = tl.cdiv(M, BLOCK_M)
    num_n = tl.cdiv(N, BLOCK_N)
    group = GROUP_M * num_n
    gid = pid // group
    first_m = gid * GROUP_M
    gsize = tl.minimum(num_m - first_m, GROUP_M)
    pid_m = first_m + ((pid % group) % gsize)
    pid_n = (pid % group) // gsize

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mmask = offs_m < M
    rmask = rows < N
    r3 = rows[:, None, None]
    r2 = rows[:, None]
    bb = tl.arange(0, NBK)
    jj = tl.arange(0, HB)
    kk = tl.arange(0, BK)
    if IS_NV:
        ts = tl.load(ts_ptr)
    else:
        ts = 1.0
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    blocks_per_split = tl.cdiv(tl.cdiv(NUM_BLOCKS, SPLIT_K), NBK) * NBK
    blk_lo = pid_k * blocks_per_split
    blk_hi = tl.minimum(blk_lo + blocks_per_split, NUM_BLOCKS)
    x_rows = x_ptr + offs_m[:, None].to(tl.int64) * stride_xm
    for blk0 in range(blk_lo, blk_hi, NBK):
        blks = blk0 + bb
        bmask = blks < blk_hi
        b = tl.load(codes_ptr + r3.to(tl.int64) * stride_cn + (blks[None, :, None] * HB + jj[None, None, :]),
                    mask=rmask[:, None, None] & bmask[None, :, None], other=0)
        sc = _block_scale(scales_ptr + r2.to(tl.int64) * stride_sn + blks[None, :],
                          rmask[:, None] & bmask[None, :], 1.0, IS_NV) * E2M1_F16_UNSCALE
        lo, hi = _e2m1_decode(b)
        lo = (lo * sc[:, :, None]).to(x_ptr.dtype.element_ty)
        hi = (hi * sc[:, :, None]).to(x_ptr.dtype.element_ty)
        w = tl.reshape(tl.join(lo, hi), (BLOCK_N, BK))
        k1 = blk0 * BLOCK + kk
        xv = tl.load(x_rows + k1[None, :], mask=mmask[:, None] & (k1[None, :] < blk_hi * BLOCK) & (k1[None, :] < K),
                     other=0.0)
        acc = tl.dot(xv, tl.trans(w), acc)
    acc = acc * ts
    if HAS_BIAS:
        if pid_k == 0:
            acc += tl.load(bias_ptr + rows, mask=rmask, other=0.0).to(tl.float32)[None, :]
    y_ptrs = y_ptr + offs_m[:, None].to(tl.int64) * stride_ym + rows[None, :]
    omask = mmask[:, None] & rmask[None, :]
    if SPLIT_K > 1:
        tl.atomic_add(y_ptrs, acc, mask=omask)
    else:
        tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=omask)


# ---------------------------------------------------------------------------------------------------
# fused linear, small M, int32-word decode: two codes per bit-op (see _e2m1_pair_word)
# ---------------------------------------------------------------------------------------------------
@triton.jit
def _e2m1_pair_word(w, P: tl.constexpr):
    """From int32 words of 8 packed codes (code j in bits 4j..4j+3, j = element index), build for
    nibble P (0..3) the two float32 values of elements P and P + 4, each E2M1_value * 2^-14.

    One shift-and-mask per word yields BOTH float16 bit patterns at once (element P in the low half,
    P + 4 in the high half, as the codes sit 16 bits apart); the halves are then widened to float32.
    """
    if P < 3:
        mag = (w << (9 - 4 * P)) & 0x0E000E00
    else:
        mag = (w >> 3) & 0x0E000E00
    sgn = (w << (12 - 4 * P)) & -2147450880  # 0x80008000 as int32
    h = mag | sgn
    lo = (h & 0xFFFF).to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32)
    hi = (h >> 16).to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32)
    return lo, hi


@triton.jit
def fp4_gemv_w32_kernel(
    x_ptr, codes_ptr, scales_ptr, ts_ptr, bias_ptr, y_ptr,
    M, N, K, NUM_BLOCKS, stride_xm, stride_cn, stride_sn, stride_ym,
    IS_NV: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK: tl.constexpr,
    BLOCK_N: tl.constexpr, NBK: tl.constexpr, SPLIT_K: tl.constexpr,
):
    """fp4_gemv_kernel with the codes read as int32 words (codes_ptr: int32 view, stride in words).

    A block of BLOCK codes is WPB = BLOCK / 8 words; the tile is [BLOCK_N, NBK, WPB] words, decoded
    two codes per bit operation (_e2m1_pair_word). x is read contiguously, 8 elements per word, and
    split in registers into the 8 element streams.
    """
    pid_n = tl.program_id(0)
    m = tl.program_id(1)
    pid_k = tl.program_id(2)
    WPB: tl.constexpr = BLOCK // 8
    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rmask = rows < N
    r3 = rows[:, None, None]
    r2 = rows[:, None]
    bb = tl.arange(0, NBK)
    ww = tl.arange(0, WPB)
    if IS_NV:
        ts = tl.load(ts_ptr)
    else:
        ts = 1.0
    acc = tl.zeros((BLOCK_N, NBK), dtype=tl.float32)
    blocks_per_split = tl.cdiv(NUM_BLOCKS, SPLIT_K)
    blk_lo = pid_k * blocks_per_split
    blk_hi = tl.minimum(blk_lo + blocks_per_split, NUM_BLOCKS)
    x_row = x_ptr + m.to(tl.int64) * stride_xm
    for blk0 in range(blk_lo, blk_hi, NBK):
        blks = blk0 + bb
        bmask = blks < blk_hi
        word = blks[:, None] * WPB + ww[None, :]  # [NBK, WPB] word index along the row
        w = tl.load(codes_ptr + r3.to(tl.int64) * stride_cn + word[None, :, :],
                    mask=rmask[:, None, None] & bmask[None, :, None], other=0)
        sc = _block_scale(scales_ptr + r2.to(tl.int64) * stride_sn + blks[None, :],
                          rmask[:, None] & bmask[None, :], 1.0, IS_NV)
        # x for these words, read contiguously (8 elements per word) and split in registers into the
        # 8 element streams: x8[..., e] -> xs[e], e = 4 * b2 + 2 * b1 + b0 (three binary splits)
        kx = word[:, :, None] * 8 + tl.arange(0, 8)[None, None, :]
        x8 = tl.load(x_row + kx, mask=bmask[:, None, None] & (kx < K), other=0.0).to(tl.float32)
        e_even, e_odd = tl.split(tl.reshape(x8, (NBK, WPB, 4, 2)))  # b0
        e00, e10 = tl.split(tl.reshape(e_even, (NBK, WPB, 2, 2)))  # b1 of even: elements 0,4 | 2,6
        x0, x4 = tl.split(e00)
        x2, x6 = tl.split(e10)
        e01, e11 = tl.split(tl.reshape(e_odd, (NBK, WPB, 2, 2)))
        x1, x5 = tl.split(e01)
        x3, x7 = tl.split(e11)
        l0, h0 = _e2m1_pair_word(w, 0)
        l1, h1 = _e2m1_pair_word(w, 1)
        l2, h2 = _e2m1_pair_word(w, 2)
        l3, h3 = _e2m1_pair_word(w, 3)
        part = (l0 * x0[None] + h0 * x4[None] + l1 * x1[None] + h1 * x5[None]
                + l2 * x2[None] + h2 * x6[None] + l3 * x3[None] + h3 * x7[None])
        acc += tl.sum(part, axis=2) * sc
    out = tl.sum(acc, axis=1) * (E2M1_F16_UNSCALE * ts)
    if HAS_BIAS:
        if pid_k == 0:
            out += tl.load(bias_ptr + rows, mask=rmask, other=0.0).to(tl.float32)
    y_ptrs = y_ptr + m.to(tl.int64) * stride_ym + rows
    if SPLIT_K > 1:
        tl.atomic_add(y_ptrs, out, mask=rmask)
    else:
        tl.store(y_ptrs, out.to(y_ptr.dtype.element_ty), mask=rmask)


@triton.jit
def _gemv_w32_tile(codes_ptr, scales_ptr, x_row, r3, r2, rmask, blk0, blk_hi, K, stride_cn, stride_sn,
                   NBK: tl.constexpr, WPB: tl.constexpr):
    """Load one GEMV step: code words [BN, NBK, WPB], scale bytes [BN, NBK], x [NBK, WPB, 8]."""
    blks = blk0 + tl.arange(0, NBK)
    bmask = blks < blk_hi
    word = blks[:, None] * WPB + tl.arange(0, WPB)[None, :]  # [NBK, WPB] word index along the row
    w = tl.load(codes_ptr + r3.to(tl.int64) * stride_cn + word[None, :, :],
                mask=rmask[:, None, None] & bmask[None, :, None], other=0)
    sb = tl.load(scales_ptr + r2.to(tl.int64) * stride_sn + blks[None, :], mask=rmask[:, None] & bmask[None, :],
                 other=0)
    kx = word[:, :, None] * 8 + tl.arange(0, 8)[None, None, :]
    x8 = tl.load(x_row + kx, mask=bmask[:, None, None] & (kx < K), other=0.0)
    return w, sb, x8


@triton.jit
def fp4_gemv_pf_kernel(
    x_ptr, codes_ptr, scales_ptr, ts_ptr, bias_ptr, y_ptr,
    M, N, K, NUM_BLOCKS, stride_xm, stride_cn, stride_sn, stride_ym,
    IS_NV: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK: tl.constexpr,
    BLOCK_N: tl.constexpr, NBK: tl.constexpr, SPLIT_K: tl.constexpr,
):
    """fp4_gemv_w32_kernel with the next step's loads issued before this step's arithmetic (register
    double buffering), so each warp keeps two steps of HBM reads in flight."""
    pid_n = tl.program_id(0)
    m = tl.program_id(1)
    pid_k = tl.program_id(2)
    WPB: tl.constexpr = BLOCK // 8
    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rmask = rows < N
    r3 = rows[:, None, None]
    r2 = rows[:, None]
    if IS_NV:
        ts = tl.load(ts_ptr)
    else:
        ts = 1.0
    acc = tl.zeros((BLOCK_N, NBK), dtype=tl.float32)
    blocks_per_split = tl.cdiv(NUM_BLOCKS, SPLIT_K)
    blk_lo = pid_k * blocks_per_split
    blk_hi = tl.minimum(blk_lo + blocks_per_split, NUM_BLOCKS)
    x_row = x_ptr + m.to(tl.int64) * stride_xm
    w, sb, x8 = _gemv_w32_tile(codes_ptr, scales_ptr, x_row, r3, r2, rmask, blk_lo, blk_hi, K, stride_cn, stride_sn,
                               NBK, WPB)
    for blk0 in range(blk_lo, blk_hi, NBK):
        w_n, sb_n, x8_n = _gemv_w32_tile(codes_ptr, scales_ptr, x_row, r3, r2, rmask, blk0 + NBK, blk_hi, K,
                                         stride_cn, stride_sn, NBK, WPB)
        if IS_NV:
            sc = _e4m3_to_f32(sb)
        else:
            sc = _e8m0_to_f32(sb)
        # x8[..., e] -> the 8 element streams, e = 4 * b2 + 2 * b1 + b0 (three binary splits)
        xf = x8.to(tl.float32)
        e_even, e_odd = tl.split(tl.reshape(xf, (NBK, WPB, 4, 2)))  # b0
        e00, e10 = tl.split(tl.reshape(e_even, (NBK, WPB, 2, 2)))  # b1 of even: elements 0,4 | 2,6
        x0, x4 = tl.split(e00)
        x2, x6 = tl.split(e10)
        e01, e11 = tl.split(tl.reshape(e_odd, (NBK, WPB, 2, 2)))
        x1, x5 = tl.split(e01)
        x3, x7 = tl.split(e11)
        l0, h0 = _e2m1_pair_word(w, 0)
        l1, h1 = _e2m1_pair_word(w, 1)
        l2, h2 = _e2m1_pair_word(w, 2)
        l3, h3 = _e2m1_pair_word(w, 3)
        part = (l0 * x0[None] + h0 * x4[None] + l1 * x1[None] + h1 * x5[None]
                + l2 * x2[None] + h2 * x6[None] + l3 * x3[None] + h3 * x7[None])
        acc += tl.sum(part, axis=2) * sc
        w, sb, x8 = w_n, sb_n, x8_n
    out = tl.sum(acc, axis=1) * (E2M1_F16_UNSCALE * ts)
    if HAS_BIAS:
        if pid_k == 0:
            out += tl.load(bias_ptr + rows, mask=rmask, other=0.0).to(tl.float32)
    y_ptrs = y_ptr + m.to(tl.int64) * stride_ym + rows
    if SPLIT_K > 1:
        tl.atomic_add(y_ptrs, out, mask=rmask)
    else:
        tl.store(y_ptrs, out.to(y_ptr.dtype.element_ty), mask=rmask)


@triton.jit
def _scale_f32_x2p14(s, IS_NV: tl.constexpr):
    """Scale bytes -> float32 block scale * 2^14 (the decode's 2^-14 undone), one integer op for MX:
    the float32 with biased exponent (s + 14) is 2^(s - 127 + 14); exact for E8M0 codes 0..240
    (scales up to 2^113 -- weights with blocks beyond 1e34 would need more: they take the slow path)."""
    if IS_NV:
        return _e4m3_to_f32(s) * E2M1_F16_UNSCALE
    else:
        c = s.to(tl.int32)
        fast = ((c + 14) << 23).to(tl.float32, bitcast=True)
        return tl.where(c <= 240, fast, _e8m0_to_f32(s) * E2M1_F16_UNSCALE)


@triton.jit
def _e2m1_word_tile(w, sc, DT: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
    """Decode a [BN, NBK, WPB] tile of int32 code words into a [BN, BK] tile of ``code * scale`` in DT,
    columns in natural K order. sc: [BN, NBK] float32 block scales (times 2^14, see _e2m1_decode).

    _e2m1_pair_word gives elements (P, P + 4) of each word; joining (0, 2) with (1, 3) and then the
    two results puts element 4q + 2a + c at position 4q + 2a + c of the word (q: low/high half,
    a, c: the two join levels), i.e. K order, so the activation tile is read contiguously.
    """
    s3 = sc[:, :, None]
    l0, h0 = _e2m1_pair_word(w, 0)
    l1, h1 = _e2m1_pair_word(w, 1)
    l2, h2 = _e2m1_pair_word(w, 2)
    l3, h3 = _e2m1_pair_word(w, 3)
    j0 = tl.join((l0 * s3).to(DT), (h0 * s3).to(DT))  # [.., q]: elements 0, 4
    j1 = tl.join((l1 * s3).to(DT), (h1 * s3).to(DT))  # 1, 5
    j2 = tl.join((l2 * s3).to(DT), (h2 * s3).to(DT))  # 2, 6
    j3 = tl.join((l3 * s3).to(DT), (h3 * s3).to(DT))  # 3, 7
    a0 = tl.join(j0, j2)  # [.., q, a]: p = 2a
    a1 = tl.join(j1, j3)  # p = 2a + 1
    t = tl.join(a0, a1)  # [.., q, a, c]: p = 2a + c, element 4q + 2a + c
    return tl.reshape(t, (BN, BK))


@triton.jit
def fp4_mm_w32_kernel(
    x_ptr, codes_ptr, scales_ptr, ts_ptr, bias_ptr, y_ptr,
    M, N, K, NUM_BLOCKS, stride_xm, stride_cn, stride_sn, stride_ym, M_BUCKET,
    IS_NV: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, NBK: tl.constexpr, GROUP_M: tl.constexpr,
    SPLIT_K: tl.constexpr,
):
    """fp4_mm_kernel reading the codes as int32 words (codes_ptr: int32 view, stride in words) and
    decoding two codes per bit operation (_e2m1_word_tile)."""
    pid = tl.program_id(0)
    pid_k = tl.program_id(1)
    WPB: tl.constexpr = BLOCK // 8
    BK: tl.constexpr = NBK * BLOCK
    num_m = tl.cdiv(M, BLOCK_M)
    num_n = tl.cdiv(N, BLOCK_N)
    group = GROUP_M * num_n
    gid = pid // group
    first_m = gid * GROUP_M
    gsize = tl.minimum(num_m - first_m, GROUP_M)
    pid_m = first_m + ((pid % group) % gsize)
    pid_n = (pid % group) // gsize

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mmask = offs_m < M
    rmask = rows < N
    r3 = rows[:, None, None]
    r2 = rows[:, None]
    bb = tl.arange(0, NBK)
    ww = tl.arange(0, WPB)
    kk = tl.arange(0, BK)
    if IS_NV:
        ts = tl.load(ts_ptr)
    else:
        ts = 1.0
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    blocks_per_split = tl.cdiv(tl.cdiv(NUM_BLOCKS, SPLIT_K), NBK) * NBK
    blk_lo = pid_k * blocks_per_split
    blk_hi = tl.minimum(blk_lo + blocks_per_split, NUM_BLOCKS)
    x_rows = x_ptr + offs_m[:, None].to(tl.int64) * stride_xm
    for blk0 in range(blk_lo, blk_hi, NBK):
        blks = blk0 + bb
        bmask = blks < blk_hi
        word = blks[:, None] * WPB + ww[None, :]
        w = tl.load(codes_ptr + r3.to(tl.int64) * stride_cn + word[None, :, :],
                    mask=rmask[:, None, None] & bmask[None, :, None], other=0)
        sb = tl.load(scales_ptr + r2.to(tl.int64) * stride_sn + blks[None, :], mask=rmask[:, None] & bmask[None, :],
                     other=0)
        wt = _e2m1_word_tile(w, _scale_f32_x2p14(sb, IS_NV), x_ptr.dtype.element_ty, BLOCK_N, BK)
        k1 = blk0 * BLOCK + kk
        xv = tl.load(x_rows + k1[None, :], mask=mmask[:, None] & (k1[None, :] < blk_hi * BLOCK) & (k1[None, :] < K),
                     other=0.0)
        acc = tl.dot(xv, tl.trans(wt), acc)
    acc = acc * ts
    if HAS_BIAS:
        if pid_k == 0:
            acc += tl.load(bias_ptr + rows, mask=rmask, other=0.0).to(tl.float32)[None, :]
    y_ptrs = y_ptr + offs_m[:, None].to(tl.int64) * stride_ym + rows[None, :]
    omask = mmask[:, None] & rmask[None, :]
    if SPLIT_K > 1:
        tl.atomic_add(y_ptrs, acc, mask=omask)
    else:
        tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=omask)


@triton.jit
def fp4_mm_t_kernel(
    x_ptr, codes_ptr, scales_ptr, ts_ptr, bias_ptr, y_ptr,
    M, N, K, NUM_BLOCKS, stride_xm, stride_cn, stride_sn, stride_ym, M_BUCKET,
    IS_NV: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, NBK: tl.constexpr, GROUP_M: tl.constexpr,
    SPLIT_K: tl.constexpr,
):
    """"Swap-AB" tensor-core kernel: y^T tile (BLOCK_N x BLOCK_M) = W tile @ x^T tile.

    The decoded weight tile is the dot's FIRST operand (it may stay in registers: Hopper's wgmma
    reads A from registers, B from shared memory), the activations the second; so the weight rows
    fill the 64/128-row MMA dimension and a small M (the batch) only has to fill the 8..256-column
    one. Each weight element is decoded once per BLOCK_M activation rows. codes_ptr: int32 view.
    With SPLIT_K > 1, y is a float32 workspace (zeroed) and partial tiles are atomically added.
    """
    pid = tl.program_id(0)
    pid_k = tl.program_id(1)
    WPB: tl.constexpr = BLOCK // 8
    BK: tl.constexpr = NBK * BLOCK
    num_m = tl.cdiv(M, BLOCK_M)
    num_n = tl.cdiv(N, BLOCK_N)
    group = GROUP_M * num_m
    gid = pid // group
    first_n = gid * GROUP_M
    gsize = tl.minimum(num_n - first_n, GROUP_M)
    pid_n = first_n + ((pid % group) % gsize)
    pid_m = (pid % group) // gsize

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mmask = offs_m < M
    rmask = rows < N
    r3 = rows[:, None, None]
    r2 = rows[:, None]
    bb = tl.arange(0, NBK)
    ww = tl.arange(0, WPB)
    kk = tl.arange(0, BK)
    if IS_NV:
        ts = tl.load(ts_ptr)
    else:
        ts = 1.0
    acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    blocks_per_split = tl.cdiv(tl.cdiv(NUM_BLOCKS, SPLIT_K), NBK) * NBK
    blk_lo = pid_k * blocks_per_split
    blk_hi = tl.minimum(blk_lo + blocks_per_split, NUM_BLOCKS)
    x_cols = x_ptr + offs_m[None, :].to(tl.int64) * stride_xm
    for blk0 in range(blk_lo, blk_hi, NBK):
        blks = blk0 + bb
        bmask = blks < blk_hi
        word = blks[:, None] * WPB + ww[None, :]
        w = tl.load(codes_ptr + r3.to(tl.int64) * stride_cn + word[None, :, :],
                    mask=rmask[:, None, None] & bmask[None, :, None], other=0)
        sb = tl.load(scales_ptr + r2.to(tl.int64) * stride_sn + blks[None, :], mask=rmask[:, None] & bmask[None, :],
                     other=0)
        wt = _e2m1_word_tile(w, _scale_f32_x2p14(sb, IS_NV), x_ptr.dtype.element_ty, BLOCK_N, BK)
        k1 = blk0 * BLOCK + kk
        xt = tl.load(x_cols + k1[:, None], mask=mmask[None, :] & (k1[:, None] < blk_hi * BLOCK) & (k1[:, None] < K),
                     other=0.0)
        acc = tl.dot(wt, xt, acc)
    acc = acc * ts
    if HAS_BIAS:
        if pid_k == 0:
            acc += tl.load(bias_ptr + rows, mask=rmask, other=0.0).to(tl.float32)[:, None]
    y_ptrs = y_ptr + offs_m[None, :].to(tl.int64) * stride_ym + rows[:, None]
    omask = mmask[None, :] & rmask[:, None]
    if SPLIT_K > 1:
        tl.atomic_add(y_ptrs, acc, mask=omask)
    else:
        tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=omask)
