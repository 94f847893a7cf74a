"""NVFP4: NVIDIA's FP4 format with 16-element blocks, E4M3 block scales and an FP32 tensor scale.

Definition (NVIDIA Blackwell; cuBLAS docs "1D block quantization", NVIDIA's "Introducing NVFP4"
technical blog, and torchao's ``nvfp4_quantize``, which we match bit for bit):
- elements: FP4 E2M1 (values +-{0, 0.5, 1, 1.5, 2, 3, 4, 6}), blocks of 16 along K;
- one scale per block in FP8 E4M3 (``torch.float8_e4m3fn``, max 448), used as an unsigned value;
- one FP32 scale per tensor, so block scales use the whole E4M3 range:
  tensor_scale = amax(|W|) / (448 * 6).

Quantization (two-level, torchao ``nvfp4_quantize`` with ``per_tensor_scale``):
  s_b   = e4m3(clamp((amax_b / 6) / tensor_scale, 2^-6, 448))   round-to-nearest-even cast
  P_i   = e2m1(clamp(V_i * ((1 / tensor_scale) / s_b), -6, 6))
Decoding: V_i = P_i * (tensor_scale * s_b), the per-block product formed first in float32 (the order of
torchao's ``NVFP4Tensor.dequantize``; a fused kernel forms the per-block scale once as well).

Every division is IEEE-correct on every device (see :func:`vbhal.formats.e2m1.true_divide`), so the
bytes are the same on CPU and GPU and equal torchao's on CPU. (torchao on CUDA divides by Python
scalars through PyTorch's multiply-by-reciprocal fast path: its CUDA bytes can differ from its own
CPU bytes by a rounding of the tensor or block scale.)

Edge rule (ours, documented): tensor_scale is at least 2^-121 (:data:`NVFP4_MIN_TENSOR_SCALE`). Below it
(a weight whose largest magnitude is under ~1e-33, or all zeros) torchao's reciprocal
(1 / tensor_scale) / 2^-6 overflows to inf and it produces NaN codes; with the floor it stays finite
and correct. Everywhere else the result is torchao's, byte for byte.
"""

from __future__ import annotations

import torch

from .e2m1 import E2M1_MAX, decode_packed_fp4, encode_e2m1, pack_fp4, true_divide

__all__ = [
    "E4M3_MAX",
    "E4M3_MIN_SCALE",
    "NVFP4_BLOCK_SIZE",
    "NVFP4_MIN_TENSOR_SCALE",
    "nvfp4_dequantize",
    "nvfp4_quantize_padded",
    "nvfp4_tensor_scale",
    "nvfp4_tensor_scale_from_amax",
]

#: Elements per E4M3 block scale in NVFP4.
NVFP4_BLOCK_SIZE = 16
#: Largest finite FP8 E4M3 value (OCP 8-bit floating point spec, E4M3: 1.75 * 2^8 = 448).
E4M3_MAX = 448.0
#: Smallest block scale torchao allows: the smallest normal E4M3 value, 2^-6 (``finfo(e4m3fn).tiny``).
E4M3_MIN_SCALE = 2.0**-6
#: Floor of the per-tensor scale (see the module docstring): keeps (1/ts)/2^-6 <= 2^127 finite.
NVFP4_MIN_TENSOR_SCALE = 2.0**-121


def nvfp4_tensor_scale(w: torch.Tensor) -> torch.Tensor:
    """The FP32 per-tensor scale amax(|w|) / (448 * 6) as a 0-dim float32 tensor, floored at 2^-121."""
    return nvfp4_tensor_scale_from_amax(w.abs().amax().to(torch.float32))


def nvfp4_tensor_scale_from_amax(amax: torch.Tensor) -> torch.Tensor:
    """amax / (448 * 6) in float32 (torchao's ``per_tensor_amax_to_scale``), floored at 2^-121."""
    ts = true_divide(amax.to(torch.float32), E4M3_MAX * E2M1_MAX)
    return torch.clamp(ts, min=NVFP4_MIN_TENSOR_SCALE)


def nvfp4_quantize_padded(
    w: torch.Tensor, tensor_scale: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Quantize a float32 (N, Kp) matrix, Kp a multiple of 16, to NVFP4.

    Returns ``(codes, scales, tensor_scale)``: packed uint8 (N, Kp // 2), ``float8_e4m3fn``
    (N, Kp // 16) and the 0-dim float32 tensor scale (computed from ``w`` unless given; a given one is
    floored like a computed one). The caller validates and pads; see :func:`vbhal.formats.quantize`.
    """
    n, kp = w.shape
    if tensor_scale is None:
        tensor_scale = nvfp4_tensor_scale(w)
    else:
        tensor_scale = torch.clamp(tensor_scale.to(device=w.device, dtype=torch.float32).reshape(()),
                                   min=NVFP4_MIN_TENSOR_SCALE)
    blocks = w.reshape(n, kp // NVFP4_BLOCK_SIZE, NVFP4_BLOCK_SIZE)
    block_scale = true_divide(blocks.abs().amax(dim=-1), E2M1_MAX)
    scales = torch.clamp(block_scale / tensor_scale, min=E4M3_MIN_SCALE, max=E4M3_MAX).to(torch.float8_e4m3fn)
    recip = (1.0 / tensor_scale) / scales.to(torch.float32)
    scaled = torch.clamp(blocks * recip.unsqueeze(-1), -E2M1_MAX, E2M1_MAX)
    codes = pack_fp4(encode_e2m1(scaled).reshape(n, kp))
    return codes, scales, tensor_scale


def nvfp4_dequantize(
    codes: torch.Tensor, scales: torch.Tensor, tensor_scale: torch.Tensor, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """Decode packed NVFP4 (N, Kp // 2), E4M3 scales (N, Kp // 16) and the tensor scale to (N, Kp)."""
    n = codes.shape[0]
    vals = decode_packed_fp4(codes).reshape(n, -1, NVFP4_BLOCK_SIZE)
    block = tensor_scale.to(torch.float32) * scales.to(torch.float32)
    return (vals * block.unsqueeze(-1)).reshape(n, -1).to(dtype)
