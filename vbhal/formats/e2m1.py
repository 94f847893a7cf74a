"""FP4 E2M1 element codec: encode float32 to 4-bit codes, decode, pack two codes per byte.

E2M1 is the FP4 element data type of the OCP Microscaling Formats (MX) Specification v1.0 (section 5,
element data types: "FP4 (E2M1)"), also used by NVIDIA's NVFP4: 1 sign bit, 2 exponent bits (bias 1), 1 mantissa bit,
no Inf and no NaN. Its 16 codes, with the sign in bit 3, exponent in bits 2..1 and mantissa in bit 0:

    code (magnitude) 0    1    2    3    4    5    6    7
    value            0    0.5  1    1.5  2    3    4    6        (codes 8..15: the same, negative)

Conversion rounds to nearest, ties to even (the rounding of torchao's reference and of Blackwell's
``cvt.rn`` FP4 conversions) and saturates to +-6 (the spec's conversion, section 6.3, clamps values
beyond the largest normal to it). The sign of a
value that rounds to zero is kept (-0.0 -> code 8), as torchao's reference does.

Packing (the layout of ``torch.float4_e2m1fn_x2`` and of Blackwell's packed FP4 operands): element
2i goes in the LOW nibble of byte i, element 2i+1 in the HIGH nibble.
"""

from __future__ import annotations

import torch

__all__ = [
    "E2M1_MAX",
    "E2M1_MAX_POW2",
    "E2M1_SIGN_BIT",
    "E2M1_VALUES",
    "decode_e2m1",
    "decode_packed_fp4",
    "encode_e2m1",
    "pack_fp4",
    "true_divide",
    "unpack_fp4",
]

#: Magnitudes of the 8 non-negative E2M1 codes, index = code (OCP MX v1.0, FP4 E2M1 element type).
E2M1_VALUES: tuple[float, ...] = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)
#: Largest E2M1 magnitude (OCP MX v1.0, FP4 E2M1: emax = 2, max normal = 2^2 * 1.5 = 6).
E2M1_MAX = 6.0
#: Exponent of the largest power of two representable in E2M1 (emax_elem of OCP MX v1.0 section 6.3).
E2M1_MAX_POW2 = 2
#: Bit 3 of a code is its sign.
E2M1_SIGN_BIT = 0x8

# Decision boundaries between neighbouring magnitudes, for |x| in float32. A magnitude goes to code
# i = number of boundaries strictly below it. At an exact midpoint, round-half-to-even picks the code
# with mantissa bit 0 (the even code): 0.25 -> 0, 0.75 -> 1.0 (code 2), 1.25 -> 1.0, 1.75 -> 2.0,
# 2.5 -> 2.0, 3.5 -> 4.0, 5.0 -> 4.0. Where the tie goes UP (0.75, 1.75, 3.5) the boundary is moved one
# float32 ulp below the midpoint so that "strictly below" still counts the midpoint itself.
# Everything >= 5 (exclusive of 5.0 itself) lands in code 7 = 6.0: that is the saturation.
_TIE_UP_MIDPOINTS = (0.75, 1.75, 3.5)
_MIDPOINTS = (0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0)


def _boundaries() -> tuple[float, ...]:
    mids = torch.tensor(_MIDPOINTS, dtype=torch.float32)
    down = torch.nextafter(mids, torch.full_like(mids, -float("inf")))
    tie_up = torch.tensor([m in _TIE_UP_MIDPOINTS for m in _MIDPOINTS])
    # Python floats holding float32 values exactly: compared with a float32 tensor they stay exact.
    return tuple(torch.where(tie_up, down, mids).tolist())


#: The seven float32 decision boundaries (see above), ascending.
E2M1_BOUNDARIES: tuple[float, ...] = _boundaries()
_LUT_CACHE: dict[tuple[torch.device, torch.dtype], torch.Tensor] = {}


def encode_e2m1(x: torch.Tensor) -> torch.Tensor:
    """Round float32 values to E2M1 codes (uint8, one code per element, in the low 4 bits).

    Round-to-nearest-even, saturation to +-6, sign kept on values that round to zero. ``x`` must be
    float32 and finite (the callers refuse NaN/Inf before scaling, as a weight with them has no FP4
    meaning). Bit-exact with torchao's ``f32_to_f4_unpacked``.

    >>> encode_e2m1(torch.tensor([0.25, 0.75, -2.5, 7.0]))
    tensor([ 0,  2, 12,  7], dtype=torch.uint8)
    """
    if x.dtype != torch.float32:
        raise TypeError(f"encode_e2m1 takes float32, got {x.dtype}; cast with .float() first")
    mag = x.abs()
    bounds = E2M1_BOUNDARIES
    # code = number of boundaries strictly below |x|: seven compares, summed in uint8. On CPU this is
    # ~4x faster than torch.bucketize when the caller feeds cache-sized chunks (see quantize()).
    code = (mag > bounds[0]).to(torch.uint8)
    for i in range(1, len(_MIDPOINTS)):
        code += mag > bounds[i]
    return code | (torch.signbit(x).to(torch.uint8) << 3)


def decode_e2m1(codes: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Map E2M1 codes (uint8, low 4 bits) to their exact values in ``dtype`` (every E2M1 value is
    exact in float16/bfloat16/float32)."""
    if codes.dtype != torch.uint8:
        raise TypeError(f"decode_e2m1 takes uint8 codes, got {codes.dtype}")
    lut = _lut(codes.device, dtype)
    return lut[(codes & 0xF).to(torch.int32), 0]


def decode_packed_fp4(packed: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Packed bytes (..., M) -> values (..., 2M) in ``dtype``, through a 256-entry table of value pairs
    (one gather per byte: the fastest decode on CPU, and exact)."""
    if packed.dtype != torch.uint8:
        raise TypeError(f"decode_packed_fp4 takes uint8, got {packed.dtype}")
    pairs = torch.nn.functional.embedding(packed.to(torch.int32), _lut(packed.device, dtype))
    return pairs.flatten(-2)


def _lut(device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    # Row b = (value of low nibble of b, value of high nibble of b): element 2i is the low nibble.
    key = (device, dtype)
    lut = _LUT_CACHE.get(key)
    if lut is None:
        mags = torch.tensor(E2M1_VALUES, dtype=torch.float32)
        vals = torch.cat([mags, -mags])
        b = torch.arange(256)
        lut = torch.stack((vals[b & 0xF], vals[b >> 4]), dim=1)
        lut = _LUT_CACHE[key] = lut.to(device=device, dtype=dtype)
    return lut


def true_divide(t: torch.Tensor, divisor: float) -> torch.Tensor:
    """``t / divisor`` correctly rounded on every device.

    PyTorch's CUDA kernel for ``tensor / python_scalar`` (a CPU scalar) multiplies by the reciprocal
    instead, which is off by one ulp for some inputs: the codecs would then give different bytes on
    CPU and GPU. Dividing by a 0-dim tensor on ``t``'s device takes the IEEE division path everywhere.
    """
    return t / torch.full((), divisor, dtype=t.dtype, device=t.device)


def pack_fp4(codes: torch.Tensor) -> torch.Tensor:
    """Pack codes (uint8, last dimension even) two per byte: element 2i in the low nibble."""
    if codes.shape[-1] % 2:
        raise ValueError(f"pack_fp4 needs an even last dimension, got shape {tuple(codes.shape)}")
    return codes[..., 0::2] | (codes[..., 1::2] << 4)


def unpack_fp4(packed: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`pack_fp4`: uint8 (..., M) -> uint8 codes (..., 2M)."""
    if packed.dtype != torch.uint8:
        raise TypeError(f"unpack_fp4 takes uint8, got {packed.dtype}")
    return torch.stack((packed & 0xF, packed >> 4), dim=-1).flatten(-2)
