"""Reference FP4 kernels in plain torch: ``quantize_fp4``, ``dequantize_fp4``, ``fp4_linear``.

The semantics of docs/CONTRACT.md, "Kernel names"; every other backend's FP4 kernels are checked
against these (bit-exact codecs, matmul by dtype tolerance). Plain torch runs on any device, so this
is also the fallback on a GPU or NPU that has no fused kernel yet: correct, just not fused. All of it
is vectorised (no Python loop over blocks); the codecs work in row chunks sized for the cache.
"""

from __future__ import annotations

import torch

from vbhal.formats import QuantizedWeight, quantize
from vbhal.formats.reference import autocast_enabled, check_linear_inputs, fp4_linear_reference

__all__ = ["KERNELS", "autocast_enabled", "check_linear_inputs", "dequantize_fp4", "fp4_linear", "quantize_fp4"]


def quantize_fp4(w: torch.Tensor, fmt: str, *, scale_rule: str = "floor", name: str | None = None) -> QuantizedWeight:
    """Quantize a 2-D weight to FP4 on its own device (:func:`vbhal.formats.quantize`)."""
    return quantize(w, fmt, scale_rule=scale_rule, name=name)


def dequantize_fp4(qw: QuantizedWeight, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The (N, K) weight in ``dtype`` (decoded in float32, then cast)."""
    return qw.dequantize(dtype)


def fp4_linear(x: torch.Tensor, qw: QuantizedWeight, bias: torch.Tensor | None = None) -> torch.Tensor:
    """y = x @ W^T + b, W dequantized; float32 math, result in x.dtype (:func:`fp4_linear_reference`)."""
    return fp4_linear_reference(x, qw, bias)


KERNELS = {"quantize_fp4": quantize_fp4, "dequantize_fp4": dequantize_fp4, "fp4_linear": fp4_linear}
