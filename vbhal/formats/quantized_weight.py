"""QuantizedWeight (packed FP4 codes + scales + header) and ``quantize``, the FP4 reference quantizer.

Layout (docs/CONTRACT.md, "FP4 data layout"): for a logical (N, K) weight and block size B
(32 for mxfp4, 16 for nvfp4), Kp = K rounded up to a multiple of B:
- ``codes``: uint8 (N, Kp // 2), two E2M1 codes per byte, element 2i in the low nibble;
- ``scales``: (N, Kp // B), ``float8_e8m0fnu`` (mxfp4) or ``float8_e4m3fn`` (nvfp4);
- ``tensor_scale``: 0-dim float32 (nvfp4) or None (mxfp4).
K that is not a multiple of B is padded with zeros up to Kp before quantizing: zeros do not change a
block's max, encode to code 0, and are cut off again by ``dequantize``; so padding never changes a
result, it only costs the padded bytes.
"""

from __future__ import annotations

from typing import Any

import torch

from ..errors import QuantizationError
from .mx import MX_BLOCK_SIZE, RCEIL_DECODE_OVERFLOW, SCALE_RULES, mxfp4_dequantize, mxfp4_quantize_padded
from .nvfp4 import NVFP4_BLOCK_SIZE, nvfp4_dequantize, nvfp4_quantize_padded, nvfp4_tensor_scale_from_amax

__all__ = ["BLOCK_SIZES", "FORMATS", "SCALE_DTYPES", "QuantizedWeight", "padded_k", "quantize"]

#: Supported FP4 formats.
FORMATS = ("mxfp4", "nvfp4")
#: Elements per scale: OCP MX v1.0 section 5 (k = 32) and NVFP4 (16).
BLOCK_SIZES = {"mxfp4": MX_BLOCK_SIZE, "nvfp4": NVFP4_BLOCK_SIZE}
#: Storage dtype of the block scales: E8M0 (OCP MX v1.0 scale data type) and E4M3.
SCALE_DTYPES = {"mxfp4": torch.float8_e8m0fnu, "nvfp4": torch.float8_e4m3fn}

_HEADER_VERSION = 1
_INPUT_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


def padded_k(k: int, fmt: str) -> int:
    """K rounded up to the block size of ``fmt``."""
    b = BLOCK_SIZES[_check_fmt(fmt)]
    return -(-k // b) * b


def _chunk_rows(device: torch.device, row_elems: int) -> int:
    """Rows per chunk for the multi-pass codecs: on CPU ~256K elements (1 MiB of float32, so the dozen
    elementwise passes run in cache: ~4x faster on an 8192x8192 weight); elsewhere ~64M elements
    (few kernel launches, bounded temporaries)."""
    target = (1 << 18) if device.type == "cpu" else (1 << 26)
    return max(1, target // row_elems)


def _check_fmt(fmt: str) -> str:
    if fmt not in FORMATS:
        raise QuantizationError(f"unknown FP4 format {fmt!r}; use one of {FORMATS}")
    return fmt


def _where(name: str | None) -> str:
    return f" of layer {name!r}" if name else ""


def _validate_weight(w: Any, name: str | None) -> None:
    if not isinstance(w, torch.Tensor):
        raise QuantizationError(f"the weight{_where(name)} must be a torch.Tensor, got {type(w).__name__}")
    if w.is_meta:
        raise QuantizationError(
            f"the weight{_where(name)} is on the meta device (no data to quantize); materialize it first, "
            "e.g. model.to_empty(device=...) and load its weights, then quantize"
        )
    if w.dtype not in _INPUT_DTYPES:
        raise QuantizationError(
            f"the weight{_where(name)} has dtype {w.dtype}; FP4 quantization takes a floating weight "
            f"({', '.join(str(d) for d in _INPUT_DTYPES)}). Dequantize or cast it first"
        )
    if w.dim() != 2:
        raise QuantizationError(
            f"the weight{_where(name)} has shape {tuple(w.shape)}; FP4 quantization takes a 2-D (out, in) "
            "matrix, blocks running along the last dimension. Reshape it to 2-D first"
        )
    if w.numel() == 0:
        raise QuantizationError(f"the weight{_where(name)} has shape {tuple(w.shape)}: nothing to quantize")
    if not bool(torch.isfinite(w).all()):
        n_nan = int(torch.isnan(w).sum())
        n_inf = int(torch.isinf(w).sum())
        raise QuantizationError(
            f"the weight{_where(name)} contains {n_nan} NaN and {n_inf} Inf values; FP4 has no NaN/Inf "
            "codes and a block scale computed from them would be meaningless. Fix or exclude this layer"
        )


class QuantizedWeight:
    """An FP4 weight: packed E2M1 codes, block scales, the NVFP4 tensor scale and a header.

    A plain object, not a tensor subclass: kernels take its tensors directly, and it is stored as
    buffers inside :class:`vbhal.nn.FP4Linear`. Build one with :func:`quantize`.

    >>> qw = quantize(torch.randn(64, 96), "mxfp4")
    >>> qw.codes.shape, qw.scales.shape, qw.dequantize().shape
    (torch.Size([64, 48]), torch.Size([64, 3]), torch.Size([64, 96]))
    """

    __slots__ = ("codes", "fmt", "orig_dtype", "scale_rule", "scales", "shape", "tensor_scale")

    def __init__(
        self,
        codes: torch.Tensor,
        scales: torch.Tensor,
        tensor_scale: torch.Tensor | None,
        fmt: str,
        shape: tuple[int, int],
        orig_dtype: torch.dtype = torch.float32,
        scale_rule: str = "floor",
    ) -> None:
        self.codes = codes
        self.scales = scales
        self.tensor_scale = tensor_scale
        self.fmt = fmt
        self.shape = (int(shape[0]), int(shape[1]))
        self.orig_dtype = orig_dtype
        self.scale_rule = scale_rule
        self.validate()

    # -- structure -------------------------------------------------------------------------------
    @property
    def block_size(self) -> int:
        return BLOCK_SIZES[self.fmt]

    @property
    def padded_k(self) -> int:
        return padded_k(self.shape[1], self.fmt)

    @property
    def device(self) -> torch.device:
        return self.codes.device

    @property
    def nbytes(self) -> int:
        """Bytes of the payload: codes + scales (+ the 4-byte tensor scale for nvfp4)."""
        n = self.codes.numel() * self.codes.element_size() + self.scales.numel() * self.scales.element_size()
        if self.tensor_scale is not None:
            n += self.tensor_scale.numel() * self.tensor_scale.element_size()
        return n

    def validate(self) -> None:
        """Check that every tensor matches the header; raise QuantizationError saying what differs."""
        fmt = self.fmt
        if fmt not in FORMATS:
            raise QuantizationError(f"QuantizedWeight has unknown format {fmt!r}; expected one of {FORMATS}")
        n, k = self.shape
        if n <= 0 or k <= 0:
            raise QuantizationError(f"QuantizedWeight has logical shape {self.shape}; both sizes must be positive")
        kp = padded_k(k, fmt)
        exp = {
            "codes": (torch.uint8, (n, kp // 2)),
            "scales": (SCALE_DTYPES[fmt], (n, kp // BLOCK_SIZES[fmt])),
        }
        for key, (dtype, shape) in exp.items():
            t = getattr(self, key)
            if not isinstance(t, torch.Tensor):
                raise QuantizationError(f"QuantizedWeight.{key} must be a tensor, got {type(t).__name__}")
            if t.dtype != dtype or tuple(t.shape) != shape:
                raise QuantizationError(
                    f"QuantizedWeight.{key} is {t.dtype} {tuple(t.shape)} but its header ({fmt}, shape {self.shape}) "
                    f"requires {dtype} {shape}; the payload does not belong to this header (re-quantize the weight)"
                )
        if not (self.codes.is_contiguous() and self.scales.is_contiguous()):
            raise QuantizationError(
                "QuantizedWeight.codes and .scales must be contiguous (kernels read them row-major); "
                "pass t.contiguous()"
            )
        if self.scales.device != self.codes.device:
            raise QuantizationError(
                f"QuantizedWeight.codes is on {self.codes.device} but scales on {self.scales.device}; move it "
                "with .to(device)"
            )
        ts = self.tensor_scale
        if fmt == "nvfp4":
            if not isinstance(ts, torch.Tensor) or ts.dtype != torch.float32 or ts.dim() != 0:
                got = "None" if ts is None else f"{getattr(ts, 'dtype', type(ts))} {tuple(getattr(ts, 'shape', ()))}"
                raise QuantizationError(f"nvfp4 QuantizedWeight needs a 0-dim float32 tensor_scale, got {got}")
            if ts.device != self.codes.device:
                raise QuantizationError(
                    f"QuantizedWeight.tensor_scale is on {ts.device} but codes on {self.codes.device}"
                )
        elif ts is not None:
            raise QuantizationError("mxfp4 QuantizedWeight has no tensor_scale; pass None")
        if self.scale_rule not in SCALE_RULES:
            raise QuantizationError(f"unknown scale rule {self.scale_rule!r}; use one of {SCALE_RULES}")

    # -- use -------------------------------------------------------------------------------------
    def dequantize(self, dtype: torch.dtype = torch.float32, *, out: torch.Tensor | None = None) -> torch.Tensor:
        """The (N, K) weight in ``dtype``: decoded in float32 (exact products), then cast.

        ``out``: an (N, K) tensor to write into (its dtype wins over ``dtype``); every element is written.
        """
        n, k = self.shape
        if out is None:
            out = torch.empty((n, k), dtype=dtype, device=self.device)
        elif tuple(out.shape) != (n, k) or out.device != self.device:
            raise QuantizationError(
                f"dequantize out= must be ({n}, {k}) on {self.device}, got {tuple(out.shape)} on {out.device}"
            )
        rows = _chunk_rows(self.device, self.padded_k)
        for r0 in range(0, n, rows):
            c, s = self.codes[r0 : r0 + rows], self.scales[r0 : r0 + rows]
            if self.fmt == "mxfp4":
                full = mxfp4_dequantize(c, s, torch.float32)
            else:
                full = nvfp4_dequantize(c, s, self.tensor_scale, torch.float32)
            out[r0 : r0 + rows] = full[:, :k]
        return out

    def to(self, device: torch.device | str, non_blocking: bool = False) -> QuantizedWeight:
        """A copy on ``device`` (self if already there). Dtypes never change: the bytes are the format."""
        if isinstance(device, torch.dtype):
            raise QuantizationError(
                f"QuantizedWeight.to() moves between devices only; its dtypes are the format. For a {device} "
                "weight use .dequantize(dtype)"
            )
        dev = torch.device(device)
        ts = self.tensor_scale
        return QuantizedWeight(
            self.codes.to(dev, non_blocking=non_blocking),
            self.scales.to(dev, non_blocking=non_blocking),
            None if ts is None else ts.to(dev, non_blocking=non_blocking),
            self.fmt,
            self.shape,
            self.orig_dtype,
            self.scale_rule,
        )

    # -- persistence -----------------------------------------------------------------------------
    def header(self) -> dict[str, Any]:
        """The metadata that gives the bytes their meaning (plain str/int/list, safe for weights_only)."""
        return {
            "version": _HEADER_VERSION,
            "fmt": self.fmt,
            "shape": [self.shape[0], self.shape[1]],
            "orig_dtype": str(self.orig_dtype).removeprefix("torch."),
            "block_size": self.block_size,
            "scale_rule": self.scale_rule,
        }

    def state_dict(self) -> dict[str, Any]:
        """``{"codes", "scales", ["tensor_scale"], "header"}``; round-trips through torch.save/load."""
        sd: dict[str, Any] = {"codes": self.codes, "scales": self.scales, "header": self.header()}
        if self.tensor_scale is not None:
            sd["tensor_scale"] = self.tensor_scale
        return sd

    @classmethod
    def from_state_dict(cls, sd: dict[str, Any]) -> QuantizedWeight:
        """Rebuild from :meth:`state_dict`; any mismatch between bytes and header raises QuantizationError."""
        if not isinstance(sd, dict) or "header" not in sd or "codes" not in sd or "scales" not in sd:
            keys = sorted(sd) if isinstance(sd, dict) else type(sd).__name__
            raise QuantizationError(
                f"not a QuantizedWeight state dict (need 'codes', 'scales', 'header'; got {keys})"
            )
        h = cls.parse_header(sd["header"])
        extra = set(sd) - {"codes", "scales", "tensor_scale", "header"}
        if extra:
            raise QuantizationError(f"unexpected keys in a QuantizedWeight state dict: {sorted(extra)}")
        return cls(sd["codes"], sd["scales"], sd.get("tensor_scale"), h["fmt"], tuple(h["shape"]),
                   h["orig_dtype"], h["scale_rule"])

    @staticmethod
    def parse_header(h: Any) -> dict[str, Any]:
        """Check a header dict and return it with ``orig_dtype`` as a torch.dtype."""
        if not isinstance(h, dict):
            raise QuantizationError(f"QuantizedWeight header must be a dict, got {type(h).__name__}")
        if h.get("version") != _HEADER_VERSION:
            raise QuantizationError(
                f"QuantizedWeight header version {h.get('version')!r} is not supported (this vbhal reads "
                f"{_HEADER_VERSION}); re-quantize the weight with this version"
            )
        fmt = h.get("fmt")
        if fmt not in FORMATS:
            raise QuantizationError(f"QuantizedWeight header has unknown format {fmt!r}")
        if h.get("block_size") != BLOCK_SIZES[fmt]:
            raise QuantizationError(
                f"QuantizedWeight header says block size {h.get('block_size')!r} but {fmt} uses {BLOCK_SIZES[fmt]}"
            )
        shape = h.get("shape")
        if not (isinstance(shape, (list, tuple)) and len(shape) == 2 and all(isinstance(s, int) for s in shape)):
            raise QuantizationError(f"QuantizedWeight header has a bad shape {shape!r}; expected [N, K]")
        dt = getattr(torch, str(h.get("orig_dtype")), None)
        if not isinstance(dt, torch.dtype):
            raise QuantizationError(f"QuantizedWeight header has an unknown orig_dtype {h.get('orig_dtype')!r}")
        return {**h, "orig_dtype": dt, "shape": (shape[0], shape[1])}

    def __repr__(self) -> str:
        return (f"QuantizedWeight(fmt={self.fmt}, shape={self.shape}, orig_dtype={self.orig_dtype}, "
                f"scale_rule={self.scale_rule}, device={self.device}, nbytes={self.nbytes})")


def check_quantize_args(fmt: str, scale_rule: str, tensor_scale: torch.Tensor | None) -> None:
    """Refuse a format / scale rule / tensor scale combination that no FP4 format defines (every quantizer)."""
    _check_fmt(fmt)
    if scale_rule not in SCALE_RULES:
        raise QuantizationError(f"unknown scale rule {scale_rule!r}; use one of {SCALE_RULES}")
    if fmt == "nvfp4" and scale_rule != "floor":
        raise QuantizationError("nvfp4 has a single block-scale rule; scale_rule applies to mxfp4 only")
    if fmt == "mxfp4" and tensor_scale is not None:
        raise QuantizationError("mxfp4 has no tensor scale; tensor_scale applies to nvfp4 only")


def quantize(
    w: torch.Tensor,
    fmt: str = "mxfp4",
    *,
    scale_rule: str = "floor",
    name: str | None = None,
    tensor_scale: torch.Tensor | None = None,
) -> QuantizedWeight:
    """Quantize a 2-D float weight (N, K) to FP4; the reference every ``quantize_fp4`` kernel matches.

    Args:
        w: float32/bfloat16/float16 (float64 is rounded to float32 first) weight, finite, on any device.
        fmt: ``"mxfp4"`` (OCP MX v1.0, 32-blocks, E8M0 scales) or ``"nvfp4"`` (16-blocks, E4M3 scales,
            FP32 tensor scale).
        scale_rule: mxfp4 only: ``"floor"`` (OCP MX v1.0 section 6.3, the default) or ``"rceil"``
            (cuBLAS/Blackwell round-up; no element saturates). nvfp4 has one rule.
        name: the layer's name, used in error messages.
        tensor_scale: nvfp4 only: a calibrated per-tensor scale to use instead of amax / (448 * 6).

    K is padded with zeros to the block size (see the module docstring); the work is a handful of
    vectorised passes, done in row chunks to bound the float32 temporaries.

    >>> w = torch.tensor([[0.3, -1.2, 5.0, 0.0] * 8])       # one 32-block, max 5.0 -> X = 2^(2-2) = 1
    >>> quantize(w, "mxfp4").dequantize()[0, :4].tolist()   # 0.3 -> 0.5, -1.2 -> -1, 5 -> 4 (tie to even)
    [0.5, -1.0, 4.0, 0.0]
    """
    check_quantize_args(fmt, scale_rule, tensor_scale)
    _validate_weight(w, name)
    orig_dtype = w.dtype
    w = w.detach()
    # Max |w| in float32: exact for float32/bf16/fp16, and rounding is monotone, so for float64 it is
    # the max of the rounded values. Used for the overflow checks and the NVFP4 tensor scale.
    amax32 = w.abs().amax().to(torch.float32)
    if orig_dtype == torch.float64 and not bool(torch.isfinite(amax32)):
        raise QuantizationError(f"the float64 weight{_where(name)} overflows float32; scale it down first")
    if fmt == "mxfp4" and scale_rule == "rceil" and float(amax32) >= RCEIL_DECODE_OVERFLOW:
        raise QuantizationError(
            f"the weight{_where(name)} has values >= {RCEIL_DECODE_OVERFLOW:.4g}, which MXFP4 with the RCEIL "
            "scale rule rounds beyond float32's range (2^128); use scale_rule='floor' or scale the weight down"
        )
    n, k = w.shape
    kp = padded_k(k, fmt)
    if fmt == "nvfp4" and tensor_scale is None:
        # NVFP4's tensor scale depends on the whole tensor: computed before chunking.
        tensor_scale = nvfp4_tensor_scale_from_amax(amax32)
    codes_parts, scale_parts = [], []
    rows = _chunk_rows(w.device, kp)
    ts_out = None
    # Chunks are cast (and zero-padded along K) one at a time: no full-size float32 copy of the weight.
    for r0 in range(0, n, rows):
        chunk = w[r0 : r0 + rows].to(torch.float32)
        if kp != k:
            chunk = torch.nn.functional.pad(chunk, (0, kp - k))
        if fmt == "mxfp4":
            c, s = mxfp4_quantize_padded(chunk, scale_rule)
        else:
            c, s, ts_out = nvfp4_quantize_padded(chunk, tensor_scale)
        codes_parts.append(c)
        scale_parts.append(s)
    codes = codes_parts[0] if len(codes_parts) == 1 else torch.cat(codes_parts)
    scales = scale_parts[0] if len(scale_parts) == 1 else torch.cat(scale_parts)
    return QuantizedWeight(codes.contiguous(), scales.contiguous(), ts_out, fmt, (n, k), orig_dtype, scale_rule)
