"""The direct Triton launch path of the CUDA FP4 linear (fp4_linear._DirectLauncher): its specialization key and
hook check on CPU; on a GPU, that repeat calls take it and give the JIT front end's results bit for bit."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton", reason="triton is not installed")

from vbhal.backends.cuda import fp4_linear as L  # noqa: E402


def test_spec_key_separates_what_triton_specializes_on():
    base = torch.zeros(64, dtype=torch.float32)
    k = L._spec_key
    assert k((base, 1, 32)) == k((base.clone(), 1, 48))  # aligned tensors, 1, multiples of 16: one kernel
    assert k((base, 1, 32)) != k((base[1:], 1, 32))  # 4-byte offset: not 16-byte aligned
    assert k((base, 1, 32)) != k((base, 2, 32))  # 1 is specialized
    assert k((base, 1, 32)) != k((base, 1, 33))  # divisibility by 16
    assert k((base, 1, 32)) != k((base, 1, 1 << 33))  # 64-bit integers
    assert k((base, 1, 32)) != k((base.to(torch.float16), 1, 32))  # dtype


def test_launch_hooks_idle_only_when_none_or_empty_chain():
    class Chain:
        def __init__(self, calls):
            self.calls = calls

    assert L._idle(None) and L._idle(Chain([]))
    assert not L._idle(Chain([print])) and not L._idle(print)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (direct launches are off in the interpreter)")
@pytest.mark.parametrize("m", [1, 16])
def test_gpu_direct_launch_matches_jit_front_end(m):
    import vbhal.formats as VF

    g = torch.Generator(device="cuda").manual_seed(5)
    n, k = 1024 + 16, 2048 + 32
    qw = L.quantize_fp4((torch.randn(n, k, device="cuda", generator=g) * 0.02).to(torch.bfloat16), "mxfp4")
    wd = VF.dequantize(qw, torch.float32)
    codes, scales, ts, fid = L.qw_operands(qw)
    x = torch.randn(m, k, device="cuda", generator=g).to(torch.bfloat16)
    ys = []
    for direct in (False, True, True, True):
        L._DIRECT = direct
        try:
            ys.append(L._linear_2d(x, codes, scales, ts, None, fid, n, k, "auto"))
        finally:
            L._DIRECT = True
    run = L._PLANS[(L._m_bucket(m), n, k, fid, torch.bfloat16, True, x.get_device())]
    launcher = getattr(run, "launch", None)
    if launcher is not None:  # a Triton kernel path (not dequant + cuBLAS)
        assert launcher.direct and launcher.compiled, "repeat calls did not take the direct launch"
    for y in ys[1:]:
        assert torch.equal(y, ys[0])
    ref = x.float() @ wd.t()
    assert float((ys[-1].float() - ref).norm() / ref.norm()) < 1e-2
