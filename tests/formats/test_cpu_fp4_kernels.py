"""The CPU backend's reference FP4 kernels (vbhal/backends/cpu/fp4.py) against formats and float64."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from fp4_refs import random_weight

from vbhal.backends.cpu import fp4 as cpu_fp4
from vbhal.errors import KernelError
from vbhal.formats import quantize

TOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 2e-3}


def test_kernel_table_names_the_contract_kernels():
    assert set(cpu_fp4.KERNELS) == {"quantize_fp4", "dequantize_fp4", "fp4_linear"}
    assert all(callable(f) for f in cpu_fp4.KERNELS.values())


@pytest.mark.parametrize("fmt", ["mxfp4", "nvfp4"])
def test_quantize_and_dequantize_are_the_formats_reference(fmt, device):
    w = random_weight(24, 72, torch.bfloat16, device=device, seed=60)
    a = cpu_fp4.quantize_fp4(w, fmt)
    b = quantize(w, fmt)
    assert torch.equal(a.codes, b.codes) and torch.equal(a.scales.view(torch.uint8), b.scales.view(torch.uint8))
    assert torch.equal(cpu_fp4.dequantize_fp4(a, torch.bfloat16), b.dequantize(torch.bfloat16))
    r = cpu_fp4.quantize_fp4(w, "mxfp4", scale_rule="rceil") if fmt == "mxfp4" else None
    if r is not None:
        assert r.scale_rule == "rceil"


@pytest.mark.parametrize("fmt", ["mxfp4", "nvfp4"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", [(72,), (5, 72), (2, 3, 72)])
@pytest.mark.parametrize("with_bias", [True, False])
def test_fp4_linear_matches_float64(fmt, dtype, shape, with_bias, device):
    qw = quantize(random_weight(40, 72, seed=61, device=device), fmt)
    g = torch.Generator().manual_seed(62)
    x = torch.randn(shape, generator=g).to(device=device, dtype=dtype)
    b = torch.randn(40, generator=g).to(device=device, dtype=dtype) if with_bias else None
    y = cpu_fp4.fp4_linear(x, qw, b)
    assert y.dtype == dtype and y.shape == (*shape[:-1], 40)
    w64 = qw.dequantize().double()
    ref = F.linear(x.double(), w64, None if b is None else b.double())
    err = (y.double() - ref).abs().max() / ref.abs().max()
    assert err <= TOL[dtype]


def test_fp4_linear_input_gradient(device):
    qw = quantize(random_weight(16, 48, seed=63, device=device), "mxfp4")
    x = torch.randn(3, 48, device=device, requires_grad=True)
    b = torch.randn(16, device=device, requires_grad=True)
    y = cpu_fp4.fp4_linear(x, qw, b)
    go = torch.randn_like(y)
    y.backward(go)
    w64 = qw.dequantize().double()
    assert torch.allclose(x.grad.double(), go.double() @ w64, rtol=1e-5, atol=1e-5)
    assert torch.allclose(b.grad.double(), go.double().sum(0), rtol=1e-5, atol=1e-5)


def test_fp4_linear_computes_in_float32_under_autocast():
    qw = quantize(random_weight(16, 64, seed=64), "nvfp4")
    x = torch.randn(4, 64)
    plain = cpu_fp4.fp4_linear(x, qw, None)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        inside = cpu_fp4.fp4_linear(x, qw, None)
    assert inside.dtype == torch.float32 and torch.equal(inside, plain)


@pytest.mark.parametrize(
    "x, match",
    [
        (torch.zeros(2, 64, dtype=torch.int64), "float32/bfloat16/float16"),
        (torch.zeros(2, 63), r"\(\.\.\., 64\)"),
        (torch.zeros(2, 64, device="meta"), "meta"),
        (torch.tensor(1.0), r"\(\.\.\., 64\)"),
    ],
)
def test_fp4_linear_bad_inputs(x, match):
    qw = quantize(random_weight(8, 64, seed=65), "mxfp4")
    with pytest.raises(KernelError, match=match):
        cpu_fp4.fp4_linear(x, qw, None)
    with pytest.raises(KernelError, match="bias"):
        cpu_fp4.fp4_linear(torch.zeros(2, 64), qw, torch.zeros(7))
