"""Every bound kernel against its reference: bit-exact codecs, matmul and attention within tolerance,
gradients included. Inputs are fresh random draws (never zeros); outputs are checked for unwritten (NaN)
elements."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from vbhal import formats
from vbhal.conformance._reference import GRAD_TOLERANCE, TOLERANCE, attention_reference, dtypes_for, rel_err

FORMATS = ["mxfp4", "nvfp4"]
SHAPES = [(64, 96), (48, 100)]  # K = 100: not a multiple of any block (padded)


def _weight(n, k, device, seed):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g) * torch.logspace(-3, 2, n, base=2.0)[:, None]
    return w.to(device)


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("shape", SHAPES)
def test_quantize_bit_exact(vbhal_device, vbhal_kernel, record, fmt, shape):
    w = _weight(*shape, vbhal_device.device, seed=hash((fmt, shape)) % 1000)
    got = vbhal_kernel("quantize_fp4")(w, fmt)
    ref = formats.quantize(w.cpu(), fmt)
    same_codes = torch.equal(got.codes.cpu(), ref.codes)
    same_scales = torch.equal(got.scales.cpu().view(torch.uint8), ref.scales.view(torch.uint8))
    same_ts = (ref.tensor_scale is None and got.tensor_scale is None) or torch.equal(
        got.tensor_scale.cpu(), ref.tensor_scale)
    mism = int((got.codes.cpu() != ref.codes).sum())
    ok = same_codes and same_scales and same_ts
    record("quantize_fp4", f"{fmt} {shape[0]}x{shape[1]} bit-exact", f"{mism} bytes differ", "0", ok)
    assert ok


@pytest.mark.parametrize("fmt", FORMATS)
def test_dequantize_bit_exact(vbhal_device, vbhal_kernel, record, fmt):
    ref_qw = formats.quantize(_weight(64, 96, "cpu", seed=7), fmt)
    got = vbhal_kernel("dequantize_fp4")(ref_qw.to(vbhal_device.device), torch.float32).cpu()
    ref = ref_qw.dequantize(torch.float32)
    ok = torch.equal(got, ref)
    record("dequantize_fp4", f"{fmt} bit-exact", int((got != ref).sum()), 0, ok)
    assert ok


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("m", [1, 5, 33])
def test_fp4_linear_matches_reference_with_gradients(vbhal_device, vbhal_kernel, record, fmt, m):
    dev = vbhal_device.device
    qw = formats.quantize(_weight(64, 96, "cpu", seed=m), fmt).to(dev)
    for dtype in dtypes_for(vbhal_device):
        x = torch.randn(m, 96, device=dev, dtype=dtype, requires_grad=True)
        bias = torch.randn(64, device=dev, dtype=dtype, requires_grad=True)
        y = vbhal_kernel("fp4_linear")(x, qw, bias)
        assert y.shape == (m, 64) and y.dtype == dtype and not torch.isnan(y).any()
        w64 = qw.dequantize(torch.float64).cpu()
        x64 = x.detach().cpu().double().requires_grad_(True)
        b64 = bias.detach().cpu().double().requires_grad_(True)
        ref = F.linear(x64, w64, b64)
        err = rel_err(y, ref)
        g = torch.randn_like(ref)
        y.backward(g.to(dev, dtype))
        ref.backward(g)
        gx, gb = rel_err(x.grad, x64.grad), rel_err(bias.grad, b64.grad)
        tol, gtol = TOLERANCE[dtype], GRAD_TOLERANCE[dtype]
        name = f"{fmt} M={m} {str(dtype).replace('torch.', '')}"
        record("fp4_linear", f"{name} forward", err, tol, err < tol)
        record("fp4_linear", f"{name} grad x / grad bias", max(gx, gb), gtol, max(gx, gb) < gtol)
        assert err < tol and gx < gtol and gb < gtol, (name, err, gx, gb)


ATTN_CASES = [
    # (batch, q heads, kv heads, sq, sk, head dim, causal)
    (2, 4, 4, 37, 37, 64, False),
    (2, 4, 4, 37, 37, 64, True),
    (1, 8, 2, 50, 50, 64, True),  # grouped-query
    (1, 4, 1, 16, 16, 128, False),  # multi-query, head dim 128
]


@pytest.mark.parametrize("case", ATTN_CASES, ids=lambda c: "b{}_hq{}_hkv{}_s{}_d{}_{}".format(
    c[0], c[1], c[2], c[3], c[5], "causal" if c[6] else "full"))
def test_attention_matches_float64_with_gradients(vbhal_device, vbhal_kernel, record, case):
    b, hq, hkv, sq, sk, d, causal = case
    dev = vbhal_device.device
    for dtype in dtypes_for(vbhal_device):
        q = torch.randn(b, hq, sq, d, device=dev, dtype=dtype, requires_grad=True)
        k = torch.randn(b, hkv, sk, d, device=dev, dtype=dtype, requires_grad=True)
        v = torch.randn(b, hkv, sk, d, device=dev, dtype=dtype, requires_grad=True)
        out = vbhal_kernel("attention")(q, k, v, causal=causal)
        ref_in = [t.detach().cpu().double().requires_grad_(True) for t in (q, k, v)]
        ref = F.scaled_dot_product_attention(*ref_in, is_causal=causal, enable_gqa=True)
        err = rel_err(out, ref)
        g = torch.randn_like(ref)
        out.backward(g.to(dev, dtype))
        ref.backward(g)
        gerr = max(rel_err(t.grad, r.grad) for t, r in zip((q, k, v), ref_in))
        tol, gtol = TOLERANCE[dtype], GRAD_TOLERANCE[dtype]
        name = f"hq={hq} hkv={hkv} S={sq} D={d} {'causal' if causal else 'full'} {str(dtype)[6:]}"
        record("attention", f"{name} forward", err, tol, err < tol)
        record("attention", f"{name} dq/dk/dv", gerr, gtol, gerr < gtol)
        assert out.shape == q.shape and err < tol and gerr < gtol, (name, err, gerr)


@pytest.mark.parametrize("causal", [False, True])
def test_attention_packed_documents_do_not_mix(vbhal_device, vbhal_kernel, record, causal):
    dev = vbhal_device.device
    lengths = [7, 33, 1, 24]
    cu = torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist(), dtype=torch.int32)
    total = int(cu[-1])
    for dtype in dtypes_for(vbhal_device):
        q = torch.randn(total, 4, 64, device=dev, dtype=dtype, requires_grad=True)
        k = torch.randn(total, 2, 64, device=dev, dtype=dtype, requires_grad=True)
        v = torch.randn(total, 2, 64, device=dev, dtype=dtype, requires_grad=True)
        out = vbhal_kernel("attention")(q, k, v, causal=causal, cu_seqlens=cu.to(dev), max_seqlen=max(lengths))
        ref = attention_reference(q, k, v, causal=causal, cu_seqlens=cu)
        err = rel_err(out, ref)
        out.float().square().sum().backward()
        tol = TOLERANCE[dtype]
        record("attention", f"varlen {lengths} {'causal' if causal else 'full'} {str(dtype)[6:]}", err, tol,
               err < tol)
        assert err < tol and q.grad is not None and torch.isfinite(q.grad).all()
