"""FP4Linear: a drop-in ``nn.Linear`` whose weight is stored in FP4 (MXFP4 / NVFP4), and ``swap_linears``.

The weight is frozen: a :class:`~vbhal.formats.QuantizedWeight` kept as buffers (``codes``, ``scales``,
``tensor_scale`` for nvfp4) plus a header in the module's extra state, so ``.to()``, ``state_dict()``
and strict ``load_state_dict()`` work and a payload that does not match its header is refused. The
bias, if any, stays a trainable ``Parameter``; gradients flow to the input and the bias, so adapters
(LoRA) train on top of an FP4 base.

The forward runs the kernel bound when the module was built (``fp4_linear`` from the HAL; by default
the reference :func:`vbhal.formats.reference.fp4_linear_reference`, which the CPU backend serves)
through the custom op ``vbhal::fp4_linear`` (``torch.library``: a fake implementation for
``torch.compile`` and an autograd formula), so compile sees one opaque op, not the kernel's insides.
In eager mode a kernel that offers ``from_operands`` (the CUDA one) is called on the buffers directly,
through an ``autograd.Function`` with the same backward only when a gradient is wanted: a Python
custom op and a QuantizedWeight per call would cost more host time than a small-batch kernel runs.
The backward is the exact gradient of the reference: dL/dx = dL/dy @ W in float32 (W from the bound
``dequantize_fp4``, else the reference decoder), cast to x's dtype; dL/db = sum of dL/dy in float32.

>>> lin = torch.nn.Linear(64, 32)
>>> q = FP4Linear.from_linear(lin, fmt="mxfp4", name="mlp.up")
>>> q(torch.randn(4, 64)).shape, round(q.quant_error, 2) < 0.2
(torch.Size([4, 32]), True)
"""

from __future__ import annotations

import fnmatch
import warnings
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch
from torch import Tensor, nn

from vbhal.errors import KernelError, QuantizationError
from vbhal.formats import BLOCK_SIZES, FORMATS, SCALE_DTYPES, QuantizedWeight, padded_k, quantize
from vbhal.formats.quantized_weight import _validate_weight
from vbhal.formats.reference import ACTIVATION_DTYPES, autocast_enabled, fp4_linear_reference

__all__ = ["DEFAULT_KEEP_NAMES", "ROUTER_MAX_OUT_FEATURES", "FP4Linear", "register_kernels", "swap_linears"]

#: Output heads kept in high precision by :func:`swap_linears`: a Linear inside a module with one of these
#: names (``lm_head``, ``classifier.dense``), or whose own name is ``output`` (Meta's LLaMA head; BERT's
#: ``layer.N.output.dense`` is an FFN projection and is quantized). Any name component containing
#: ``embed`` is kept as well. Quantizing these is where FP4 has collapsed model quality.
DEFAULT_KEEP_NAMES = ("lm_head", "head", "classifier")
#: A Linear named ``router``/``gate`` (or ending in ``_router``/``_gate``) with at most this many outputs
#: is an MoE router or gate: kept in high precision (routing is discrete; a small error flips experts).
ROUTER_MAX_OUT_FEATURES = 512


# ------------------------------------------------------------------------------------------------
# Kernel registry: a custom op cannot take a Python callable, so it takes the kernel's key instead.
# ------------------------------------------------------------------------------------------------
_REGISTRY: dict[str, tuple[Callable, Callable]] = {}
REFERENCE_KEY = "vbhal.reference"


def _unwrap(k: Any) -> Callable | None:
    return None if k is None else getattr(k, "fn", k)


def register_kernels(fp4_linear: Any, dequantize_fp4: Any = None) -> str:
    """Register an ``fp4_linear`` kernel (and the ``dequantize_fp4`` its backward uses; the reference
    decoder when None) for the ``vbhal::fp4_linear`` op; returns the key the module stores.

    Accepts plain callables or ``vbhal.hookspecs.Kernel`` objects. Registering the same pair twice
    returns the same key.
    """
    lin, deq = _unwrap(fp4_linear), _unwrap(dequantize_fp4)
    if deq is None:
        deq = _reference_dequantize
    if not callable(lin) or not callable(deq):
        raise KernelError(f"fp4_linear/dequantize_fp4 kernels must be callables, got {fp4_linear!r}, {dequantize_fp4!r}")
    for key, pair in _REGISTRY.items():
        if pair[0] is lin and pair[1] is deq:
            return key
    base = f"{getattr(lin, '__module__', '?')}.{getattr(lin, '__qualname__', type(lin).__name__)}"
    key, i = base, 1
    while key in _REGISTRY:
        i += 1
        key = f"{base}#{i}"
    _REGISTRY[key] = (lin, deq)
    return key


def _takes_name(fn: Callable) -> bool:
    import inspect

    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):
        return False
    return any(p.name == "name" or p.kind is p.VAR_KEYWORD for p in params)


def _reference_dequantize(qw: QuantizedWeight, dtype: torch.dtype = torch.float32) -> Tensor:
    return qw.dequantize(dtype)


def _reference_linear(x: Tensor, qw: QuantizedWeight, bias: Tensor | None = None) -> Tensor:
    return fp4_linear_reference(x, qw, bias)


_REGISTRY[REFERENCE_KEY] = (_reference_linear, _reference_dequantize)


def _kernels(key: str) -> tuple[Callable, Callable]:
    try:
        return _REGISTRY[key]
    except KeyError:
        raise KernelError(
            f"no FP4 kernel registered under {key!r} in this process (a module built elsewhere was loaded?); "
            "rebuild the module with FP4Linear.from_linear(..., kernels=...) or call module.bind_kernels(...)"
        ) from None


def _qw(codes: Tensor, scales: Tensor, tensor_scale: Tensor | None, fmt: str, in_features: int) -> QuantizedWeight:
    return QuantizedWeight(codes, scales, tensor_scale, fmt, (codes.shape[0], in_features))


@torch.library.custom_op("vbhal::fp4_linear", mutates_args=())
def _fp4_linear_op(
    x: Tensor,
    codes: Tensor,
    scales: Tensor,
    tensor_scale: Tensor | None,
    bias: Tensor | None,
    fmt: str,
    in_features: int,
    kernel: str,
) -> Tensor:
    lin, _ = _kernels(kernel)
    y = lin(x, _qw(codes, scales, tensor_scale, fmt, in_features), bias)
    # A custom op's output must not alias its inputs.
    return y if y.data_ptr() != x.data_ptr() else y.clone()


@_fp4_linear_op.register_fake
def _(x, codes, scales, tensor_scale, bias, fmt, in_features, kernel):
    return x.new_empty((*x.shape[:-1], codes.shape[0]))


@torch.library.custom_op("vbhal::fp4_linear_grad_input", mutates_args=())
def _fp4_linear_grad_input_op(
    grad: Tensor,
    codes: Tensor,
    scales: Tensor,
    tensor_scale: Tensor | None,
    fmt: str,
    in_features: int,
    kernel: str,
) -> Tensor:
    """dL/dx = dL/dy @ W, W dequantized in float32 (the transpose of the forward's reference)."""
    _, deq = _kernels(kernel)
    w32 = deq(_qw(codes, scales, tensor_scale, fmt, in_features), torch.float32)
    dev = grad.device.type
    if autocast_enabled(dev):
        with torch.autocast(dev, enabled=False):
            return torch.matmul(grad.to(torch.float32), w32).to(grad.dtype)
    return torch.matmul(grad.to(torch.float32), w32).to(grad.dtype)


@_fp4_linear_grad_input_op.register_fake
def _(grad, codes, scales, tensor_scale, fmt, in_features, kernel):
    return grad.new_empty((*grad.shape[:-1], in_features))


def _setup_context(ctx, inputs, output):
    _x, codes, scales, tensor_scale, bias, fmt, in_features, kernel = inputs
    ctx.save_for_backward(codes, scales, tensor_scale)
    ctx.meta = (fmt, in_features, kernel, None if bias is None else bias.dtype)


def _backward(ctx, grad):
    codes, scales, tensor_scale = ctx.saved_tensors
    fmt, in_features, kernel, bias_dtype = ctx.meta
    gx = gb = None
    if ctx.needs_input_grad[0]:
        gx = torch.ops.vbhal.fp4_linear_grad_input(grad, codes, scales, tensor_scale, fmt, in_features, kernel)
    if bias_dtype is not None and ctx.needs_input_grad[4]:
        gb = grad.to(torch.float32).reshape(-1, grad.shape[-1]).sum(0).to(bias_dtype)
    return gx, None, None, None, gb, None, None, None


_fp4_linear_op.register_autograd(_backward, setup_context=_setup_context)


class _FP4LinearFunction(torch.autograd.Function):
    """The op's forward and backward for eager calls to a kernel with a ``from_operands`` entry: the
    kernel is called on the module's buffers directly (no custom-op dispatch, no QuantizedWeight
    built per call), the backward is the op's own."""

    @staticmethod
    def forward(ctx, x, codes, scales, tensor_scale, bias, fmt, in_features, kernel, fast):
        ctx.save_for_backward(codes, scales, tensor_scale)
        ctx.meta = (fmt, in_features, kernel, None if bias is None else bias.dtype)
        return fast(x, codes, scales, tensor_scale, bias, fmt, in_features)

    @staticmethod
    def backward(ctx, grad):
        return (*_backward(ctx, grad), None)


def _tracing() -> bool:
    """torch.compile/export or an active dispatch mode (FakeTensor, make_fx): the custom op is needed."""
    return torch.compiler.is_compiling() or torch._C._len_torch_dispatch_stack() > 0


# ------------------------------------------------------------------------------------------------
# The module
# ------------------------------------------------------------------------------------------------
_KERNEL_NAMES = ("quantize_fp4", "fp4_linear", "dequantize_fp4")


def _device_kernels(device: torch.device) -> Mapping[str, Any] | None:
    """The HAL's FP4 kernels for an accelerator ``device`` when the caller bound none; None on CPU.

    An FP4Linear built directly on a GPU (``FP4Linear.from_linear(cuda_linear)``) would otherwise run the CPU
    reference there: right, but a gather-based dequantize plus a matmul, ~30x slower than the fused kernel
    (measured 838 us vs 27.5 us per call at 8192x8192 on an H100). ``optimize`` binds the same kernels.
    """
    if device.type in ("cpu", "meta"):
        return None
    from vbhal import hal

    try:
        return {name: hal.get_kernel(name, str(device)) for name in _KERNEL_NAMES}
    except Exception as e:  # noqa: BLE001 - no backend for this device: the reference still computes it
        warnings.warn(f"FP4Linear on {device}: no FP4 kernels from the HAL ({type(e).__name__}: {e}); using the "
                      "CPU reference implementation there (same numbers, much slower)", stacklevel=3)
        return None


class FP4Linear(nn.Module):
    """``nn.Linear`` with a frozen FP4 weight (see the module docstring). Build with :meth:`from_linear`.

    Attributes: ``in_features``, ``out_features``, ``fmt``, ``scale_rule``, ``orig_dtype`` (the dtype the
    weight had), ``quant_error`` (relative Frobenius error ||W - deq(Q(W))|| / ||W|| measured when
    quantized; None for a module built empty), ``kernel_key`` (the bound kernel).
    """

    _QBUFFERS = ("codes", "scales", "tensor_scale")

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        *,
        fmt: str = "mxfp4",
        scale_rule: str = "floor",
        orig_dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        kernels: Mapping[str, Any] | None = None,
        name: str | None = None,
    ) -> None:
        """An empty FP4Linear (all-zero codes) to load a state dict into; :meth:`from_linear` quantizes."""
        super().__init__()
        if fmt not in FORMATS:
            raise QuantizationError(f"unknown FP4 format {fmt!r}; use one of {FORMATS}")
        if in_features <= 0 or out_features <= 0:
            raise QuantizationError(f"FP4Linear needs positive sizes, got ({out_features}, {in_features})")
        self.in_features, self.out_features = int(in_features), int(out_features)
        self.fmt, self.scale_rule, self.orig_dtype, self.name = fmt, scale_rule, orig_dtype, name
        self.quant_error: float | None = None
        kp = padded_k(in_features, fmt)
        self.register_buffer("codes", torch.zeros(out_features, kp // 2, dtype=torch.uint8, device=device))
        self.register_buffer(
            "scales",
            torch.zeros(out_features, kp // BLOCK_SIZES[fmt], dtype=torch.uint8, device=device).view(SCALE_DTYPES[fmt]),
        )
        ts = torch.ones((), dtype=torch.float32, device=device) if fmt == "nvfp4" else None
        self.register_buffer("tensor_scale", ts)
        if bias:
            self.bias = nn.Parameter(torch.zeros(out_features, device=device, dtype=dtype or torch.float32))
        else:
            self.register_parameter("bias", None)
        self.bind_kernels(kernels)

    # -- construction ----------------------------------------------------------------------------
    @classmethod
    def from_linear(
        cls,
        linear: nn.Linear,
        fmt: str = "mxfp4",
        *,
        name: str | None = None,
        kernels: Mapping[str, Any] | None = None,
        scale_rule: str = "floor",
    ) -> FP4Linear:
        """Quantize ``linear.weight`` (with ``kernels["quantize_fp4"]`` if given, else the reference)
        and return an FP4Linear on the same device; the bias is copied as a trainable Parameter.

        ``kernels`` maps kernel names (``quantize_fp4``, ``fp4_linear``, ``dequantize_fp4``) to callables
        or ``vbhal.hookspecs.Kernel`` objects; missing ones use the CPU reference. ``kernels=None`` (the
        default) quantizes with and binds the HAL's kernels for the weight's device (see :meth:`bind_kernels`).
        """
        if not isinstance(linear, nn.Linear):
            raise QuantizationError(f"FP4Linear.from_linear takes an nn.Linear, got {type(linear).__name__}")
        w = linear.weight
        chosen = kernels if kernels is not None else _device_kernels(w.device)
        qfn = _unwrap((chosen or {}).get("quantize_fp4"))
        if qfn is None:
            qw = quantize(w, fmt, scale_rule=scale_rule, name=name)
        elif _takes_name(qfn):
            qw = qfn(w, fmt, scale_rule=scale_rule, name=name)
        else:
            _validate_weight(w, name)  # so a NaN/Inf error names the layer whatever the kernel checks
            qw = qfn(w, fmt, scale_rule=scale_rule)
        if not isinstance(qw, QuantizedWeight):
            raise KernelError(f"quantize_fp4 kernel returned {type(qw).__name__}, not a QuantizedWeight")
        mod = cls.from_quantized(qw, linear.bias, kernels=kernels, name=name)
        mod.quant_error = relative_error(w, qw)
        return mod

    @classmethod
    def from_quantized(
        cls,
        qw: QuantizedWeight,
        bias: Tensor | None = None,
        *,
        kernels: Mapping[str, Any] | None = None,
        name: str | None = None,
    ) -> FP4Linear:
        """Wrap an existing QuantizedWeight (and optional bias, copied) in an FP4Linear."""
        qw.validate()
        n, k = qw.shape
        mod = cls.__new__(cls)
        nn.Module.__init__(mod)
        mod.in_features, mod.out_features = k, n
        mod.fmt, mod.scale_rule, mod.orig_dtype, mod.name = qw.fmt, qw.scale_rule, qw.orig_dtype, name
        mod.quant_error = None
        mod.register_buffer("codes", qw.codes)
        mod.register_buffer("scales", qw.scales)
        mod.register_buffer("tensor_scale", qw.tensor_scale)
        if bias is not None:
            mod.bias = nn.Parameter(bias.detach().clone().to(qw.device), requires_grad=True)
        else:
            mod.register_parameter("bias", None)
        mod.bind_kernels(kernels)
        return mod

    def bind_kernels(self, kernels: Mapping[str, Any] | None) -> None:
        """Bind ``fp4_linear`` / ``dequantize_fp4`` kernels (missing ones: the CPU reference).

        ``None`` binds the HAL's kernels for the device the weight is on (on CPU: the reference) and keeps
        following it: ``module.to(device)`` / ``.cuda()`` bind again for the new device."""
        self._auto_kernels = kernels is None
        if kernels is None:
            kernels = _device_kernels(self.codes.device)
        kernels = kernels or {}
        lin, deq = _unwrap(kernels.get("fp4_linear")), _unwrap(kernels.get("dequantize_fp4"))
        if lin is None and deq is None:
            self.kernel_key, self._bound = REFERENCE_KEY, None
        else:
            self._bound = (lin if lin is not None else _reference_linear, deq)
            self.kernel_key = register_kernels(*self._bound)
        # A kernel may offer ``from_operands(x, codes, scales, tensor_scale, bias, fmt, in_features)``
        # (the CUDA one does): eager calls then skip the custom op and the QuantizedWeight (host time).
        self._fast = getattr(lin, "from_operands", None)

    def _key(self) -> str:
        # A module unpickled in another process carries its kernels but not the registry entry.
        if self.kernel_key not in _REGISTRY and getattr(self, "_bound", None) is not None:
            self.kernel_key = register_kernels(*self._bound)
        return self.kernel_key

    # -- use -------------------------------------------------------------------------------------
    @property
    def qweight(self) -> QuantizedWeight:
        """The weight as a QuantizedWeight over this module's buffers (no copy)."""
        return QuantizedWeight(self.codes, self.scales, self.tensor_scale, self.fmt,
                               (self.out_features, self.in_features), self.orig_dtype, self.scale_rule)

    def dequantized_weight(self, dtype: torch.dtype = torch.float32) -> Tensor:
        """The (out, in) weight decoded to ``dtype`` (a fresh tensor; for inspection and export)."""
        return self.qweight.dequantize(dtype)

    def forward(self, x: Tensor) -> Tensor:
        if x.device != self.codes.device:
            raise KernelError(
                f"FP4Linear{self._where()} weight is on {self.codes.device} but the input is on {x.device}; "
                "move the module or the input so both are on one device"
            )
        if autocast_enabled(x.device.type) and x.is_floating_point():
            # As nn.Linear under autocast: compute in the autocast dtype.
            x = x.to(torch.get_autocast_dtype(x.device.type))
        if x.dtype not in ACTIVATION_DTYPES:
            raise KernelError(
                f"FP4Linear{self._where()} takes float32/bfloat16/float16 input, got {x.dtype}; cast the "
                "input or run under torch.autocast"
            )
        if x.dim() == 0 or x.shape[-1] != self.in_features:
            raise KernelError(
                f"FP4Linear{self._where()} expects input (..., {self.in_features}), got {tuple(x.shape)}"
            )
        fast = self.__dict__.get("_fast")
        if fast is not None and not _tracing():
            bias, bufs = self._parameters["bias"], self._buffers  # plain dict reads: no Module.__getattr__
            if torch.is_grad_enabled() and (x.requires_grad or (bias is not None and bias.requires_grad)):
                return _FP4LinearFunction.apply(x, bufs["codes"], bufs["scales"], bufs["tensor_scale"], bias,
                                                self.fmt, self.in_features, self._key(), fast)
            return fast(x, bufs["codes"], bufs["scales"], bufs["tensor_scale"], bias, self.fmt, self.in_features)
        return torch.ops.vbhal.fp4_linear(x, self.codes, self.scales, self.tensor_scale, self.bias,
                                          self.fmt, self.in_features, self._key())

    def _where(self) -> str:
        return f" {self.name!r}" if self.name else ""

    def extra_repr(self) -> str:
        err = "" if self.quant_error is None else f", quant_error={self.quant_error:.4f}"
        rule = f", scale_rule={self.scale_rule}" if self.fmt == "mxfp4" else ""
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"fmt={self.fmt}{rule}, kernel={self.kernel_key}{err}")

    # -- dtypes never change: the bytes ARE the format ---------------------------------------------
    def _apply(self, fn, recurse=True):
        before = self._buffers["codes"].device
        saved = {k: self._buffers.pop(k) for k in self._QBUFFERS if k in self._buffers}
        try:
            super()._apply(fn, recurse)
        finally:
            for k, t in saved.items():
                if t is not None:
                    moved = fn(t)
                    # module.to(dtype)/.half() would re-cast scales/tensor_scale: keep the dtype, move only.
                    t = moved if moved.dtype == t.dtype else t.to(moved.device)
                self._buffers[k] = t
        if self.__dict__.get("_auto_kernels") and self._buffers["codes"].device != before:
            self.bind_kernels(None)  # the kernels follow the weight to its new device
        return self

    # -- persistence: header in extra state, strict and checked ---------------------------------
    def get_extra_state(self) -> dict[str, Any]:
        return self.qweight.header()

    def set_extra_state(self, state: Any) -> None:
        h = QuantizedWeight.parse_header(state)
        mine = (self.fmt, (self.out_features, self.in_features))
        theirs = (h["fmt"], h["shape"])
        if mine != theirs:
            raise QuantizationError(
                f"FP4Linear{self._where()} is {mine[0]} {mine[1]} but the state dict holds {theirs[0]} {theirs[1]}; "
                "build the module with the same format and shape (FP4Linear(in, out, fmt=...)) before loading"
            )
        self.scale_rule, self.orig_dtype = h["scale_rule"], h["orig_dtype"]

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        # load_state_dict would copy_() a float tensor into the uint8/float8 buffers, silently casting;
        # a payload of the wrong dtype is a different format, never something to convert.
        for k in self._QBUFFERS:
            mine = self._buffers.get(k)
            theirs = state_dict.get(prefix + k)
            if mine is not None and isinstance(theirs, Tensor) and theirs.dtype != mine.dtype:
                raise QuantizationError(
                    f"state dict entry {prefix + k!r} is {theirs.dtype} but this {self.fmt} FP4Linear stores "
                    f"{mine.dtype}; the checkpoint does not hold this format"
                )
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)


def relative_error(w: Tensor, qw: QuantizedWeight) -> float:
    """||w - deq(qw)||_F / ||w||_F in float32 (0.0 for an all-zero w that decodes to zeros)."""
    with torch.no_grad():
        w32 = w.detach().to(torch.float32)
        num = torch.linalg.vector_norm(w32 - qw.dequantize(torch.float32))
        den = torch.linalg.vector_norm(w32)
        return float(num / den) if float(den) > 0 else float(num)


# ------------------------------------------------------------------------------------------------
# Swapping a model's Linears
# ------------------------------------------------------------------------------------------------
def _has_wildcard(p: str) -> bool:
    return any(c in p for c in "*?[")


def _keep_reason(name: str, mod: nn.Linear, tied: set[int]) -> str | None:
    parts = name.split(".")
    last = parts[-1]
    if any(p in DEFAULT_KEEP_NAMES for p in parts) or last == "output":
        return "output head kept in high precision"
    if any("embed" in p for p in parts):
        return "embedding kept in high precision"
    if id(mod.weight) in tied:
        return "weight tied to another module (e.g. the embedding) kept in high precision"
    is_router = last in ("router", "gate") or last.endswith(("_router", "_gate"))
    if is_router and mod.out_features <= ROUTER_MAX_OUT_FEATURES:
        return f"MoE router/gate ({mod.out_features} outputs) kept in high precision"
    return None


def swap_linears(
    model: nn.Module,
    *,
    fmt: str = "mxfp4",
    kernel_quantize: Any = None,
    kernel_linear: Any = None,
    include: Iterable[str] = (),
    exclude: Iterable[str] = (),
    report: Any = None,
    scale_rule: str = "floor",
    kernel_dequantize: Any = None,
) -> list[str]:
    """Replace ``nn.Linear`` modules of ``model`` in place by :class:`FP4Linear`; return the swapped names.

    Kept in high precision by default (each reported with its reason): output heads (a name component
    in :data:`DEFAULT_KEEP_NAMES`, or the module's own name ``output``), embeddings (a component
    containing ``embed``), linears whose weight is tied to another module, MoE routers/gates
    (``router``/``gate``/``*_gate`` with <= :data:`ROUTER_MAX_OUT_FEATURES` outputs), layers narrower
    than one block (in_features < 32 for mxfp4, 16 for nvfp4), and subclasses of nn.Linear (their
    forward may not be x @ W^T + b).
    ``include``/``exclude`` are fnmatch patterns on qualified names: with ``include``, only matching
    layers are swapped; ``exclude`` always wins; a layer named exactly (no wildcard) in ``include`` is
    swapped even if a default rule would keep it. Each swap is reported as
    ``report.add("fp4", name, "<fmt> (N, K) rel_err=... bytes a -> b")``, each kept layer as
    ``report.add("skip", name, reason)``.
    """
    if fmt not in FORMATS:
        raise QuantizationError(f"unknown FP4 format {fmt!r}; use one of {FORMATS}")
    include, exclude = tuple(include or ()), tuple(exclude or ())
    kernels = {"quantize_fp4": kernel_quantize, "fp4_linear": kernel_linear, "dequantize_fp4": kernel_dequantize}
    kernels = {k: v for k, v in kernels.items() if v is not None}
    block = BLOCK_SIZES[fmt]

    # Parameters owned by more than one module are tied (lm_head <-> embedding).
    owners: dict[int, int] = {}
    for mod in model.modules():
        for p in mod.parameters(recurse=False):
            owners[id(p)] = owners.get(id(p), 0) + 1
    tied = {pid for pid, n in owners.items() if n > 1}

    def note(kind: str, name: str, detail: str) -> None:
        if report is not None:
            report.add(kind, name, detail)

    swapped: list[str] = []
    targets = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear) or _is_hf_conv1d(m)]
    for name, lin in targets:
        if _is_hf_conv1d(lin):
            lin = _conv1d_as_linear(lin)
        elif type(lin) is not nn.Linear:
            # e.g. MultiheadAttention's out_proj (read through .weight by F.multi_head_attention_forward)
            # or an adapter-wrapped Linear: its forward is not plain x @ W^T + b.
            note("skip", name, f"{type(lin).__name__} is a subclass of nn.Linear; not swapped")
            continue
        if name == "":
            note("skip", "<model>", "the model itself is an nn.Linear; use FP4Linear.from_linear(model)")
            continue
        if any(fnmatch.fnmatchcase(name, p) for p in exclude):
            note("skip", name, "excluded by pattern")
            continue
        if include and not any(fnmatch.fnmatchcase(name, p) for p in include):
            continue
        explicit = name in include and not _has_wildcard(name)
        reason = None if explicit else _keep_reason(name, lin, tied)
        if reason is None and lin.in_features < block:
            reason = f"in_features {lin.in_features} < {fmt} block {block}: too small to quantize"
        if reason is None and lin.weight.is_meta:
            reason = "weight on the meta device (not materialized)"
        if reason is not None:
            note("skip", name, reason)
            continue
        q = FP4Linear.from_linear(lin, fmt, name=name, kernels=kernels, scale_rule=scale_rule)
        before = lin.weight.numel() * lin.weight.element_size()
        _set_submodule(model, name, q)
        swapped.append(name)
        note("fp4", name, f"{fmt} ({q.out_features}, {q.in_features}) rel_err={q.quant_error:.4f} "
                          f"bytes {before} -> {q.qweight.nbytes}")
    return swapped


def _is_hf_conv1d(module: nn.Module) -> bool:
    """transformers' ``Conv1D`` (GPT-2 and relatives): a linear layer that stores its weight as (in, out)."""
    cls = type(module)
    return cls.__name__ == "Conv1D" and cls.__module__.startswith("transformers") and hasattr(module, "nf")


def _conv1d_as_linear(conv: nn.Module) -> nn.Linear:
    """An nn.Linear computing the same function as a transformers Conv1D (y = x @ W + b, W of shape (in, out))."""
    in_features, out_features = conv.weight.shape
    lin = nn.Linear(in_features, out_features, bias=conv.bias is not None, device="meta")
    lin.weight = nn.Parameter(conv.weight.detach().t().contiguous(), requires_grad=conv.weight.requires_grad)
    if conv.bias is not None:
        lin.bias = conv.bias
    return lin


def _set_submodule(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)
