"""MXFP4: the OCP Microscaling (MX) v1.0 format with FP4 E2M1 elements and E8M0 block scales.

OCP Microscaling Formats (MX) Specification v1.0 (September 2023):
- section 5 (table 1): MXFP4 = blocks of k = 32 E2M1 elements sharing one E8M0 scale X.
- the E8M0 scale data type (section 5): an unsigned power-of-two exponent, bias 127, values 2^-127 .. 2^127,
  code 0xFF = NaN, no zero. Stored here as ``torch.float8_e8m0fnu``.
- section 6.3 (conversion, "the minimally supported" scale rule, our ``"floor"``):
  X = 2^(floor(log2(max_i |V_i|)) - emax_elem), emax_elem = 2 for E2M1; each element is
  P_i = quantize_to_E2M1(V_i / X), round-to-nearest-even, values beyond +-6 clamped to +-6.
  FLOOR can clip the top of a block (|V|/X up to 7.99 saturates to 6); that is the spec's rule.
- ``"rceil"``: the rule cuBLAS and Blackwell's ``cvt.rp.satfinite.ue8m0x2.f32`` use (see the cuBLAS
  docs, "1D block quantization"): X = 2^ceil(log2(max_i |V_i| / 6)), so nothing saturates.

Decoding (section 5): V_i = X * P_i.

Bit-exact with torchao 0.18's ``to_mx(..., torch.float4_e2m1fn_x2, 32, FLOOR | RCEIL)`` wherever
torchao follows the spec. Two places where it does not, and we follow the spec/hardware instead (tests
pin both): (1) FLOOR with scale code 0 (block max below 2^-124): torchao divides by 2^-126 but stores
2^-127, so its own decode is off by 2x; we divide by the stored 2^-127. (2) RCEIL: torchao's eager
fallback computes ceil(log2(d)) in float32, which misses the round-up when d is one or a few ulps
above a power of two >= 2^4 (log2 rounds down to the integer), and uses reciprocal 1.0 for scale
code 0; we take the exponent from d's bits (exactly the hardware's round-up) and use 2^127.
"""

from __future__ import annotations

import torch

from .e2m1 import E2M1_MAX, E2M1_MAX_POW2, decode_packed_fp4, encode_e2m1, pack_fp4, true_divide

__all__ = [
    "E8M0_BIAS",
    "E8M0_NAN",
    "MX_BLOCK_SIZE",
    "RCEIL_DECODE_OVERFLOW",
    "SCALE_RULES",
    "e8m0_to_float32",
    "mxfp4_dequantize",
    "mxfp4_quantize_padded",
]

#: Elements per shared scale (OCP MX v1.0, section 5, table 1: k = 32 for every concrete MX format).
MX_BLOCK_SIZE = 32
#: E8M0 exponent bias (OCP MX v1.0, E8M0 scale data type).
E8M0_BIAS = 127
#: E8M0 code reserved for NaN (OCP MX v1.0, E8M0 scale data type).
E8M0_NAN = 0xFF
#: Scale rules we implement: the spec's FLOOR (section 6.3) and the round-up RCEIL of cuBLAS/Blackwell.
SCALE_RULES = ("floor", "rceil")

#: RCEIL only: the smallest magnitude whose MXFP4 value is not a float32. Above 6 * 2^125 a block gets
#: X = 2^126 and an element >= 3.5 * 2^126 rounds to 4 * 2^126 = 2^128 (FLOOR never gets there: its X
#: is at most 2^125). Such a weight is refused rather than decoded to inf.
RCEIL_DECODE_OVERFLOW = 3.5 * 2.0**126

_F32_MBITS = 23  # IEEE-754 binary32 mantissa bits
_F32_EXP_MASK = 0xFF
_F32_MANT_MASK = (1 << _F32_MBITS) - 1


def e8m0_to_float32(codes: torch.Tensor) -> torch.Tensor:
    """E8M0 codes (uint8 or float8_e8m0fnu) -> the float32 power of two 2^(code - 127); 0xFF -> NaN.

    Built from bits, not from ``pow``/``exp2``, so it is exact on every device: code >= 1 is the
    float32 with that biased exponent and zero mantissa; code 0 (2^-127) is the float32 subnormal
    with only mantissa bit 22 set.
    """
    c = codes.view(torch.uint8).to(torch.int32)
    bits = torch.where(c > 0, c << _F32_MBITS, torch.full_like(c, 1 << (_F32_MBITS - 1)))
    out = bits.view(torch.float32)
    return torch.where(c == E8M0_NAN, torch.full_like(out, float("nan")), out)


def _float32_exponent_field(x: torch.Tensor) -> torch.Tensor:
    """Biased exponent field (0..255) of float32 values, as int32; 0 for zero and subnormals."""
    return (x.view(torch.int32) >> _F32_MBITS) & _F32_EXP_MASK


def _floor_scale_codes(amax: torch.Tensor) -> torch.Tensor:
    # floor(log2(amax)) is the unbiased exponent field; zero/subnormal amax reads as -127, below every
    # representable scale, so the clamp maps it to the smallest E8M0 scale 2^-127 (code 0).
    unbiased = _float32_exponent_field(amax) - E8M0_BIAS - E2M1_MAX_POW2
    return (unbiased.clamp(min=-E8M0_BIAS) + E8M0_BIAS).to(torch.uint8)


def _rceil_scale_codes(amax: torch.Tensor) -> torch.Tensor:
    # d = amax / 6 rounded to float32 (as cuBLAS does), then rounded UP to a power of two, read off
    # d's bits: exponent field + 1 when any mantissa bit is set. Subnormal d (exponent field 0):
    # d <= 2^-127 -> code 0 (2^-127), else code 1 (2^-126). amax <= float32 max keeps code <= 253.
    d = true_divide(amax, E2M1_MAX)
    e = _float32_exponent_field(d)
    mant = d.view(torch.int32) & _F32_MANT_MASK
    normal = e + (mant != 0).to(torch.int32)
    subnormal = (d > 2.0**-127).to(torch.int32)
    return torch.where(e > 0, normal, subnormal).to(torch.uint8)


def mxfp4_quantize_padded(w: torch.Tensor, scale_rule: str = "floor") -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize a float32 (N, Kp) matrix, Kp a multiple of 32, to MXFP4.

    Returns ``(codes, scales)``: packed uint8 (N, Kp // 2) and ``float8_e8m0fnu`` (N, Kp // 32).
    The caller validates (finite, 2-D) and pads; see :func:`vbhal.formats.quantize`.
    """
    if scale_rule not in SCALE_RULES:
        raise ValueError(f"unknown MXFP4 scale rule {scale_rule!r}; use one of {SCALE_RULES}")
    n, kp = w.shape
    blocks = w.reshape(n, kp // MX_BLOCK_SIZE, MX_BLOCK_SIZE)
    amax = blocks.abs().amax(dim=-1, keepdim=True)
    if scale_rule == "floor":
        codes8 = _floor_scale_codes(amax)
        # V / X, X a power of two: exact unless the quotient is subnormal (then correctly rounded).
        scaled = blocks / e8m0_to_float32(codes8)
    else:
        codes8 = _rceil_scale_codes(amax)
        # 1/X = 2^(127 - code) is a normal float32 for every code 0..253, so this product is the same
        # correctly rounded V / X. Clamp as cuBLAS does (d rounded down can push |V|/X a hair past 6).
        recip_bits = ((2 * E8M0_BIAS - codes8.to(torch.int32)) << _F32_MBITS).view(torch.float32)
        scaled = (blocks * recip_bits).clamp(-E2M1_MAX, E2M1_MAX)
    codes = pack_fp4(encode_e2m1(scaled).reshape(n, kp))
    return codes, codes8.reshape(n, kp // MX_BLOCK_SIZE).view(torch.float8_e8m0fnu)


def mxfp4_dequantize(codes: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Decode packed MXFP4 (N, Kp // 2) + E8M0 scales (N, Kp // 32) to (N, Kp) in ``dtype``.

    Computed in float32 (code * 2^e is exact there, subnormals included) and then cast.
    """
    n = codes.shape[0]
    vals = decode_packed_fp4(codes).reshape(n, -1, MX_BLOCK_SIZE)
    out = vals * e8m0_to_float32(scales).unsqueeze(-1)
    return out.reshape(n, -1).to(dtype)
