"""FP4 kernels on Ascend NPUs: ``quantize_fp4``, ``dequantize_fp4``, ``fp4_linear``.

NOT RUN ON ASCEND HARDWARE. Written against torch_npu 2.13's documented ops and checked on CPU against a
stand-in module (tests/backends/npu/); an Ascend user checks the numbers with
``vbhal conformance --device npu``.

``fp4_linear`` (y = x @ W^T + b, W = the FP4 weight dequantized; docs/CONTRACT.md) has three paths:

1. **int8 carrier, A2/A3** (``torch_npu.npu_weight_quant_batchmatmul``, op-plugin
   ``docs/context/torch_npu-npu_weight_quant_batchmatmul.md``; schema in torch_npu 2.13.0's
   ``csrc/aten/npu_native_functions_by_codegen.yaml``: ``(Tensor x, Tensor weight,
   Tensor antiquant_scale, Tensor? antiquant_offset=None, Tensor? quant_scale=None,
   Tensor? quant_offset=None, Tensor? bias=None, int antiquant_group_size=0, int inner_precise=0,
   int? weight_dtype=None)``,
   computing ``y = x @ ((weight + antiquant_offset) * antiquant_scale) + bias``). Every E2M1 value
   times 2 is an integer in [-12, 12] (OCP MX v1.0 section 5.3.3: +-{0, 0.5, 1, 1.5, 2, 3, 4, 6}), so an
   MXFP4 weight is carried EXACTLY by int8 ``weight = 2 * e2m1`` (K, N) with a per-group
   ``antiquant_scale = 2^(e - 127) / 2`` (ceil(K / 32), N) in x's dtype and group size 32 = the MX block
   (OCP MX v1.0 section 5, k = 32), as long as every such scale and product is representable in x's
   dtype (checked per weight with :func:`exact_scale_codes`; bfloat16 takes E8M0 codes 0..252,
   float16 104..140). The op has no backward: :class:`_WeightQuantLinear` supplies
   ``grad_x = grad_y @ W`` and ``grad_b = sum(grad_y)`` as the reference computes them.
2. **native MXFP4, Ascend 950 only** (capability ``fp4_native``): the same op with
   ``weight_dtype=torch_npu.float4_e2m1fn_x2`` and the E8M0 scales as they are, group 32. Written from
   the op-plugin/torchair converter and NPU.md; no 950 was available to anyone here: UNRUN.
3. **reference** (``vbhal.backends.cpu.fp4.fp4_linear``: dequantize in float32, matmul in float32,
   cast; plain torch, runs on the NPU) for everything else: NVFP4 (16-element blocks with E4M3 x FP32
   scales: ``antiquant_group_size`` must be a multiple of 32, and two 16-blocks of one 32-group have
   different scales, so no exact int8 carrier exists), float32 activations (the op takes fp16/bf16),
   scales outside the exact range, K or N above 65535, other chips. Numbers are then the reference's
   exactly; the reason is counted and logged once (``vbhal.backends.npu._runtime.FALLBACKS``).

``quantize_fp4`` / ``dequantize_fp4`` are the reference codecs (vbhal.formats, plain torch): they run on
the NPU as they are and are bit-exact by construction. (torch_npu's ``npu_dynamic_mx_quant`` exists on
the 950 only and is not documented to follow OCP MX v1.0's FLOOR rule bit for bit, so it is not used.)
"""

from __future__ import annotations

import os
import weakref

import torch

from vbhal.backends.cpu import fp4 as _cpu
from vbhal.backends.cpu.fp4 import check_linear_inputs, dequantize_fp4, quantize_fp4
from vbhal.formats import E2M1_VALUES, MX_BLOCK_SIZE, QuantizedWeight, e8m0_to_float32

from . import _runtime

__all__ = [
    "E2M1_TIMES_TWO",
    "KERNELS",
    "dequantize_fp4",
    "exact_scale_codes",
    "fp4_linear",
    "mxfp4_int8_carrier",
    "plan_fp4_linear",
    "quantize_fp4",
]

#: ``antiquant_group_size`` must be a multiple of this, within [32, K - 1] (op doc, torch_npu 2.13).
ANTIQUANT_GROUP_MULTIPLE = 32
#: "K, N range [1, 65535]" (op doc constraints).
MAX_K_N = 65535
#: Activation dtypes the op takes on A2/A3 ("x: float16, bfloat16").
CARRIER_X_DTYPES = (torch.float16, torch.bfloat16)
#: Chips documented for per-group int8 weights (A2, A3; the 950 in aclnnWeightQuantBatchMatmulV2).
CARRIER_CHIPS = ("A2", "A3", "950")
#: Chips with native FP4 (float4_e2m1fn_x2 weights + E8M0 scales): the backend's ``fp4_native``.
NATIVE_FP4_CHIPS = ("950",)
#: Twice each E2M1 code's value, index = 4-bit code (sign in bit 3): the int8 carrier of MXFP4.
E2M1_TIMES_TWO: tuple[int, ...] = tuple(int(2 * v) for v in E2M1_VALUES) + tuple(-int(2 * v) for v in E2M1_VALUES)
#: Cache int8 carriers per weight and dtype (1 byte per weight element on the device; with
#: VBHAL_NPU_CARRIER_CACHE=0 they are rebuilt on every call instead, which costs a pass over the codes).
CARRIER_CACHE = os.environ.get("VBHAL_NPU_CARRIER_CACHE", "1") != "0"

_exact_tables: dict[tuple[torch.dtype, torch.device], torch.Tensor] = {}
_carriers = None  # torch.utils.weak.WeakTensorKeyDictionary: codes tensor -> {dtype: (versions, carrier)}


# --------------------------------------------------------------------------------------------------
# the exact int8 carrier of MXFP4
# --------------------------------------------------------------------------------------------------


def exact_scale_codes(dtype: torch.dtype, device: torch.device | str = "cpu") -> torch.Tensor:
    """bool[256]: True for the E8M0 codes e whose carrier scale 2^(e-128) and every product
    ``(2 * e2m1) * 2^(e-128)`` are exact (and finite) in ``dtype``.

    Computed, not hand-derived: each scale is rounded to ``dtype`` and multiplied by every carrier
    magnitude {1, 2, 3, 4, 6, 8, 12} in ``dtype``, and compared with the float64 truth. Code 255 (NaN)
    is never exact. The tests check this table against the closed form (bfloat16: 0..252, float16:
    104..140).
    """
    dev = torch.device(device)
    key = (dtype, dev)
    table = _exact_tables.get(key)
    if table is None:
        s32 = e8m0_to_float32(torch.arange(256, dtype=torch.int32).to(torch.uint8)) / 2  # 2^(e-128), exact in fp32
        s = s32.to(dtype)
        mags = torch.tensor(sorted({abs(w) for w in E2M1_TIMES_TWO if w}), dtype=torch.float64)
        truth = mags[None, :] * s32.double()[:, None]
        prod = (mags.to(dtype)[None, :] * s[:, None]).double()
        ok = (s.double() == s32.double()) & (prod == truth).all(dim=1) & torch.isfinite(truth).all(dim=1)
        table = _exact_tables[key] = ok.to(dev)
    return table


def _unpack_codes(codes: torch.Tensor) -> torch.Tensor:
    """(N, Kp/2) packed bytes -> (N, Kp) 4-bit codes; element 2i is the LOW nibble (CONTRACT.md layout)."""
    return torch.stack((codes & 0xF, codes >> 4), dim=-1).flatten(-2)


def mxfp4_int8_carrier(qw: QuantizedWeight, dtype: torch.dtype):
    """The exact int8 form of an MXFP4 weight for ``npu_weight_quant_batchmatmul``, or a reason why not.

    Returns ``((weight, antiquant_scale, group_size), "")`` or ``(None, reason)`` with
    - ``weight``: int8 (K, N) contiguous, ``2 * e2m1`` (the padding to the block size is cut off);
    - ``antiquant_scale``: (ceil(K / 32), N) in ``dtype``, ``2^(e - 127) / 2`` per block; a block whose
      codes are all zero gets scale 1 (its E8M0 scale may not be finite in ``dtype``, and 0 * inf = NaN);
    - ``group_size``: 32, or 0 (per-channel, scale (1, N)) when K <= 32: the op wants the group size in
      [32, K - 1], and a single block is exactly the per-channel case.
    ``(weight + 0) * antiquant_scale`` equals ``qw.dequantize(float32)`` element for element (as values:
    int8 has no -0, so the sign of a zero weight is lost, which cannot change a matmul's sum).
    """
    if qw.fmt != "mxfp4":
        return None, (f"{qw.fmt}: no exact int8 carrier (antiquant_group_size must be a multiple of "
                      f"{ANTIQUANT_GROUP_MULTIPLE}, and nvfp4's 16-element blocks of one 32-group have different "
                      "E4M3 x FP32 scales)")
    n, k = qw.shape
    codes4 = _unpack_codes(qw.codes)  # (N, Kp)
    groups = codes4.shape[1] // MX_BLOCK_SIZE
    nonzero = (codes4 & 0x7).ne(0).view(n, groups, MX_BLOCK_SIZE).any(dim=-1)  # (N, G): block has a nonzero
    e = qw.scales.view(torch.uint8)
    exact = exact_scale_codes(dtype, e.device)[e.to(torch.int64)]
    if not bool((exact | ~nonzero).all()):
        bad = e[nonzero & ~exact]
        lo, hi = int(bad.min()), int(bad.max())
        return None, (f"mxfp4 block scales 2^(e-127) with E8M0 codes in [{lo}, {hi}] are not exact in {dtype} "
                      "as int8 carrier scales")
    lut = torch.tensor(E2M1_TIMES_TWO, dtype=torch.int8, device=codes4.device)
    weight = lut[codes4[:, :k].to(torch.int64)].t().contiguous()  # (K, N)
    scale = torch.where(nonzero, e8m0_to_float32(e) / 2, torch.ones((), device=e.device)).to(dtype)
    scale = scale.t().contiguous()  # (G, N)
    group = ANTIQUANT_GROUP_MULTIPLE if groups > 1 else 0
    return (weight, scale, group), ""


def _cached_carrier(qw: QuantizedWeight, dtype: torch.dtype):
    """:func:`mxfp4_int8_carrier`, remembered per codes tensor and dtype while the payload is unchanged."""
    global _carriers
    if not CARRIER_CACHE:
        return mxfp4_int8_carrier(qw, dtype)
    if _carriers is None:
        from torch.utils.weak import WeakTensorKeyDictionary

        _carriers = WeakTensorKeyDictionary()
    # In-place updates (load_state_dict copies into the buffers) bump _version: the carrier is rebuilt.
    # The scales are matched by identity (a weak reference), never by address, which a caching
    # allocator reuses.
    stamp = (qw.codes._version, qw.scales._version)
    per_dtype = _carriers.setdefault(qw.codes, {})
    hit = per_dtype.get(dtype)
    if hit is not None and hit[0] == stamp and hit[1]() is qw.scales:
        return hit[2]
    result = mxfp4_int8_carrier(qw, dtype)
    per_dtype[dtype] = (stamp, weakref.ref(qw.scales), result)
    return result


# --------------------------------------------------------------------------------------------------
# fp4_linear
# --------------------------------------------------------------------------------------------------


def _op_bias(bias: torch.Tensor | None, x_dtype: torch.dtype) -> torch.Tensor | None:
    """The op's bias rule: float32 with bfloat16 x, float16 with float16 x; contiguous (N,)."""
    if bias is None:
        return None
    return bias.detach().to(torch.float32 if x_dtype == torch.bfloat16 else x_dtype).contiguous()


def plan_fp4_linear(x: torch.Tensor, qw: QuantizedWeight) -> tuple[str, object, str]:
    """Which path a call takes: ``("carrier", (weight, scale, group), "")``, ``("native", None, "")`` or
    ``("reference", None, reason)``. No device sync, except once per weight and dtype to build a carrier."""
    n, k = qw.shape
    if x.dtype not in CARRIER_X_DTYPES:
        return "reference", None, f"npu_weight_quant_batchmatmul takes float16/bfloat16 activations, got {x.dtype}"
    if x.numel() == 0:
        return "reference", None, "empty input (the op does not take empty tensors)"
    if k > MAX_K_N or n > MAX_K_N:
        return "reference", None, f"weight {qw.shape} exceeds the op's K, N limit of {MAX_K_N}"
    chip = _runtime.chip_of(x.device)
    if qw.fmt == "mxfp4" and chip in NATIVE_FP4_CHIPS and k % MX_BLOCK_SIZE == 0:
        return "native", None, ""
    if chip not in CARRIER_CHIPS:
        return "reference", None, f"per-group npu_weight_quant_batchmatmul is documented for {CARRIER_CHIPS}, this is {chip!r}"
    carrier, reason = _cached_carrier(qw, x.dtype)
    if carrier is None:
        return "reference", None, reason
    return "carrier", carrier, ""


def _run_carrier(x2: torch.Tensor, bias: torch.Tensor | None, carrier) -> torch.Tensor:
    weight, scale, group = carrier
    return _runtime.torch_npu().npu_weight_quant_batchmatmul(
        x2, weight, scale, bias=_op_bias(bias, x2.dtype), antiquant_group_size=group)


def _run_native(x2: torch.Tensor, bias: torch.Tensor | None, qw: QuantizedWeight) -> torch.Tensor:
    """Ascend 950: MXFP4 as it is (UNRUN: no 950 was available).

    - weight: the packed codes (N, K/2) uint8 as their transposed view (K/2, N), i.e. packed along K,
      with ``weight_dtype=torch_npu.float4_e2m1fn_x2``. torch_npu 2.13.0's meta function
      (``torch_npu/op_plugin/meta/_meta_registrations.py``, ``npu_weight_quant_batchmatmul_meta``) takes
      4-bit weights only as uint8 and reads a transposed view (stride(-2) == 1) as (K/2, N) with logical
      N = size(1); a non-transposed one would be packed along N.
    - antiquant_scale: the E8M0 scales (N, K/32) as uint8 bits, transposed to (K/32, N). torch_npu
      carries E8M0 as uint8 (its torchair converter bitcasts a uint8 ``antiquant_scale`` to FLOAT8_E8M0).
    - group 32 = the MX block.
    The conformance suite checks this path first on a 950 (``test_npu_native_fp4_on_950``).
    """
    tnpu = _runtime.torch_npu()
    return tnpu.npu_weight_quant_batchmatmul(
        x2, qw.codes.t(), qw.scales.view(torch.uint8).t(), bias=_op_bias(bias, x2.dtype),
        antiquant_group_size=MX_BLOCK_SIZE, weight_dtype=tnpu.float4_e2m1fn_x2)


class _WeightQuantLinear(torch.autograd.Function):
    """y = op(x, W) + b with the reference's gradients (the op itself is inference-only: no backward).

    grad_x = (grad_y in float32) @ W (float32, dequantized), cast to x's dtype; grad_b = sum over rows
    of grad_y in float32, cast to b's dtype: exactly what autograd computes through the reference
    ``F.linear(x.float(), W, b.float()).to(x.dtype)``. The FP4 weight is frozen (no gradient).
    """

    @staticmethod
    def forward(ctx, x2, bias, qw, run):
        ctx.qw = qw
        ctx.x_dtype = x2.dtype
        ctx.bias_dtype = None if bias is None else bias.dtype
        return run(x2, bias)

    @staticmethod
    def backward(ctx, gy):
        g32 = gy.to(torch.float32)
        gx = (g32 @ ctx.qw.dequantize(torch.float32)).to(ctx.x_dtype) if ctx.needs_input_grad[0] else None
        gb = g32.sum(0).to(ctx.bias_dtype) if ctx.needs_input_grad[1] else None
        return gx, gb, None, None


def fp4_linear(x: torch.Tensor, qw: QuantizedWeight, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``y = x @ dequantize(qw)^T + bias`` on an NPU (see the module docstring for the three paths).

    x (..., K) float16/bfloat16/float32 on the weight's device; differentiable w.r.t. x and bias.

    Example::

        qw = quantize_fp4(w.npu(), "mxfp4")
        y = fp4_linear(x.npu().bfloat16(), qw, b.npu())    # int8-carrier op on A2/A3
    """
    check_linear_inputs(x, qw, bias)
    path, carrier, reason = plan_fp4_linear(x, qw)
    if path == "reference":
        _runtime.record_fallback("fp4_linear", reason)
        return _cpu.fp4_linear(x, qw, bias)
    n, k = qw.shape
    x2 = x.reshape(-1, k)  # the op takes 2-D (M, K)
    if path == "carrier":
        def run(a, b):
            return _run_carrier(a, b, carrier)
    else:
        def run(a, b):
            return _run_native(a, b, qw)
    y2 = _WeightQuantLinear.apply(x2, bias, qw, run)
    return y2.reshape(*x.shape[:-1], n)


KERNELS = {"quantize_fp4": quantize_fp4, "dequantize_fp4": dequantize_fp4, "fp4_linear": fp4_linear}
