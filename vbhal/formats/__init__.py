"""FP4 formats in plain torch (any device): the reference every FP4 kernel matches bit for bit.

- :mod:`.e2m1` — the E2M1 element codec and nibble packing (OCP MX v1.0, FP4 element data type).
- :mod:`.mx` — MXFP4: 32-element blocks, E8M0 scales, FLOOR (spec section 6.3) or RCEIL scale rule.
- :mod:`.nvfp4` — NVFP4: 16-element blocks, E4M3 scales and an FP32 tensor scale.
- :mod:`.quantized_weight` — :class:`QuantizedWeight` and :func:`quantize`.
- :mod:`.reference` — the reference ``fp4_linear`` (dequantize in float32, matmul, cast).

>>> import torch, vbhal.formats as F
>>> qw = F.quantize(torch.randn(32, 64), "mxfp4")
>>> qw.dequantize().shape
torch.Size([32, 64])
"""

from .e2m1 import E2M1_MAX, E2M1_VALUES, decode_e2m1, encode_e2m1, pack_fp4, unpack_fp4
from .mx import E8M0_BIAS, MX_BLOCK_SIZE, SCALE_RULES, e8m0_to_float32
from .nvfp4 import E4M3_MAX, NVFP4_BLOCK_SIZE, nvfp4_tensor_scale
from .quantized_weight import BLOCK_SIZES, FORMATS, SCALE_DTYPES, QuantizedWeight, padded_k, quantize
from .reference import fp4_linear_reference


def dequantize(qw: QuantizedWeight, dtype=None):
    """``qw.dequantize(dtype)`` as a function (float32 when dtype is None)."""
    import torch

    return qw.dequantize(torch.float32 if dtype is None else dtype)


__all__ = [
    "BLOCK_SIZES",
    "E2M1_MAX",
    "E2M1_VALUES",
    "E4M3_MAX",
    "E8M0_BIAS",
    "FORMATS",
    "MX_BLOCK_SIZE",
    "NVFP4_BLOCK_SIZE",
    "SCALE_DTYPES",
    "SCALE_RULES",
    "QuantizedWeight",
    "decode_e2m1",
    "dequantize",
    "e8m0_to_float32",
    "encode_e2m1",
    "fp4_linear_reference",
    "nvfp4_tensor_scale",
    "pack_fp4",
    "padded_k",
    "quantize",
    "unpack_fp4",
]
