"""GPU quantize / dequantize for FP4 (MXFP4, NVFP4): Triton kernels, bit-exact with vbhal.formats.

``quantize_fp4(w, fmt, scale_rule=...)`` and ``dequantize_fp4(qw, dtype)`` are the CUDA backend's
kernels of those names (see docs/CONTRACT.md); both are torch custom ops underneath
(``vbhal::quantize_fp4_cuda``, ``vbhal::dequantize_fp4_cuda``) so torch.compile can trace them.

Quantize is one pass over the weight for MXFP4 (each program reads its tile once, writes codes and
scales, and raises a flag on NaN/Inf). NVFP4 needs the tensor-wide amax before the first block scale
can be formed, so it costs one extra read (``fp4_amax_kernel``) before the same single pass.

triton is imported on first use, never at module import (``import vbhal`` must not import it).
"""

from __future__ import annotations

import os

import torch

from vbhal.errors import QuantizationError
from vbhal.formats import BLOCK_SIZES, FORMATS, SCALE_DTYPES, QuantizedWeight, padded_k
from vbhal.formats.quantized_weight import check_quantize_args
from vbhal.formats.nvfp4 import NVFP4_MIN_TENSOR_SCALE, nvfp4_tensor_scale_from_amax

__all__ = ["quantize_fp4", "dequantize_fp4", "is_interpreter", "kernels_module", "new_output"]

_INPUT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
#: Tests set this: every kernel output is allocated filled with garbage (NaN / 0xA5 bytes) instead of
#: uninitialized memory, so an element a kernel forgets to write cannot pass by luck.
POISON_OUTPUTS = os.environ.get("VBHAL_POISON_OUTPUTS") == "1"
_FMT_IDS = {fmt: i for i, fmt in enumerate(FORMATS)}


def is_interpreter() -> bool:
    """True when Triton runs in its CPU interpreter (TRITON_INTERPRET=1, set before triton's import)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def kernels_module():
    """Import the Triton kernels (and triton) on first use."""
    from vbhal.backends.cuda import fp4_kernels

    return fp4_kernels


def new_output(shape, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """torch.empty, or a poisoned buffer when POISON_OUTPUTS is set (see above)."""
    if not POISON_OUTPUTS:
        return torch.empty(shape, dtype=dtype, device=device)
    if dtype.is_floating_point:
        return torch.full(shape, float("nan"), dtype=dtype, device=device)
    return torch.full(shape, 0xA5 if dtype == torch.uint8 else -1234567, dtype=dtype, device=device)


def _check_device(t: torch.Tensor, what: str) -> None:
    if t.device.type != "cuda" and not (t.device.type == "cpu" and is_interpreter()):
        raise QuantizationError(
            f"the CUDA FP4 kernels got {what} on {t.device}; move it to a CUDA device, or use the CPU "
            "backend's kernels (vbhal.hal.get_kernel(name, 'cpu'))"
        )


_TUNED_QUANTIZE = []


def _tuned_quantize():
    """The quantize kernel autotuned over a few tile shapes (bad_ptr re-zeroed around each trial)."""
    if not _TUNED_QUANTIZE:
        import triton

        k4 = kernels_module()
        C = triton.Config
        # NBK counts blocks: ~4096-8192 elements per program
        configs = [C({"ROWS": 8, "NBK": 16}, num_warps=4), C({"ROWS": 4, "NBK": 32}, num_warps=4),
                   C({"ROWS": 16, "NBK": 16}, num_warps=8)]
        _TUNED_QUANTIZE.append(triton.autotune(configs, key=["N", "K", "BLOCK", "IS_NV", "RCEIL"],
                                               reset_to_zero=["bad_ptr"])(k4.fp4_quantize_kernel))
    return _TUNED_QUANTIZE[0]


def _quantize_tile(fmt: str) -> tuple[int, int, int]:
    """(ROWS, NBK, num_warps) of the dequantize kernel: ~4096 elements per program."""
    if fmt == "mxfp4":
        return 8, 16, 4
    return 8, 32, 4


def _validate_weight(w) -> None:
    if not isinstance(w, torch.Tensor):
        raise QuantizationError(f"quantize_fp4 takes a torch.Tensor weight, got {type(w).__name__}")
    if w.dtype not in _INPUT_DTYPES + (torch.float64,):
        raise QuantizationError(
            f"quantize_fp4 takes a float32/bfloat16/float16 weight, got {w.dtype}; cast it first"
        )
    if w.dim() != 2:
        raise QuantizationError(
            f"quantize_fp4 takes a 2-D (out, in) weight, got shape {tuple(w.shape)}; reshape it to 2-D first"
        )
    if w.numel() == 0:
        raise QuantizationError(f"the weight has shape {tuple(w.shape)}: nothing to quantize")
    _check_device(w, "the weight")


@torch.library.custom_op("vbhal::quantize_fp4_cuda", mutates_args=())
def _quantize_op(w: torch.Tensor, fmt_id: int, rceil: bool, tensor_scale: torch.Tensor) -> list[torch.Tensor]:
    """(codes uint8 (N, Kp/2), scale bytes uint8 (N, Kp/B), bad-input flag int32 (1,)).

    ``tensor_scale`` is read by nvfp4 only (a 0-dim float32 on w's device); mxfp4 passes any tensor.
    """
    fmt = FORMATS[fmt_id]
    k4 = kernels_module()
    n, k = w.shape
    block = BLOCK_SIZES[fmt]
    kp = padded_k(k, fmt)
    nblocks = kp // block
    codes = new_output((n, kp // 2), torch.uint8, w.device)
    scales = new_output((n, nblocks), torch.uint8, w.device)
    bad = torch.zeros((1,), dtype=torch.int32, device=w.device)
    args = (w, codes, scales, tensor_scale, bad, n, k, nblocks, w.stride(0), codes.stride(0), scales.stride(0))
    consts = dict(IS_NV=fmt == "nvfp4", RCEIL=rceil, BLOCK=block)
    if is_interpreter() or w.device.type != "cuda":
        k4.fp4_quantize_kernel[(triton_cdiv(n, 2), triton_cdiv(nblocks, 2))](*args, **consts, ROWS=2, NBK=2,
                                                                              num_warps=1)
    else:
        grid = lambda meta: (triton_cdiv(n, meta["ROWS"]), triton_cdiv(nblocks, meta["NBK"]))  # noqa: E731
        _tuned_quantize()[grid](*args, **consts)
    return [codes, scales, bad]


@_quantize_op.register_fake
def _(w, fmt_id, rceil, tensor_scale):
    fmt = FORMATS[fmt_id]
    n, k = w.shape
    kp = padded_k(k, fmt)
    return [w.new_empty((n, kp // 2), dtype=torch.uint8), w.new_empty((n, kp // BLOCK_SIZES[fmt]), dtype=torch.uint8),
            w.new_empty((1,), dtype=torch.int32)]


def triton_cdiv(a: int, b: int) -> int:
    return -(-a // b)


def nvfp4_tensor_scale_gpu(w: torch.Tensor) -> torch.Tensor:
    """amax(|w|) / (448 * 6), floored at 2^-121: vbhal.formats.nvfp4.nvfp4_tensor_scale without the
    |w| temporary. The amax is one Triton pass (``fp4_amax_kernel``; a strided weight takes torch's
    inf-norm, the same max of |w|, exact in any float dtype); the division is the reference's own
    (IEEE-correct on the GPU, unlike tensor / python-scalar there)."""
    if w.is_contiguous():
        bits = torch.zeros((), dtype=torch.int32, device=w.device)
        block = 8192
        kernels_module().fp4_amax_kernel[(triton_cdiv(w.numel(), block),)](w, bits, w.numel(), BLOCK=block,
                                                                           num_warps=8)
        amax = bits.view(torch.float32)
    else:
        amax = torch.linalg.vector_norm(w, ord=float("inf")).to(torch.float32)
    return nvfp4_tensor_scale_from_amax(amax)


def quantize_fp4(w: torch.Tensor, fmt: str = "mxfp4", *, scale_rule: str = "floor",
                 tensor_scale: torch.Tensor | None = None) -> QuantizedWeight:
    """Quantize a 2-D (N, K) float weight on the GPU; bit-exact with :func:`vbhal.formats.quantize`.

    >>> qw = quantize_fp4(torch.randn(4096, 4096, device="cuda", dtype=torch.bfloat16), "nvfp4")
    """
    check_quantize_args(fmt, scale_rule, tensor_scale)
    _validate_weight(w)
    orig_dtype = w.dtype
    w_in = w.detach()
    if w_in.dtype == torch.float64:
        w_in = w_in.to(torch.float32)
    if w_in.stride(1) != 1:
        w_in = w_in.contiguous()
    ts = None
    if fmt == "nvfp4":
        if tensor_scale is None:
            ts = nvfp4_tensor_scale_gpu(w_in)
        else:
            ts = torch.clamp(tensor_scale.to(device=w.device, dtype=torch.float32).reshape(()),
                             min=NVFP4_MIN_TENSOR_SCALE)
        ts_arg = ts
    else:
        ts_arg = w_in.new_zeros((), dtype=torch.float32)
    codes, scales, bad = torch.ops.vbhal.quantize_fp4_cuda(w_in, _FMT_IDS[fmt], scale_rule == "rceil", ts_arg)
    if int(bad.item()):
        n_nan = int(torch.isnan(w_in).sum())
        n_inf = int(torch.isinf(w_in).sum())
        raise QuantizationError(
            f"the weight contains {n_nan} NaN and {n_inf} Inf values (dtype {orig_dtype}); FP4 has no NaN/Inf "
            "codes and a block scale computed from them would be meaningless. Fix or exclude this layer"
        )
    return QuantizedWeight(codes, scales.view(SCALE_DTYPES[fmt]), ts, fmt, tuple(w.shape), orig_dtype, scale_rule)


# ---------------------------------------------------------------------------------------------------
# dequantize
# ---------------------------------------------------------------------------------------------------
_OUT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


@torch.library.custom_op("vbhal::dequantize_fp4_cuda", mutates_args=())
def _dequantize_op(codes: torch.Tensor, scales: torch.Tensor, tensor_scale: torch.Tensor, fmt_id: int, k: int,
                   dtype: torch.dtype) -> torch.Tensor:
    """(N, K) in ``dtype`` from codes uint8 (N, Kp/2) and scale bytes uint8 (N, Kp/B)."""
    fmt = FORMATS[fmt_id]
    out = new_output((codes.shape[0], k), dtype, codes.device)
    dequantize_into(out, codes, scales, tensor_scale, fmt)
    return out


def dequantize_into(out: torch.Tensor, codes: torch.Tensor, scales: torch.Tensor, tensor_scale: torch.Tensor,
                    fmt: str) -> None:
    """Decode codes/scale bytes (N, .) into ``out`` (N, K), any row stride, on the current stream."""
    k4 = kernels_module()
    n, k = out.shape
    block = BLOCK_SIZES[fmt]
    nblocks = scales.shape[1]
    rows, nbk, warps = _quantize_tile(fmt)
    if is_interpreter():
        rows, nbk, warps = 2, 2, 1
    grid = (triton_cdiv(n, rows), triton_cdiv(nblocks, nbk))
    k4.fp4_dequantize_kernel[grid](
        codes, scales, tensor_scale, out,
        n, k, nblocks, codes.stride(0), scales.stride(0), out.stride(0),
        IS_NV=fmt == "nvfp4", BLOCK=block, ROWS=rows, NBK=nbk, num_warps=warps,
    )


@_dequantize_op.register_fake
def _(codes, scales, tensor_scale, fmt_id, k, dtype):
    return codes.new_empty((codes.shape[0], k), dtype=dtype)


_ZERO_TS: dict[tuple, torch.Tensor] = {}


def _zero_ts(device: torch.device) -> torch.Tensor:
    """A 0-dim float32 zero on ``device`` (mxfp4's unused tensor-scale operand), made once per device
    outside CUDA-graph capture (R4: a new one per call was an extra fill kernel and ~5 us of host
    time on every mxfp4 linear); inside a capture a fresh one (the graph's pool owns it)."""
    key = (device.type, device.index)
    ts = _ZERO_TS.get(key)
    if ts is None:
        ts = torch.zeros((), dtype=torch.float32, device=device)
        if device.type != "cuda" or not torch.cuda.is_current_stream_capturing():
            _ZERO_TS[key] = ts
    return ts


def qw_operands(qw: QuantizedWeight) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
    """The kernel operands of a QuantizedWeight: (codes, scale bytes as uint8, tensor scale, format id)."""
    if not isinstance(qw, QuantizedWeight):
        raise QuantizationError(f"expected a vbhal.formats.QuantizedWeight, got {type(qw).__name__}")
    ts = qw.tensor_scale
    if ts is None:
        ts = _zero_ts(qw.codes.device)
    codes = qw.codes if qw.codes.is_contiguous() else qw.codes.contiguous()
    scales = qw.scales.view(torch.uint8)
    if not scales.is_contiguous():
        scales = scales.contiguous()
    return codes, scales, ts, _FMT_IDS[qw.fmt]


def dequantize_fp4(qw: QuantizedWeight, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The (N, K) weight in ``dtype``; bit-exact with ``qw.dequantize(dtype)``."""
    if dtype not in _OUT_DTYPES:
        raise QuantizationError(f"dequantize_fp4 produces float32/bfloat16/float16, not {dtype}")
    codes, scales, ts, fmt_id = qw_operands(qw)
    _check_device(codes, "the quantized weight")
    return torch.ops.vbhal.dequantize_fp4_cuda(codes, scales, ts, fmt_id, qw.shape[1], dtype)
