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
the tensor-core kernels ``fp4_mm_t_kernel`` (swap-AB) and ``fp4_mm_w32_kernel`` (x @ W^T form; triton
3.6 cannot compile it with BLOCK_M >= 64), one body (``_fp4_mm``), and their packed-decode versions
``fp4_mm_pt_kernel`` / ``fp4_mm_p_kernel`` (``_fp4_mm_p``: bfloat16 pairs by shifts and masks, the
ones bfloat16 activations use); with SPLIT_K > 1
each adds its float32 part into a workspace, and the launcher's ``_finalize`` (torch ops, next on the
same stream) writes y (see ``_write_out``).

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
    """FP8 E4M3 (fn) bytes -> float32, exact; 0x7F/0xFF -> NaN. Integer ops on purpose: session 7 measured the
    GPU's own conversion (``.to(tl.float8e4nv, bitcast=True)``, one cvt.rn.f16x2.e4m3x2 per two bytes) 0.4-1.9 us
    faster for NVFP4 at M = 1..64 on the H100, but Triton refuses fp8e4nv below sm_89 (A100, A10, RTX 30xx), so
    it would need a capability-gated constexpr in every kernel (benchmarks/results/fp4_e4m3_ab-*.json)."""
    c = s.to(tl.int32)
    mag = c & 0x7F
    # normal: exponent field e (bias 7) -> float32 field e + 120; mantissa 3 bits -> bits 22..20
    normal = ((mag << 20) + (120 << 23)).to(tl.float32, bitcast=True)
    sub = (mag & 0x7).to(tl.float32) * 0.001953125  # subnormal: m * 2^-9
    v = tl.where((mag >> 3) == 0, sub, normal)
    # the sign as a bit (not -v: the GPU's negation of +0.0 gave +0.0, so byte 0x80 = -0.0 came out +0.0)
    v = (v.to(tl.int32, bitcast=True) | ((c & 0x80) << 24)).to(tl.float32, bitcast=True)
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


@triton.jit
def fp4_amax_kernel(w_ptr, out_ptr, numel, BLOCK: tl.constexpr):
    """max |w| of a contiguous float tensor into ``*out_ptr`` (int32, zeroed by the caller): the bits of a
    non-negative float32, which order as integers, so one atomic max per program combines them. The NVFP4
    tensor scale's pass over the weight (session 7 on the H100: 54 us for an 8192 x 8192 bf16 weight,
    against 70 us for torch's inf-norm). NaN may be dropped here; the quantize kernel flags it either way."""
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    v = tl.load(w_ptr + offs, mask=offs < numel, other=0.0).to(tl.float32)
    tl.atomic_max(out_ptr, tl.max(tl.abs(v), axis=0).to(tl.int32, bitcast=True))


# ---------------------------------------------------------------------------------------------------
# pieces shared by the linear kernels
# ---------------------------------------------------------------------------------------------------
@triton.jit
def _tensor_scale(ts_ptr, IS_NV: tl.constexpr):
    """The nvfp4 float32 tensor scale; 1 for mxfp4 (whose ts_ptr is never read)."""
    if IS_NV:
        return tl.load(ts_ptr)
    else:
        return 1.0


@triton.jit
def _k_range(pid_k, NUM_BLOCKS, SPLIT_K: tl.constexpr, NBK: tl.constexpr):
    """[lo, hi) scale blocks of split ``pid_k``: the blocks cut in SPLIT_K parts of whole NBK steps."""
    per = tl.cdiv(tl.cdiv(NUM_BLOCKS, SPLIT_K), NBK) * NBK
    lo = pid_k * per
    return lo, tl.minimum(lo + per, NUM_BLOCKS)


@triton.jit
def _bias(bias_ptr, rows, rmask, HAS_BIAS: tl.constexpr):
    """float32 bias of ``rows`` (zeros without a bias)."""
    if HAS_BIAS:
        return tl.load(bias_ptr + rows, mask=rmask, other=0.0).to(tl.float32)
    else:
        return tl.zeros_like(rows).to(tl.float32)


@triton.jit
def _write_out(acc, bias, y_ptrs, ws_ptrs, mask, SPLIT_K: tl.constexpr):
    """Store ``acc + bias`` (float32) into y, or with SPLIT_K > 1 add this split's part into the
    float32 workspace ``ws`` (zero at rest) with relaxed atomics; the launcher then runs
    ``fp4_linear._finalize`` (stream-ordered after this kernel, so every split's atomics are
    complete and visible), which adds the bias, writes y and zeroes ws again.

    R5: the one-launch "last split finalizes the tile" scheme (arrival counter, then plain/volatile
    loads of the sum) raced on the H100 -- nothing orders the other CTAs' atomic adds before the
    counter increment that the last CTA observes -- and gave relative errors of 4e-2..3e-1. Session 3:
    a Triton finalize kernel (load ws, store y, store zeros to ws) then gave wrong rows from M ~ 512 on
    the H100 (rel. error 1-6e-2, run to run different) although the workspace was verified right just
    before it ran; torch's copy and zero_ in its place were right in every run, so they do it now.
    Session 7 tried the one-launch form again, ordered as CUTLASS's serial split-K semaphore (every split
    stores its part in its own slice, CTA barrier, one thread's acq_rel arrival, the last split sums the
    slices with L1-bypassing loads; commit 792eb84; the stress script gpu/s7_stress.py is in ddeed66;
    results in benchmarks/results/fp4_splitk_fixup_exp-*.json): 3,000-6,000 repeated calls were
    bit-identical and at rest for six configs, but mm_pt (64, 128, NBK 2, SPLIT_K 4, 4 stages) at M = 64
    gave a different result in 1,854 of 6,000 calls (8 with NaN), and a release fence in every thread
    made it worse, which points away from cross-CTA ordering; the suspect (unproven) is the shared-memory slot
    of the scalar atomic's broadcast meeting the software pipeline's buffers. It was 4-5 us faster at
    M = 16 and 64 (35.8 / 50.6 against 40.4 / 55.5 us, one H100 run) and is not used.
    """
    if SPLIT_K == 1:
        tl.store(y_ptrs, (acc + bias).to(y_ptrs.dtype.element_ty), mask=mask)
    else:
        tl.atomic_add(ws_ptrs, acc, mask=mask, sem="relaxed")


@triton.jit
def _grouped_tile(pid, num_a, num_b, GROUP: tl.constexpr):
    """Grouped ("super-tile") order: tile index ``pid`` -> (pid_a, pid_b), GROUP tiles of axis a at a
    time, so the axis-b operand tiles they share stay in L2."""
    group = GROUP * num_b
    first = (pid // group) * GROUP
    gsize = tl.minimum(num_a - first, GROUP)
    return first + ((pid % group) % gsize), (pid % group) // gsize


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
def _x_streams(x8, A: tl.constexpr, B: tl.constexpr):
    """x read 8 elements per code word, [A, B, 8] float32 -> the 8 element streams [A, B] (element
    e = 4 * b2 + 2 * b1 + b0 of each word; three binary splits in registers)."""
    e_even, e_odd = tl.split(tl.reshape(x8, (A, B, 4, 2)))  # b0
    e00, e10 = tl.split(tl.reshape(e_even, (A, B, 2, 2)))  # b1 of even: elements 0,4 | 2,6
    x0, x4 = tl.split(e00)
    x2, x6 = tl.split(e10)
    e01, e11 = tl.split(tl.reshape(e_odd, (A, B, 2, 2)))
    x1, x5 = tl.split(e01)
    x3, x7 = tl.split(e11)
    return x0, x1, x2, x3, x4, x5, x6, x7


@triton.jit
def _word_dot(w, x8, NBK: tl.constexpr, WPB: tl.constexpr):
    """sum over each block's words of code * x: w [BN, NBK, WPB] int32 code words, x8 [NBK, WPB, 8]
    float32 activations of those words -> [BN, NBK] float32 (times 2^-14, see _e2m1_decode)."""
    x0, x1, x2, x3, x4, x5, x6, x7 = _x_streams(x8, NBK, WPB)
    l0, h0 = _e2m1_pair_word(w, 0)
    l1, h1 = _e2m1_pair_word(w, 1)
    l2, h2 = _e2m1_pair_word(w, 2)
    l3, h3 = _e2m1_pair_word(w, 3)
    part = (l0 * x0[None] + h0 * x4[None] + l1 * x1[None] + h1 * x5[None]
            + l2 * x2[None] + h2 * x6[None] + l3 * x3[None] + h3 * x7[None])
    return tl.sum(part, axis=2)


@triton.jit
def _load_words(codes_ptr, scales_ptr, r3, r2, rmask, blk0, blk_hi, stride_cn, stride_sn,
                NBK: tl.constexpr, WPB: tl.constexpr):
    """One K step of the weight: code words [BN, NBK, WPB] (int32), scale bytes [BN, NBK], and the
    [NBK, WPB] word indices along the row and the [NBK] block mask."""
    blks = blk0 + tl.arange(0, NBK)
    bmask = blks < blk_hi
    word = blks[:, None] * WPB + tl.arange(0, WPB)[None, :]
    w = tl.load(codes_ptr + r3.to(tl.int64) * stride_cn + word[None, :, :],
                mask=rmask[:, None, None] & bmask[None, :, None], other=0)
    sb = tl.load(scales_ptr + r2.to(tl.int64) * stride_sn + blks[None, :], mask=rmask[:, None] & bmask[None, :],
                 other=0)
    return w, sb, word, bmask


@triton.jit
def _load_x8(x_row, word, bmask, K):
    """The activations of code words ``word`` [NBK, WPB]: [NBK, WPB, 8], read contiguously."""
    kx = word[:, :, None] * 8 + tl.arange(0, 8)[None, None, :]
    return tl.load(x_row + kx, mask=bmask[:, None, None] & (kx < K), other=0.0)


@triton.jit
def _block_factors(s, IS_NV: tl.constexpr):
    """Scale bytes -> (f, g), float32, with f * g = block scale * 2^14 (the decode's 2^-14 undone) and
    neither overflowing: for E8M0 bytes up to 240 g = 1 and f = 2^(s - 113) (one integer op); above,
    f = 2^127 and g = 2^(s - 240); 0xFF -> NaN; E4M3: f = scale * 2^14, g = 1. A decoded value (or a
    block's sum of decoded products) times f, then times g, is the exact float32 product for every byte
    (session 6: the single factor overflowed to inf for bytes 241..254, so zero codes became NaN)."""
    if IS_NV:
        f = _e4m3_to_f32(s) * E2M1_F16_UNSCALE
        return f, tl.full(f.shape, 1.0, tl.float32)
    else:
        c = s.to(tl.int32)
        f = ((tl.minimum(c, 240) + 14) << 23).to(tl.float32, bitcast=True)
        g = ((tl.maximum(c - 240, 0) + 127) << 23).to(tl.float32, bitcast=True)
        return f, tl.where(c == 255, float("nan"), g)


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
    sc = _block_scale(scales_ptr + r2.to(tl.int64) * stride_sn + b2, (r2 < N) & (b2 < NUM_BLOCKS),
                      _tensor_scale(ts_ptr, IS_NV), IS_NV)
    lo, hi = _e2m1_decode(b)
    lo = (lo * E2M1_F16_UNSCALE) * sc[:, :, None]
    hi = (hi * E2M1_F16_UNSCALE) * sc[:, :, None]
    vals = tl.reshape(tl.join(lo, hi), (ROWS, NBK, BLOCK))
    k3 = b3 * BLOCK + tl.arange(0, BLOCK)[None, None, :]
    tl.store(out_ptr + r3.to(tl.int64) * stride_on + k3, vals.to(out_ptr.dtype.element_ty),
             mask=(r3 < N) & (k3 < K))


# ---------------------------------------------------------------------------------------------------
# fused linear, small M: GEMV style (weights streamed once, FMA in float32)
#
# Common arguments: x (M, K) with row stride stride_xm; codes (N, Kp/2) bytes (the _w32/_pf/_mr
# kernels: the int32 view, stride in words); scale bytes (N, NUM_BLOCKS); y (M, N) in x's dtype;
# ws float32 (M, N) contiguous, zero at rest (_write_out, fp4_linear._finalize).
# ---------------------------------------------------------------------------------------------------
@triton.jit
def fp4_gemv_kernel(
    x_ptr, codes_ptr, scales_ptr, ts_ptr, bias_ptr, y_ptr, ws_ptr,
    M, N, K, NUM_BLOCKS, stride_xm, stride_cn, stride_sn, stride_ym,
    IS_NV: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK: tl.constexpr,
    BLOCK_N: tl.constexpr, NBK: tl.constexpr, SPLIT_K: tl.constexpr,
):
    """y[m, n] = sum_k x[m, k] * W[n, k] (+ bias[n]), one activation row per program column, codes
    read as bytes. Program (pid_n, m, pid_k) streams BLOCK_N weight rows over its share of K, NBK
    blocks at a time: per block the code-times-x products are summed in float32 and the block scale
    is applied once."""
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
    acc = tl.zeros((BLOCK_N, NBK), dtype=tl.float32)
    blk_lo, blk_hi = _k_range(pid_k, NUM_BLOCKS, SPLIT_K, NBK)
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
        acc += tl.sum(lo * xe[None, :, :] + hi * xo[None, :, :], axis=2) * sc
    out = tl.sum(acc, axis=1) * (E2M1_F16_UNSCALE * _tensor_scale(ts_ptr, IS_NV))
    _write_out(out, _bias(bias_ptr, rows, rmask, HAS_BIAS), y_ptr + m.to(tl.int64) * stride_ym + rows,
               ws_ptr + m.to(tl.int64) * N + rows, rmask, SPLIT_K)


@triton.jit
def fp4_gemv_w32_kernel(
    x_ptr, codes_ptr, scales_ptr, ts_ptr, bias_ptr, y_ptr, ws_ptr,
    M, N, K, NUM_BLOCKS, stride_xm, stride_cn, stride_sn, stride_ym,
    IS_NV: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK: tl.constexpr,
    BLOCK_N: tl.constexpr, NBK: tl.constexpr, SPLIT_K: tl.constexpr,
):
    """fp4_gemv_kernel with the codes read as int32 words: a block is WPB = BLOCK / 8 words, the tile
    [BLOCK_N, NBK, WPB] words, decoded two codes per bit operation (_e2m1_pair_word); x is read
    contiguously, 8 elements per word, and split in registers into the 8 element streams."""
    pid_n = tl.program_id(0)
    m = tl.program_id(1)
    pid_k = tl.program_id(2)
    WPB: tl.constexpr = BLOCK // 8
    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rmask = rows < N
    acc = tl.zeros((BLOCK_N, NBK), dtype=tl.float32)
    blk_lo, blk_hi = _k_range(pid_k, NUM_BLOCKS, SPLIT_K, NBK)
    x_row = x_ptr + m.to(tl.int64) * stride_xm
    for blk0 in range(blk_lo, blk_hi, NBK):
        w, sb, word, bmask = _load_words(codes_ptr, scales_ptr, rows[:, None, None], rows[:, None], rmask, blk0,
                                         blk_hi, stride_cn, stride_sn, NBK, WPB)
        x8 = _load_x8(x_row, word, bmask, K).to(tl.float32)
        f, g = _block_factors(sb, IS_NV)
        acc += (_word_dot(w, x8, NBK, WPB) * f) * g
    out = tl.sum(acc, axis=1) * _tensor_scale(ts_ptr, IS_NV)
    _write_out(out, _bias(bias_ptr, rows, rmask, HAS_BIAS), y_ptr + m.to(tl.int64) * stride_ym + rows,
               ws_ptr + m.to(tl.int64) * N + rows, rmask, SPLIT_K)


@triton.jit
def fp4_gemv_pf_kernel(
    x_ptr, codes_ptr, scales_ptr, ts_ptr, bias_ptr, y_ptr, ws_ptr,
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
    acc = tl.zeros((BLOCK_N, NBK), dtype=tl.float32)
    blk_lo, blk_hi = _k_range(pid_k, NUM_BLOCKS, SPLIT_K, NBK)
    x_row = x_ptr + m.to(tl.int64) * stride_xm
    w, sb, word, bmask = _load_words(codes_ptr, scales_ptr, r3, r2, rmask, blk_lo, blk_hi, stride_cn, stride_sn,
                                     NBK, WPB)
    x8 = _load_x8(x_row, word, bmask, K)
    for blk0 in range(blk_lo, blk_hi, NBK):
        w_n, sb_n, word_n, bmask_n = _load_words(codes_ptr, scales_ptr, r3, r2, rmask, blk0 + NBK, blk_hi,
                                                 stride_cn, stride_sn, NBK, WPB)
        x8_n = _load_x8(x_row, word_n, bmask_n, K)
        f, g = _block_factors(sb, IS_NV)
        acc += (_word_dot(w, x8.to(tl.float32), NBK, WPB) * f) * g
        w, sb, x8 = w_n, sb_n, x8_n
    out = tl.sum(acc, axis=1) * _tensor_scale(ts_ptr, IS_NV)
    _write_out(out, _bias(bias_ptr, rows, rmask, HAS_BIAS), y_ptr + m.to(tl.int64) * stride_ym + rows,
               ws_ptr + m.to(tl.int64) * N + rows, rmask, SPLIT_K)


@triton.jit
def fp4_gemv_mr_kernel(
    x_ptr, codes_ptr, scales_ptr, ts_ptr, bias_ptr, y_ptr, ws_ptr,
    M, N, K, NUM_BLOCKS, stride_xm, stride_cn, stride_sn, stride_ym,
    IS_NV: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK: tl.constexpr,
    BLOCK_N: tl.constexpr, NBK: tl.constexpr, BLOCK_M: tl.constexpr, SPLIT_K: tl.constexpr,
):
    """Multi-row split-K GEMV: BLOCK_M activation rows per program, so each weight word is read from
    HBM and decoded once for all of them (the GEMV kernels above re-read it per row).

    Program (pid_n, pid_m, pid_k): BLOCK_N weight rows x its 1/SPLIT_K of K, NBK blocks per step, the
    codes as int32 words ([BLOCK_N, NBK, WPB]: one block's WPB words contiguous, 16-byte loads for
    mxfp4); the products of the 8 decoded element streams with the [BLOCK_M, NBK, WPB] activation
    streams are summed per block in float32, then scaled by the block scale once. Meant for many
    programs in flight (SPLIT_K in the tens, a few steps each): the split parts meet in _write_out.
    """
    pid_n = tl.program_id(0)
    pid_m = tl.program_id(1)
    pid_k = tl.program_id(2)
    WPB: tl.constexpr = BLOCK // 8
    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rmask = rows < N
    r3 = rows[:, None, None]
    r2 = rows[:, None]
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    mmask = offs_m < M
    x_rows = x_ptr + offs_m[:, None, None, None].to(tl.int64) * stride_xm
    acc = tl.zeros((BLOCK_M, BLOCK_N, NBK), dtype=tl.float32)
    blk_lo, blk_hi = _k_range(pid_k, NUM_BLOCKS, SPLIT_K, NBK)
    for blk0 in range(blk_lo, blk_hi, NBK):
        w, sb, word, bmask = _load_words(codes_ptr, scales_ptr, r3, r2, rmask, blk0, blk_hi, stride_cn, stride_sn,
                                         NBK, WPB)
        kx = word[None, :, :, None] * 8 + tl.arange(0, 8)[None, None, None, :]
        x8 = tl.load(x_rows + kx, mask=mmask[:, None, None, None] & bmask[None, :, None, None] & (kx < K),
                     other=0.0).to(tl.float32)  # [BLOCK_M, NBK, WPB, 8]
        x0, x1, x2, x3, x4, x5, x6, x7 = _x_streams(tl.reshape(x8, (BLOCK_M * NBK, WPB, 8)), BLOCK_M * NBK, WPB)
        l0, h0 = _e2m1_pair_word(w, 0)
        l1, h1 = _e2m1_pair_word(w, 1)
        l2, h2 = _e2m1_pair_word(w, 2)
        l3, h3 = _e2m1_pair_word(w, 3)
        part = (l0[None] * tl.reshape(x0, (BLOCK_M, 1, NBK, WPB)) + h0[None] * tl.reshape(x4, (BLOCK_M, 1, NBK, WPB))
                + l1[None] * tl.reshape(x1, (BLOCK_M, 1, NBK, WPB)) + h1[None] * tl.reshape(x5, (BLOCK_M, 1, NBK, WPB))
                + l2[None] * tl.reshape(x2, (BLOCK_M, 1, NBK, WPB)) + h2[None] * tl.reshape(x6, (BLOCK_M, 1, NBK, WPB))
                + l3[None] * tl.reshape(x3, (BLOCK_M, 1, NBK, WPB)) + h3[None] * tl.reshape(x7, (BLOCK_M, 1, NBK, WPB)))
        f, g = _block_factors(sb, IS_NV)
        acc += (tl.sum(part, axis=3) * f) * g
    out = tl.sum(acc, axis=2) * _tensor_scale(ts_ptr, IS_NV)  # [BLOCK_M, BLOCK_N]
    omask = mmask[:, None] & rmask[None, :]
    _write_out(out, _bias(bias_ptr, rows, rmask, HAS_BIAS)[None, :],
               y_ptr + offs_m[:, None].to(tl.int64) * stride_ym + rows[None, :],
               ws_ptr + offs_m[:, None].to(tl.int64) * N + rows[None, :], omask, SPLIT_K)


# ---------------------------------------------------------------------------------------------------
# fused linear, tensor cores: the weight tile decoded in registers in the K loop, fed to tl.dot
# ---------------------------------------------------------------------------------------------------
@triton.jit
def _e2m1_word_tile(w, sb, IS_NV: tl.constexpr, DT: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
    """Decode a [BN, NBK, WPB] tile of int32 code words into a [BN, BK] tile of ``code * scale`` in DT,
    columns in natural K order. sb: [BN, NBK] scale bytes, applied as _block_factors' two float32
    factors (exact for every E8M0 byte; one factor overflowed for bytes 241..254).

    _e2m1_pair_word gives elements (P, P + 4) of each word; joining (0, 2) with (1, 3) and then the
    two results puts element 4q + 2a + c at position 4q + 2a + c of the word (q: low/high half,
    a, c: the two join levels), i.e. K order, so the activation tile is read contiguously.
    """
    f, g = _block_factors(sb, IS_NV)
    s3 = f[:, :, None]
    g3 = g[:, :, None]
    l0, h0 = _e2m1_pair_word(w, 0)
    l1, h1 = _e2m1_pair_word(w, 1)
    l2, h2 = _e2m1_pair_word(w, 2)
    l3, h3 = _e2m1_pair_word(w, 3)
    j0 = tl.join((l0 * s3 * g3).to(DT), (h0 * s3 * g3).to(DT))  # [.., q]: elements 0, 4
    j1 = tl.join((l1 * s3 * g3).to(DT), (h1 * s3 * g3).to(DT))  # 1, 5
    j2 = tl.join((l2 * s3 * g3).to(DT), (h2 * s3 * g3).to(DT))  # 2, 6
    j3 = tl.join((l3 * s3 * g3).to(DT), (h3 * s3 * g3).to(DT))  # 3, 7
    a0 = tl.join(j0, j2)  # [.., q, a]: p = 2a
    a1 = tl.join(j1, j3)  # p = 2a + 1
    t = tl.join(a0, a1)  # [.., q, a, c]: p = 2a + c, element 4q + 2a + c
    return tl.reshape(t, (BN, BK))


@triton.jit
def _weight_tile(codes_ptr, scales_ptr, r3, r2, rmask, blk0, blk_hi, stride_cn, stride_sn, DT: tl.constexpr,
                 IS_NV: tl.constexpr, BLOCK_N: tl.constexpr, NBK: tl.constexpr, WPB: tl.constexpr):
    """One K step of the weight decoded for tl.dot: [BLOCK_N, NBK * BLOCK] of code * block scale in DT."""
    w, sb, _word, _bmask = _load_words(codes_ptr, scales_ptr, r3, r2, rmask, blk0, blk_hi, stride_cn, stride_sn,
                                     NBK, WPB)
    return _e2m1_word_tile(w, sb, IS_NV, DT, BLOCK_N, NBK * WPB * 8)


@triton.jit
def _store_mm(acc, bias_ptr, y_ptr, ws_ptr, offs_m, rows, M, N, stride_ym, HAS_BIAS: tl.constexpr,
              SPLIT_K: tl.constexpr, SWAP: tl.constexpr):
    """A tensor-core tile's epilogue: acc is the (BLOCK_M, BLOCK_N) y tile, or with SWAP its transpose;
    rows past N and activation rows past M are not written (_write_out: bias, y or the split workspace)."""
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


@triton.jit
def _fp4_mm(x_ptr, codes_ptr, scales_ptr, ts_ptr, bias_ptr, y_ptr, ws_ptr,
            M, N, K, NUM_BLOCKS, stride_xm, stride_cn, stride_sn, stride_ym,
            IS_NV: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK: tl.constexpr,
            BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, NBK: tl.constexpr, GROUP_M: tl.constexpr,
            SPLIT_K: tl.constexpr, SWAP: tl.constexpr):
    """The tensor-core linear in either orientation (SWAP is a constexpr, so each kernel below compiles
    only its own branch): SWAP=False y tile = x tile @ W tile^T; SWAP=True y^T tile = W tile @ x^T tile.
    K stepped NBK blocks at a time, the weight tile decoded in registers (_weight_tile), float32
    accumulation, grouped tile order, SPLIT_K parts summed by _write_out."""
    pid = tl.program_id(0)
    pid_k = tl.program_id(1)
    WPB: tl.constexpr = BLOCK // 8
    BK: tl.constexpr = NBK * BLOCK
    if SWAP:
        pid_n, pid_m = _grouped_tile(pid, tl.cdiv(N, BLOCK_N), tl.cdiv(M, BLOCK_M), GROUP_M)
    else:
        pid_m, pid_n = _grouped_tile(pid, tl.cdiv(M, BLOCK_M), tl.cdiv(N, BLOCK_N), GROUP_M)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mmask = offs_m < M
    rmask = rows < N
    kk = tl.arange(0, BK)
    if SWAP:
        acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
        x_base = x_ptr + offs_m[None, :].to(tl.int64) * stride_xm
    else:
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        x_base = x_ptr + offs_m[:, None].to(tl.int64) * stride_xm
    blk_lo, blk_hi = _k_range(pid_k, NUM_BLOCKS, SPLIT_K, NBK)
    for blk0 in range(blk_lo, blk_hi, NBK):
        wt = _weight_tile(codes_ptr, scales_ptr, rows[:, None, None], rows[:, None], rmask, blk0, blk_hi, stride_cn,
                          stride_sn, x_ptr.dtype.element_ty, IS_NV, BLOCK_N, NBK, WPB)
        k1 = blk0 * BLOCK + kk
        if SWAP:
            xt = tl.load(x_base + k1[:, None], mask=mmask[None, :] & (k1[:, None] < blk_hi * BLOCK) & (k1[:, None] < K),
                         other=0.0)
            acc = tl.dot(wt, xt, acc)
        else:
            xv = tl.load(x_base + k1[None, :], mask=mmask[:, None] & (k1[None, :] < blk_hi * BLOCK) & (k1[None, :] < K),
                         other=0.0)
            acc = tl.dot(xv, tl.trans(wt), acc)
    _store_mm(acc * _tensor_scale(ts_ptr, IS_NV), bias_ptr, y_ptr, ws_ptr, offs_m, rows, M, N, stride_ym, HAS_BIAS,
              SPLIT_K, SWAP)


@triton.jit
def fp4_mm_w32_kernel(
    x_ptr, codes_ptr, scales_ptr, ts_ptr, bias_ptr, y_ptr, ws_ptr,
    M, N, K, NUM_BLOCKS, stride_xm, stride_cn, stride_sn, stride_ym, M_BUCKET,
    IS_NV: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, NBK: tl.constexpr, GROUP_M: tl.constexpr,
    SPLIT_K: tl.constexpr,
):
    """y = x @ dequant(W)^T (+ bias): (BLOCK_M x BLOCK_N) tiles, the decoded weight tile (code * block
    scale in float32, cast to x's dtype) the dot's second operand. M_BUCKET (M rounded up to a power of
    two) is only an autotuning key. Triton 3.6 cannot compile this form with BLOCK_M >= 64."""
    _fp4_mm(x_ptr, codes_ptr, scales_ptr, ts_ptr, bias_ptr, y_ptr, ws_ptr, M, N, K, NUM_BLOCKS, stride_xm, stride_cn,
            stride_sn, stride_ym, IS_NV, HAS_BIAS, BLOCK, BLOCK_M, BLOCK_N, NBK, GROUP_M, SPLIT_K, False)


@triton.jit
def fp4_mm_t_kernel(
    x_ptr, codes_ptr, scales_ptr, ts_ptr, bias_ptr, y_ptr, ws_ptr,
    M, N, K, NUM_BLOCKS, stride_xm, stride_cn, stride_sn, stride_ym, M_BUCKET,
    IS_NV: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, NBK: tl.constexpr, GROUP_M: tl.constexpr,
    SPLIT_K: tl.constexpr,
):
    """"Swap-AB" tensor-core kernel: y^T tile (BLOCK_N x BLOCK_M) = W tile @ x^T tile.

    The decoded weight tile is the dot's FIRST operand (it may stay in registers: Hopper's wgmma
    reads A from registers, B from shared memory), the activations the second; so the weight rows
    fill the 64/128-row MMA dimension and a small M (the batch) only has to fill the 16..256-column
    one. Each weight element is decoded once per BLOCK_M activation rows. GROUP_M weight-row tiles
    are grouped (the activation tiles they share stay in L2). SPLIT_K > 1 splits K over grid axis 1
    (parts summed by _write_out), so that the few row tiles of a small batch fill every SM.
    """
    _fp4_mm(x_ptr, codes_ptr, scales_ptr, ts_ptr, bias_ptr, y_ptr, ws_ptr, M, N, K, NUM_BLOCKS, stride_xm, stride_cn,
            stride_sn, stride_ym, IS_NV, HAS_BIAS, BLOCK, BLOCK_M, BLOCK_N, NBK, GROUP_M, SPLIT_K, True)


# ---------------------------------------------------------------------------------------------------
# fused linear, tensor cores, packed decode: bfloat16 pairs built by shifts and masks, scaled in bf16x2
# ---------------------------------------------------------------------------------------------------
@triton.jit
def _e2m1_pair_bf16(w, P: tl.constexpr):
    """int32 words of 8 codes -> int32 whose two halves are the bfloat16 bit patterns of E2M1_value *
    2^-126 of element P (low half) and element P + 4 (high half), exactly.

    The code's magnitude bits (e1 e0 m) placed at bits 8..6 make the exponent field e and the top
    mantissa bit m: e > 0 gives 2^(e-127) * 1.m = E2M1 * 2^-126, e = 0 bfloat16's subnormal 0.m * 2^-126
    (E2M1's 0.5 * 2^-126), the same bias arithmetic as E2M1 shifted by 126; the sign goes to bit 15.
    Elements P and P + 4 sit 16 bits apart in the word, so one shift and mask serves both halves:
    three or four integer operations per two elements, no conversion instruction.
    """
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
    return (mag & 0x01C001C0) | (sgn & -2147450880)  # 0x80008000 as int32


@triton.jit
def _bf16_halves(h):
    """int32 -> (its low 16 bits, its high 16 bits) reinterpreted as bfloat16."""
    return (h.to(tl.int16).to(tl.bfloat16, bitcast=True),
            (h >> 16).to(tl.int16).to(tl.bfloat16, bitcast=True))


@triton.jit
def _scale_bf16(s, IS_NV: tl.constexpr):
    """Scale bytes -> the block scale as bfloat16, exactly: E8M0 2^(s - 127) (0 -> the subnormal 2^-127,
    0xFF -> NaN, OCP MX v1.0 5.2) from its bits; E4M3 (3 mantissa bits) through float32."""
    if IS_NV:
        return _e4m3_to_f32(s).to(tl.bfloat16)
    else:
        c = s.to(tl.int32)
        bits = tl.where(c == 0, 0x40, tl.where(c == 255, 0x7FC0, c << 7))
        return bits.to(tl.int16).to(tl.bfloat16, bitcast=True)


@triton.jit
def _e2m1_packed_tile(w, sb, DT: tl.constexpr, IS_NV: tl.constexpr, PACKED: tl.constexpr, BN: tl.constexpr,
                      BK: tl.constexpr):
    """[BN, NBK, WPB] int32 code words and [BN, NBK] scale bytes -> [BN, BK] ``code * block scale`` in DT,
    K order (joins as in _e2m1_word_tile). The nvfp4 tensor scale is NOT in it (the caller scales the
    float32 accumulator).

    PACKED (bfloat16 on a GPU): the decoded E2M1 * 2^-126 times 2^126, then times the block scale, both
    in bfloat16 -- exact (a product of a 2-bit and a <= 4-bit significand, inside bfloat16's range;
    the H100 multiplies bfloat16 subnormals exactly: test_fp4_gpu.py's test_gpu_packed_decode_bit_exact
    checks every code under every E8M0 byte and every finite E4M3 byte bit for bit). Otherwise (float16;
    the CPU interpreter, whose bfloat16 arithmetic is broken and which flushes bfloat16 subnormals):
    _e2m1_word_tile's float32 decode, the same values.
    """
    # one return (triton 3.6 type-checks every return, dead constexpr branches included)
    if PACKED:
        l0, h0 = _bf16_halves(_e2m1_pair_bf16(w, 0))
        l1, h1 = _bf16_halves(_e2m1_pair_bf16(w, 1))
        l2, h2 = _bf16_halves(_e2m1_pair_bf16(w, 2))
        l3, h3 = _bf16_halves(_e2m1_pair_bf16(w, 3))
        s = _scale_bf16(sb, IS_NV)[:, :, None]
        up = tl.full((1, 1, 1), 2.0 ** 126, tl.bfloat16)
        j0 = tl.join(l0 * up * s, h0 * up * s)
        j1 = tl.join(l1 * up * s, h1 * up * s)
        j2 = tl.join(l2 * up * s, h2 * up * s)
        j3 = tl.join(l3 * up * s, h3 * up * s)
        t = tl.join(tl.join(j0, j2), tl.join(j1, j3))  # element 4q + 2a + c at position 4q + 2a + c
        tile = tl.reshape(t, (BN, BK)).to(DT)
    else:
        tile = _e2m1_word_tile(w, sb, IS_NV, DT, BN, BK)
    return tile


@triton.jit
def _fp4_mm_p(x_ptr, codes_ptr, scales_ptr, ts_ptr, bias_ptr, y_ptr, ws_ptr,
              M, N, K, NUM_BLOCKS, stride_xm, stride_cn, stride_sn, stride_ym,
              IS_NV: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK: tl.constexpr,
              BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, NBK: tl.constexpr, GROUP_M: tl.constexpr,
              SPLIT_K: tl.constexpr, SWAP: tl.constexpr, EVEN_K: tl.constexpr, PACKED: tl.constexpr):
    """_fp4_mm with the packed decode (_e2m1_packed_tile) and a leaner K loop: loads of rows past N and
    activation rows past M are clamped to the last row (read, never stored), so no row masks; the
    pointers advance by a constant each step; with EVEN_K (every split's blocks are whole NBK steps
    and K fills the last block, checked by the launcher) no K masks either."""
    pid = tl.program_id(0)
    pid_k = tl.program_id(1)
    WPB: tl.constexpr = BLOCK // 8
    BK: tl.constexpr = NBK * BLOCK
    if SWAP:
        pid_n, pid_m = _grouped_tile(pid, tl.cdiv(N, BLOCK_N), tl.cdiv(M, BLOCK_M), GROUP_M)
    else:
        pid_m, pid_n = _grouped_tile(pid, tl.cdiv(M, BLOCK_M), tl.cdiv(N, BLOCK_N), GROUP_M)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_ld = tl.minimum(offs_m, M - 1)
    r_ld = tl.minimum(rows, N - 1)
    blk_lo, blk_hi = _k_range(pid_k, NUM_BLOCKS, SPLIT_K, NBK)
    bb = tl.arange(0, NBK)
    kk = tl.arange(0, BK)
    w_ptrs = (codes_ptr + r_ld[:, None, None].to(tl.int64) * stride_cn
              + ((blk_lo + bb)[None, :, None] * WPB + tl.arange(0, WPB)[None, None, :]))
    s_ptrs = scales_ptr + r_ld[:, None].to(tl.int64) * stride_sn + (blk_lo + bb)[None, :]
    if SWAP:
        acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
        x_ptrs = x_ptr + m_ld[None, :].to(tl.int64) * stride_xm + (blk_lo * BLOCK + kk)[:, None]
    else:
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        x_ptrs = x_ptr + m_ld[:, None].to(tl.int64) * stride_xm + (blk_lo * BLOCK + kk)[None, :]
    for blk0 in range(blk_lo, blk_hi, NBK):
        if EVEN_K:
            w = tl.load(w_ptrs)
            sb = tl.load(s_ptrs)
            xv = tl.load(x_ptrs)
        else:
            bmask = (blk0 + bb) < blk_hi
            w = tl.load(w_ptrs, mask=bmask[None, :, None], other=0)
            sb = tl.load(s_ptrs, mask=bmask[None, :], other=0)
            k1 = blk0 * BLOCK + kk
            kmask = (k1 < blk_hi * BLOCK) & (k1 < K)
            if SWAP:
                xv = tl.load(x_ptrs, mask=kmask[:, None], other=0.0)
            else:
                xv = tl.load(x_ptrs, mask=kmask[None, :], other=0.0)
        wt = _e2m1_packed_tile(w, sb, x_ptr.dtype.element_ty, IS_NV, PACKED, BLOCK_N, BK)
        if SWAP:
            acc = tl.dot(wt, xv, acc)
        else:
            acc = tl.dot(xv, tl.trans(wt), acc)
        w_ptrs += NBK * WPB
        s_ptrs += NBK
        x_ptrs += BK
    _store_mm(acc * _tensor_scale(ts_ptr, IS_NV), bias_ptr, y_ptr, ws_ptr, offs_m, rows, M, N, stride_ym, HAS_BIAS,
              SPLIT_K, SWAP)


@triton.jit
def fp4_mm_p_kernel(
    x_ptr, codes_ptr, scales_ptr, ts_ptr, bias_ptr, y_ptr, ws_ptr,
    M, N, K, NUM_BLOCKS, stride_xm, stride_cn, stride_sn, stride_ym, M_BUCKET,
    IS_NV: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, NBK: tl.constexpr, GROUP_M: tl.constexpr,
    SPLIT_K: tl.constexpr, EVEN_K: tl.constexpr, PACKED: tl.constexpr,
):
    """y tile = x tile @ W tile^T with the packed decode (fp4_mm_w32_kernel's form; BLOCK_M < 64)."""
    _fp4_mm_p(x_ptr, codes_ptr, scales_ptr, ts_ptr, bias_ptr, y_ptr, ws_ptr, M, N, K, NUM_BLOCKS, stride_xm,
              stride_cn, stride_sn, stride_ym, IS_NV, HAS_BIAS, BLOCK, BLOCK_M, BLOCK_N, NBK, GROUP_M, SPLIT_K,
              False, EVEN_K, PACKED)


@triton.jit
def fp4_mm_pt_kernel(
    x_ptr, codes_ptr, scales_ptr, ts_ptr, bias_ptr, y_ptr, ws_ptr,
    M, N, K, NUM_BLOCKS, stride_xm, stride_cn, stride_sn, stride_ym, M_BUCKET,
    IS_NV: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, NBK: tl.constexpr, GROUP_M: tl.constexpr,
    SPLIT_K: tl.constexpr, EVEN_K: tl.constexpr, PACKED: tl.constexpr,
):
    """y^T tile = W tile @ x^T tile with the packed decode (fp4_mm_t_kernel's swap-AB form)."""
    _fp4_mm_p(x_ptr, codes_ptr, scales_ptr, ts_ptr, bias_ptr, y_ptr, ws_ptr, M, N, K, NUM_BLOCKS, stride_xm,
              stride_cn, stride_sn, stride_ym, IS_NV, HAS_BIAS, BLOCK, BLOCK_M, BLOCK_N, NBK, GROUP_M, SPLIT_K,
              True, EVEN_K, PACKED)
