"""Reference semantics of the ``fp4_linear`` kernel (docs/CONTRACT.md), shared by the CPU backend and
``vbhal.nn.FP4Linear`` (which sits below the backends and must not import them).

fp4_linear(x, qw, bias) = F.linear(x, dequantize(qw), bias) with the weight decoded in float32, the
product and bias added in float32, and the result cast to x.dtype.
"""

from __future__ import annotations

import contextlib

import torch

from ..errors import KernelError
from .quantized_weight import QuantizedWeight

__all__ = ["ACTIVATION_DTYPES", "autocast_enabled", "check_linear_inputs", "fp4_linear_reference"]

#: Activation dtypes an fp4_linear kernel takes.
ACTIVATION_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def autocast_enabled(device_type: str) -> bool:
    """``torch.is_autocast_enabled`` for a device type; False for types autocast does not know (meta)."""
    try:
        return bool(torch.is_autocast_enabled(device_type))
    except RuntimeError:
        return False


def check_linear_inputs(x: torch.Tensor, qw: QuantizedWeight, bias: torch.Tensor | None) -> None:
    """Raise KernelError (saying what to do) for inputs an fp4_linear kernel cannot take."""
    if x.device != qw.device:
        raise KernelError(
            f"fp4_linear got an input on {x.device} but its FP4 weight is on {qw.device}; move the input "
            "(or the module, with .to(device)) so both are on one device"
        )
    if x.dtype not in ACTIVATION_DTYPES:
        raise KernelError(
            f"fp4_linear takes float32/bfloat16/float16 activations, got {x.dtype}; cast the input "
            "(or run under torch.autocast)"
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


def fp4_linear_reference(x: torch.Tensor, qw: QuantizedWeight, bias: torch.Tensor | None = None) -> torch.Tensor:
    """y = x @ W^T + b with W = qw.dequantize(): float32 throughout, then cast to x.dtype.

    Autocast is switched off inside: the reference computes in float32 whatever the caller's context
    (FP4Linear casts the activation first, as ``nn.Linear`` would be under autocast).
    Differentiable w.r.t. x and bias (plain torch ops).
    """
    check_linear_inputs(x, qw, bias)
    dev = x.device.type
    with torch.autocast(dev, enabled=False) if autocast_enabled(dev) else contextlib.nullcontext():
        w32 = qw.dequantize(torch.float32)
        b32 = None if bias is None else bias.to(torch.float32)
        y = torch.nn.functional.linear(x.to(torch.float32), w32, b32)
    return y.to(x.dtype)
