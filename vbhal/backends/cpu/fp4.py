"""Reference FP4 kernels in plain torch: ``quantize_fp4``, ``dequantize_fp4``, ``fp4_linear``.

The semantics of docs/CONTRACT.md, "Kernel names"; every other backend's FP4 kernels are checked
against these (bit-exact codecs, matmul by dtype tolerance). Plain torch runs on any device, so this
is also the fallback on a GPU or NPU that has no fused kernel yet: correct, just not fused.
"""

from __future__ import annotations

import contextlib

import torch

from vbhal.errors import KernelError
from vbhal.formats import QuantizedWeight, quantize

__all__ = ["quantize_fp4", "dequantize_fp4", "fp4_linear", "KERNELS"]

_ACT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def quantize_fp4(w: torch.Tensor, fmt: str, *, scale_rule: str = "floor", name: str | None = None) -> QuantizedWeight:
    """Quantize a 2-D weight to FP4 on its own device (:func:`vbhal.formats.quantize`)."""
    return quantize(w, fmt, scale_rule=scale_rule, name=name)


def dequantize_fp4(qw: QuantizedWeight, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The (N, K) weight in ``dtype`` (decoded in float32, then cast)."""
    return qw.dequantize(dtype)


def check_linear_inputs(x: torch.Tensor, qw: QuantizedWeight, bias: torch.Tensor | None) -> None:
    """Raise KernelError (saying what to do) for activations an fp4_linear kernel cannot take."""
    if x.dtype not in _ACT_DTYPES:
        raise KernelError(
            f"fp4_linear takes float32/bfloat16/float16 activations, got {x.dtype}; cast the input "
            "(or run under torch.autocast)"
        )
    if x.device != qw.device:
        raise KernelError(
            f"fp4_linear got an input on {x.device} but its FP4 weight is on {qw.device}; move the input "
            "(or the module, with .to(device)) so both are on one device"
        )
    if x.dim() == 0 or x.shape[-1] != qw.shape[1]:
        raise KernelError(
            f"fp4_linear expects input (..., {qw.shape[1]}) for an FP4 weight of shape {qw.shape}, got "
            f"{tuple(x.shape)}"
        )
    if bias is not None and (tuple(bias.shape) != (qw.shape[0],) or bias.device != x.device):
        raise KernelError(
            f"fp4_linear bias must have shape ({qw.shape[0]},) on {x.device}, got {tuple(bias.shape)} on "
            f"{bias.device}"
        )


def fp4_linear(x: torch.Tensor, qw: QuantizedWeight, bias: torch.Tensor | None = None) -> torch.Tensor:
    """y = x @ W^T + b with W = dequantize(qw): dequantize and matmul in float32, then cast to x.dtype.

    Autocast is switched off inside: the reference computes in float32 whatever the caller's
    context (the module casts the activation first, as ``nn.Linear`` would be under autocast).
    """
    check_linear_inputs(x, qw, bias)
    dev = x.device.type
    with torch.autocast(dev, enabled=False) if torch.is_autocast_enabled(dev) else contextlib.nullcontext():
        w32 = qw.dequantize(torch.float32)
        b32 = None if bias is None else bias.to(torch.float32)
        y = torch.nn.functional.linear(x.to(torch.float32), w32, b32)
    return y.to(x.dtype)


KERNELS = {"quantize_fp4": quantize_fp4, "dequantize_fp4": dequantize_fp4, "fp4_linear": fp4_linear}
