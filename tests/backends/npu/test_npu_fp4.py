"""CONTRACT TESTS of the NPU FP4 kernels against a stand-in torch_npu (see conftest.py).

They check the exactness of the int8 carrier of MXFP4 against vbhal.formats (pure CPU math, valid on
any device), the arguments we pass to ``npu_weight_quant_batchmatmul`` (layout, dtypes, group size, bias
rule), the ``(w + offset) * scale`` formula through the stand-in's CPU model of the op, gradients and
fallbacks. They do not verify an Ascend NPU.
"""

from __future__ import annotations

import math

import pytest
import torch

from vbhal.backends.cpu import fp4 as cpu_fp4
from vbhal.backends.npu import _runtime
from vbhal.backends.npu import fp4 as nfp4
from vbhal.formats import quantize

TOL = {torch.float16: dict(atol=2e-3, rtol=2e-3), torch.bfloat16: dict(atol=2e-2, rtol=2e-2)}


def _weight(n, k, *, seed=0, spread=True, dtype=torch.float32):
    """A random weight whose rows span many magnitudes (so many different E8M0 scales occur)."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g)
    if spread:
        w = w * torch.exp2(torch.randint(-12, 6, (n, 1), generator=g).float())
    return w.to(dtype)


def _x(*shape, dtype, seed=1, grad=False):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(dtype).requires_grad_(grad)


# -- the carrier: exact by construction --------------------------------------------------------------


def test_exact_scale_table_matches_closed_form():
    # carrier scale 2^(e-128), products up to 12 * 2^(e-128) = 1.5 * 2^(e-125):
    # bf16: subnormals reach 2^-133 (always representable), 1.5 * 2^(e-125) <= max(bf16) ~ 2^128 -> e <= 252.
    # fp16: scale >= 2^-24 -> e >= 104; 12 * 2^(e-128) <= 65504 -> e <= 140.
    for dtype, lo, hi in ((torch.bfloat16, 0, 252), (torch.float16, 104, 140)):
        table = nfp4.exact_scale_codes(dtype)
        want = torch.zeros(256, dtype=torch.bool)
        want[lo : hi + 1] = True
        assert torch.equal(table, want), dtype


def test_e2m1_times_two_are_the_integers_of_the_spec():
    assert nfp4.E2M1_TIMES_TWO[:8] == (0, 1, 2, 3, 4, 6, 8, 12)
    assert all(-12 <= w <= 12 for w in nfp4.E2M1_TIMES_TWO)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("n,k", [(48, 96), (17, 70), (5, 32), (3, 20), (8, 33)])
@pytest.mark.parametrize("rule", ["floor", "rceil"])
def test_int8_carrier_times_scale_equals_reference_dequantization(dtype, n, k, rule):
    qw = quantize(_weight(n, k, seed=n + k, spread=dtype == torch.bfloat16), "mxfp4", scale_rule=rule)
    carrier, reason = nfp4.mxfp4_int8_carrier(qw, dtype)
    assert carrier is not None, reason
    w8, scale, group = carrier
    assert w8.dtype == torch.int8 and w8.shape == (k, n) and w8.is_contiguous()
    groups = math.ceil(k / 32)
    assert scale.dtype == dtype and scale.shape == (groups, n)
    assert group == (32 if groups > 1 else 0)  # op: group size in [32, K-1]; one block = per-channel
    assert int(w8.abs().max()) <= 12
    # (w + 0) * scale, computed IN THE ACTIVATION DTYPE, equals the float32 reference, element for element.
    expanded = scale.repeat_interleave(32, 0)[:k]
    carried = (w8.to(dtype) * expanded).float()
    assert torch.equal(carried.t(), qw.dequantize(torch.float32))


def test_carrier_of_extreme_scales(fake_npu):
    # Blocks with tiny / huge scales: exact in bf16, not in fp16 -> fp16 takes the reference path.
    w = _weight(4, 64, spread=False)
    w[0, :32] *= 2.0**-120
    w[1, 32:] *= 2.0**100
    w[2, :32] = 0.0  # an all-zero block (scale code 0): its carrier scale must stay finite
    qw = quantize(w, "mxfp4")
    (w8, scale, _), _ = nfp4.mxfp4_int8_carrier(qw, torch.bfloat16)
    assert torch.isfinite(scale).all()
    assert torch.equal((w8.to(torch.bfloat16) * scale.repeat_interleave(32, 0)).float().t(), qw.dequantize())
    carrier, reason = nfp4.mxfp4_int8_carrier(qw, torch.float16)
    assert carrier is None and "not exact in torch.float16" in reason


def test_zero_block_with_unrepresentable_scale_is_still_exact():
    w = _weight(2, 64, spread=False) * 2.0**-8
    w[1, 32:] = 0.0
    qw = quantize(w, "mxfp4")
    qw.scales.view(torch.uint8)[1, 1] = 0  # all-zero block, scale 2^-127: no fp16 value, but nothing to scale
    (w8, scale, _), reason = nfp4.mxfp4_int8_carrier(qw, torch.float16)
    assert reason == "" and scale[1, 1] == 1.0
    assert torch.equal((w8.to(torch.float16) * scale.repeat_interleave(32, 0)).float().t(), qw.dequantize())


def test_nvfp4_has_no_int8_carrier():
    carrier, reason = nfp4.mxfp4_int8_carrier(quantize(_weight(4, 64), "nvfp4"), torch.bfloat16)
    assert carrier is None and "multiple of 32" in reason


# -- fp4_linear through npu_weight_quant_batchmatmul ---------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("xshape,n,k", [((5, 96), 40, 96), ((2, 3, 70), 24, 70), ((4, 20), 8, 20)])
def test_fp4_linear_calls_the_op_with_documented_layout(fake_npu, dtype, bias, xshape, n, k):
    qw = quantize(_weight(n, k, seed=k, spread=dtype == torch.bfloat16), "mxfp4")
    x = _x(*xshape, dtype=dtype)
    b = _x(n, dtype=dtype, seed=7) if bias else None
    y = nfp4.fp4_linear(x, qw, b)
    (call,) = fake_npu.calls_of("npu_weight_quant_batchmatmul")
    m = math.prod(xshape[:-1])
    assert call["x"].shape == (m, k) and call["x"].dtype == dtype  # 2-D (M, K)
    assert call["weight"].dtype == torch.int8 and call["weight"].shape == (k, n)
    assert call["antiquant_scale"].dtype == dtype and call["antiquant_scale"].shape == (math.ceil(k / 32), n)
    assert call["antiquant_group_size"] == (32 if k > 32 else 0)
    assert call["antiquant_offset"] is None and call["quant_scale"] is None and call["weight_dtype"] is None
    if bias:  # bf16 x needs a float32 bias, fp16 x a float16 one
        assert call["bias"].dtype == (torch.float32 if dtype == torch.bfloat16 else torch.float16)
    else:
        assert call["bias"] is None
    assert y.shape == (*xshape[:-1], n) and y.dtype == dtype
    torch.testing.assert_close(y.float(), cpu_fp4.fp4_linear(x, qw, b).float(), **TOL[dtype])
    assert not _runtime.FALLBACKS


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_fp4_linear_gradients_match_reference(fake_npu, dtype):
    qw = quantize(_weight(24, 64, spread=False), "mxfp4")
    x = _x(3, 4, 64, dtype=dtype, grad=True)
    b = _x(24, dtype=dtype, seed=3, grad=True)
    y = nfp4.fp4_linear(x, qw, b)
    assert len(fake_npu.calls_of("npu_weight_quant_batchmatmul")) == 1
    gy = torch.randn(y.shape, generator=torch.Generator().manual_seed(5)).to(dtype)
    gx, gb = torch.autograd.grad(y, (x, b), gy)
    xr, br = x.detach().clone().requires_grad_(), b.detach().clone().requires_grad_()
    ex, eb = torch.autograd.grad(cpu_fp4.fp4_linear(xr, qw, br), (xr, br), gy)
    assert gx.dtype == dtype and gb.dtype == dtype
    assert torch.equal(gx, ex) and torch.equal(gb, eb)  # same formula as autograd through the reference


def test_fp4_linear_grad_without_bias_and_frozen_x(fake_npu):
    qw = quantize(_weight(8, 64), "mxfp4")
    x = _x(2, 64, dtype=torch.bfloat16)
    b = _x(8, dtype=torch.float32, seed=2, grad=True)  # float32 bias with bf16 x
    y = nfp4.fp4_linear(x, qw, b)
    (gb,) = torch.autograd.grad(y.float().sum(), (b,))
    assert gb.dtype == torch.float32 and torch.equal(gb, torch.full((8,), 2.0))


def test_carrier_is_cached_and_rebuilt_after_in_place_update(fake_npu):
    qw = quantize(_weight(8, 64, spread=False), "mxfp4")
    x = _x(2, 64, dtype=torch.bfloat16)
    nfp4.fp4_linear(x, qw)
    nfp4.fp4_linear(x, qw)
    w_first, w_second = (c["weight"] for c in fake_npu.calls_of("npu_weight_quant_batchmatmul"))
    assert w_first is w_second
    other = quantize(_weight(8, 64, seed=9, spread=False), "mxfp4")
    qw.codes.copy_(other.codes)  # what load_state_dict does to the module's buffers (codes only here)
    y = nfp4.fp4_linear(x, qw)
    assert fake_npu.calls_of("npu_weight_quant_batchmatmul")[-1]["weight"] is not w_first
    torch.testing.assert_close(y.float(), cpu_fp4.fp4_linear(x, qw).float(), **TOL[torch.bfloat16])
    qw.scales.copy_(other.scales)  # and scales only
    y = nfp4.fp4_linear(x, qw)
    assert len({id(c["weight"]) for c in fake_npu.calls_of("npu_weight_quant_batchmatmul")}) == 3
    torch.testing.assert_close(y.float(), cpu_fp4.fp4_linear(x, other).float(), **TOL[torch.bfloat16])


def test_native_fp4_path_on_950_passes_packed_codes_and_e8m0_scales(fake_npu):
    fake_npu.set_chip("Ascend950PR")
    qw = quantize(_weight(16, 64, spread=False), "mxfp4")
    x = _x(3, 64, dtype=torch.bfloat16)
    b = _x(16, dtype=torch.bfloat16, seed=4)
    y = nfp4.fp4_linear(x, qw, b)
    (call,) = fake_npu.calls_of("npu_weight_quant_batchmatmul")
    assert call["weight_dtype"] is fake_npu.module.float4_e2m1fn_x2
    assert call["weight"].shape == (32, 16) and call["weight"].dtype == torch.uint8
    assert call["antiquant_scale"].dtype == torch.uint8 and call["antiquant_scale"].shape == (2, 16)
    assert torch.equal(call["antiquant_scale"], qw.scales.view(torch.uint8).t())
    assert call["antiquant_group_size"] == 32
    assert call["bias"].dtype == torch.float32
    torch.testing.assert_close(y.float(), cpu_fp4.fp4_linear(x, qw, b).float(), **TOL[torch.bfloat16])


def test_950_with_k_not_multiple_of_32_uses_the_carrier(fake_npu):
    fake_npu.set_chip("Ascend950PR")
    qw = quantize(_weight(8, 40, spread=False), "mxfp4")
    nfp4.fp4_linear(_x(2, 40, dtype=torch.float16), qw)
    (call,) = fake_npu.calls_of("npu_weight_quant_batchmatmul")
    assert call["weight_dtype"] is None and call["weight"].dtype == torch.int8


# -- fallbacks: counted, numbers identical to the reference path ---------------------------------------


def _assert_reference(fake_npu, y, x, qw, b, substring):
    assert not fake_npu.calls_of("npu_weight_quant_batchmatmul")
    assert torch.equal(y, cpu_fp4.fp4_linear(x, qw, b))
    reasons = [r for (kernel, r) in _runtime.FALLBACKS if kernel == "fp4_linear"]
    assert len(reasons) == 1 and substring in reasons[0], reasons


def test_nvfp4_uses_dequantize_then_matmul(fake_npu):
    qw = quantize(_weight(8, 64), "nvfp4")
    x, b = _x(3, 64, dtype=torch.bfloat16), _x(8, dtype=torch.bfloat16, seed=2)
    _assert_reference(fake_npu, nfp4.fp4_linear(x, qw, b), x, qw, b, "nvfp4")


def test_float32_activations_use_the_reference(fake_npu):
    qw = quantize(_weight(8, 64), "mxfp4")
    x = _x(3, 64, dtype=torch.float32)
    _assert_reference(fake_npu, nfp4.fp4_linear(x, qw), x, qw, None, "float16/bfloat16")


def test_inexact_scales_use_the_reference(fake_npu):
    w = _weight(4, 64, spread=False)
    w[1] *= 2.0**40  # far beyond float16's carrier range
    qw = quantize(w, "mxfp4")
    x = _x(2, 64, dtype=torch.float16)
    _assert_reference(fake_npu, nfp4.fp4_linear(x, qw), x, qw, None, "not exact in torch.float16")


def test_310p_uses_the_reference(fake_npu):
    fake_npu.set_chip("Ascend310P3")
    qw = quantize(_weight(8, 64), "mxfp4")
    x = _x(2, 64, dtype=torch.float16)
    _assert_reference(fake_npu, nfp4.fp4_linear(x, qw), x, qw, None, "documented for")


def test_empty_input_uses_the_reference(fake_npu):
    qw = quantize(_weight(8, 64), "mxfp4")
    x = torch.empty(0, 64, dtype=torch.bfloat16)
    y = nfp4.fp4_linear(x, qw)
    assert y.shape == (0, 8) and not fake_npu.calls_of("npu_weight_quant_batchmatmul")


def test_bad_input_raises_kernel_error(fake_npu):
    from vbhal.errors import KernelError

    qw = quantize(_weight(8, 64), "mxfp4")
    with pytest.raises(KernelError, match="expects input"):
        nfp4.fp4_linear(_x(2, 63, dtype=torch.bfloat16), qw)


# -- quantize / dequantize and the kernel table -------------------------------------------------------


def test_codecs_are_the_reference_codecs_and_table_maps_them():
    from vbhal.backends.npu import _TABLE

    w = _weight(8, 64)
    qw = nfp4.quantize_fp4(w, "mxfp4")
    ref = quantize(w, "mxfp4")
    assert torch.equal(qw.codes, ref.codes) and torch.equal(qw.scales.view(torch.uint8), ref.scales.view(torch.uint8))
    assert torch.equal(nfp4.dequantize_fp4(qw, torch.bfloat16), ref.dequantize(torch.bfloat16))
    for name in ("quantize_fp4", "dequantize_fp4", "fp4_linear"):
        assert _TABLE.lookup(name) is nfp4.KERNELS[name]


def test_fp4linear_module_with_npu_kernels_matches_reference(fake_npu):
    """FP4Linear (the custom op vbhal::fp4_linear) bound to the NPU kernels: forward through the op,
    backward through the module's autograd formula; same results as the module on reference kernels."""
    from vbhal.nn.fp4_linear import FP4Linear

    lin = torch.nn.Linear(64, 24).to(torch.bfloat16)
    with torch.no_grad():
        lin.weight.copy_(_weight(24, 64, spread=False))
    npu_mod = FP4Linear.from_linear(lin, "mxfp4", kernels=nfp4.KERNELS)
    ref_mod = FP4Linear.from_linear(lin, "mxfp4")
    x = _x(2, 5, 64, dtype=torch.bfloat16, grad=True)
    xr = x.detach().clone().requires_grad_()
    y, yr = npu_mod(x), ref_mod(xr)
    assert len(fake_npu.calls_of("npu_weight_quant_batchmatmul")) == 1
    torch.testing.assert_close(y.float(), yr.float(), **TOL[torch.bfloat16])
    gy = torch.randn(y.shape, generator=torch.Generator().manual_seed(3)).to(torch.bfloat16)
    y.backward(gy)
    yr.backward(gy)
    assert torch.equal(x.grad, xr.grad) and torch.equal(npu_mod.bias.grad, ref_mod.bias.grad)


def test_carrier_cache_follows_a_replaced_scales_tensor(fake_npu):
    from vbhal.formats import QuantizedWeight

    qw = quantize(_weight(8, 64, spread=False), "mxfp4")
    x = _x(2, 64, dtype=torch.bfloat16)
    nfp4.fp4_linear(x, qw)
    other = quantize(_weight(8, 64, seed=5, spread=False), "mxfp4")
    swapped = QuantizedWeight(qw.codes, other.scales.clone(), None, "mxfp4", qw.shape)  # same codes object
    y = nfp4.fp4_linear(x, swapped)
    torch.testing.assert_close(y.float(), cpu_fp4.fp4_linear(x, swapped).float(), **TOL[torch.bfloat16])
