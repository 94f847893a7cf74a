"""NPU-specific checks (skipped on other devices): the paths and known traps of the Ascend backend.

The generic checks (test_kernels.py) compare every kernel with its reference; these add what only an
Ascend chip can answer, because the NPU kernels were written against torch_npu's documentation and
only contract-tested on CPU (docs/NPU_BACKEND.md):
- the int8 carrier of MXFP4 is exact in the chip's own arithmetic, and fp4_linear takes the op path;
- causal masks with Sq != Sk (sparse_mode 2, top-left) and past the 2048 x 2048 compressed mask;
- user boolean masks (polarity inverted for the op), including masked KV positions past 512;
- packed documents through TND, and a fully masked row (which must take the reference path);
- on an Ascend 950, the native MXFP4 path (weight_dtype=float4_e2m1fn_x2).
Every fallback the NPU kernels took during the run is written into the report.
"""

from __future__ import annotations

import pytest
import torch

from vbhal import formats
from vbhal.conformance._reference import GRAD_TOLERANCE, TOLERANCE, attention_reference, rel_err


@pytest.fixture
def npu_device(vbhal_device):
    if vbhal_device.kind != "npu":
        pytest.skip(f"NPU-specific checks; the device under test is {vbhal_device.kind}")
    return vbhal_device


def _runtime():
    from vbhal.backends.npu import _runtime

    return _runtime


def _weight(n, k, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, k, generator=g) * torch.logspace(-6, 3, n, base=2.0)[:, None]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_npu_int8_carrier_is_exact_on_the_chip(npu_device, record, dtype):
    from vbhal.backends.npu.fp4 import mxfp4_int8_carrier

    dev = npu_device.device
    qw = formats.quantize(_weight(64, 160, seed=3), "mxfp4").to(dev)
    carrier, reason = mxfp4_int8_carrier(qw, dtype)
    if carrier is None:
        record("fp4_linear", f"int8 carrier {str(dtype)[6:]}", reason, "-", True)
        pytest.skip(reason)
    w8, scale, _ = carrier
    on_chip = (w8.to(dtype) * scale.repeat_interleave(32, 0)[: w8.shape[0]]).float().t().cpu()
    ref = qw.dequantize(torch.float32).cpu()
    diff = int((on_chip != ref).sum())
    record("fp4_linear", f"int8 carrier * scale on chip == dequant ({str(dtype)[6:]})", f"{diff} differ", "0", diff == 0)
    assert diff == 0


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("m", [1, 17, 300])
def test_npu_fp4_linear_path_and_accuracy(npu_device, vbhal_kernel, record, dtype, m):
    from vbhal.backends.npu.fp4 import plan_fp4_linear

    dev = npu_device.device
    qw = formats.quantize(_weight(96, 256, seed=m), "mxfp4").to(dev)
    x = torch.randn(m, 256, device=dev, dtype=dtype, requires_grad=True)
    b = torch.randn(96, device=dev, dtype=dtype, requires_grad=True)
    path, _, reason = plan_fp4_linear(x, qw)
    y = vbhal_kernel("fp4_linear")(x, qw, b)
    x64, b64 = (t.detach().cpu().double().requires_grad_() for t in (x, b))
    ref = torch.nn.functional.linear(x64, qw.dequantize(torch.float64).cpu(), b64)
    err = rel_err(y, ref)
    g = torch.randn_like(ref)
    y.backward(g.to(dev, dtype))
    ref.backward(g)
    gerr = max(rel_err(x.grad, x64.grad), rel_err(b.grad, b64.grad))
    name = f"M={m} {str(dtype)[6:]} path={path}{' (' + reason + ')' if reason else ''}"
    record("fp4_linear", f"{name} forward", err, TOLERANCE[dtype], err < TOLERANCE[dtype])
    record("fp4_linear", f"{name} grad x / bias", gerr, GRAD_TOLERANCE[dtype], gerr < GRAD_TOLERANCE[dtype])
    assert err < TOLERANCE[dtype] and gerr < GRAD_TOLERANCE[dtype]


ATTN_TRAPS = [
    # (name, b, hq, hkv, sq, sk, d, causal, mask)
    ("causal Sq<Sk (top-left)", 1, 4, 2, 40, 96, 64, True, None),
    ("causal Sq>Sk (top-left)", 1, 4, 2, 96, 40, 64, True, None),
    ("causal S=2100 > compressed mask", 1, 2, 1, 2100, 2100, 64, True, None),
    ("bool mask, keys past 512 masked", 1, 4, 4, 64, 700, 64, False, "past512"),
    ("bool mask + causal", 2, 4, 2, 48, 48, 128, True, "random"),
]


@pytest.mark.parametrize("case", ATTN_TRAPS, ids=lambda c: c[0])
def test_npu_attention_traps(npu_device, vbhal_kernel, record, case):
    name, b, hq, hkv, sq, sk, d, causal, mask_kind = case
    dev = npu_device.device
    keep = None
    if mask_kind == "past512":
        keep = torch.ones(sq, sk, dtype=torch.bool)
        keep[:, 512:] = False
    elif mask_kind == "random":
        keep = torch.rand(b, 1, sq, sk, generator=torch.Generator().manual_seed(1)) > 0.3
        keep[..., 0] = True  # no fully masked row
    for dtype in (torch.float16, torch.bfloat16):
        q = torch.randn(b, hq, sq, d, device=dev, dtype=dtype, requires_grad=True)
        k = torch.randn(b, hkv, sk, d, device=dev, dtype=dtype, requires_grad=True)
        v = torch.randn(b, hkv, sk, d, device=dev, dtype=dtype, requires_grad=True)
        out = vbhal_kernel("attention")(q, k, v, causal=causal, attn_mask=None if keep is None else keep.to(dev))
        ref_in = [t.detach().cpu().double().requires_grad_() for t in (q, k, v)]
        from vbhal.backends.cpu.attention import reference_attention

        ref = reference_attention(*ref_in, causal=causal, attn_mask=keep)
        err = rel_err(out, ref)
        g = torch.randn_like(ref)
        out.backward(g.to(dev, dtype))
        ref.backward(g)
        gerr = max(rel_err(t.grad, r.grad) for t, r in zip((q, k, v), ref_in))
        tol, gtol = TOLERANCE[dtype], GRAD_TOLERANCE[dtype]
        record("attention", f"{name} {str(dtype)[6:]} forward", err, tol, err < tol)
        record("attention", f"{name} {str(dtype)[6:]} dq/dk/dv", gerr, gtol, gerr < gtol)
        assert err < tol and gerr < gtol, (name, dtype, err, gerr)


def test_npu_fully_masked_row_takes_the_reference(npu_device, vbhal_kernel, record):
    from vbhal.backends.cpu.attention import attention as cpu_attention

    dev = npu_device.device
    q, k, v = (torch.randn(1, 2, 8, 64, device=dev, dtype=torch.float16) for _ in range(3))
    keep = torch.ones(8, 8, dtype=torch.bool, device=dev)
    keep[3] = False
    before = sum(n for (kern, r), n in _runtime().FALLBACKS.items() if "every key" in r)
    out = vbhal_kernel("attention")(q, k, v, attn_mask=keep)
    after = sum(n for (kern, r), n in _runtime().FALLBACKS.items() if "every key" in r)
    exp = cpu_attention(q, k, v, attn_mask=keep)
    same = torch.equal(out.cpu().nan_to_num(), exp.cpu().nan_to_num()) and after == before + 1
    record("attention", "fully masked row -> reference path", "same" if same else "differs", "same", same)
    assert same


#: Packed document lengths: one longer than the 2048 x 2048 compressed causal mask, and single tokens.
PACKED_LENGTHS = [1, 130, 7, 2049, 64, 3]


@pytest.mark.parametrize("causal", [False, True])
def test_npu_packed_many_documents(npu_device, vbhal_kernel, record, causal):
    dev = npu_device.device
    lengths = PACKED_LENGTHS
    cu = torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist(), dtype=torch.int32)
    t = int(cu[-1])
    for dtype in (torch.float16, torch.bfloat16):
        q = torch.randn(t, 8, 64, device=dev, dtype=dtype)
        k = torch.randn(t, 2, 64, device=dev, dtype=dtype)
        v = torch.randn(t, 2, 64, device=dev, dtype=dtype)
        out = vbhal_kernel("attention")(q, k, v, causal=causal, cu_seqlens=cu.to(dev))
        err = rel_err(out, attention_reference(q, k, v, causal=causal, cu_seqlens=cu))
        tol = TOLERANCE[dtype]
        record("attention", f"TND {len(lengths)} docs {'causal' if causal else 'full'} {str(dtype)[6:]}", err, tol,
               err < tol)
        assert err < tol


def test_npu_native_fp4_on_950(npu_device, vbhal_kernel, record):
    if npu_device.capabilities.get("chip") != "950":
        pytest.skip("native MXFP4 (weight_dtype=float4_e2m1fn_x2) exists on the Ascend 950 only")
    from vbhal.backends.npu.fp4 import plan_fp4_linear

    dev = npu_device.device
    qw = formats.quantize(_weight(64, 128, seed=5), "mxfp4").to(dev)
    x = torch.randn(9, 128, device=dev, dtype=torch.bfloat16)
    assert plan_fp4_linear(x, qw)[0] == "native"
    y = vbhal_kernel("fp4_linear")(x, qw, None)
    ref = torch.nn.functional.linear(x.cpu().double(), qw.dequantize(torch.float64).cpu())
    err = rel_err(y, ref)
    tol = TOLERANCE[torch.bfloat16]
    record("fp4_linear", "native MXFP4 (950) bf16 forward", err, tol, err < tol)
    assert err < tol


def test_npu_zz_fallbacks_of_this_run(npu_device, record):
    """Last (by name): every reason an NPU kernel took the reference path in this run, with counts."""
    lines = _runtime().fallback_report()
    for line in lines:
        record("npu fallbacks", line, "-", "-", True)
    if not lines:
        record("npu fallbacks", "none: every call used a torch_npu op", "-", "-", True)
