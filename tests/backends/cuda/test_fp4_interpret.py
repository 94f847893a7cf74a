"""vbhal's Triton FP4 kernels (quantize, dequantize, fused linear) under the Triton interpreter (CPU).

The kernels only run on CPU under ``TRITON_INTERPRET=1``, which must be set before triton is imported,
so ``test_interpreter_suite`` re-runs this file in a subprocess with it set; inside that subprocess the
other tests run (outside they are skipped with that reason). Codecs are checked bit for bit against
vbhal.formats (the reference); the linear against a float64 matmul of the reference-dequantized
weight. Activations fp16/fp32 only: the interpreter's tl.dot and its float32->bfloat16 cast (it
truncates) are wrong for bf16, which test_fp4_gpu.py checks on the GPU. Every kernel output buffer is
allocated filled with garbage (POISON_OUTPUTS), so an unwritten element fails the comparison.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from interpreter_run import run_file_under_interpreter

INTERP = os.environ.get("TRITON_INTERPRET") == "1"
_K = None  # vbhal.backends.cuda.fp4_kernels, set by test_packed_decode_bit_patterns for its probe kernel
ROOT = Path(__file__).resolve().parents[3]
kernel = pytest.mark.skipif(not INTERP, reason="kernel tests run under TRITON_INTERPRET=1 via test_interpreter_suite")

# max |error| of the linear, as a fraction of max(1, max |reference|): output rounding of the dtype
# plus float32 accumulation over K (the reference is float64)
TOL = {torch.float32: 2e-5, torch.float16: 2e-3}


@pytest.mark.interpreter
@pytest.mark.skipif(os.environ.get("VBHAL_SKIP_INTERPRET") == "1", reason="VBHAL_SKIP_INTERPRET=1 (GPU run)")
def test_interpreter_suite():
    run_file_under_interpreter(__file__)


def test_import_does_not_import_triton():
    """The CUDA plugin imports fp4_linear to read KERNELS; that must not import triton (nor run a kernel)."""
    code = ("import sys; import vbhal.backends.cuda.fp4_linear as L; "
            "assert 'triton' not in sys.modules, 'triton imported'; "
            "assert sorted(L.KERNELS) == ['dequantize_fp4', 'fp4_linear', 'quantize_fp4'], sorted(L.KERNELS); "
            "import torch; assert hasattr(torch.ops.vbhal, 'fp4_linear_cuda'); print('ok')")
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env.pop("TRITON_INTERPRET", None)
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and proc.stdout.strip().endswith("ok"), proc.stdout + proc.stderr


@pytest.fixture(autouse=True)
def _poison_outputs():
    if not INTERP:
        yield
        return
    from vbhal.backends.cuda import fp4_quantize as Q

    Q.POISON_OUTPUTS = True
    yield


def _weight(n: int, k: int, dtype=torch.float32, seed: int = 0) -> torch.Tensor:
    """Gaussian rows with a wide dynamic range across K (1e-3 .. 1e3), plus special blocks: an all-zero
    block, a block of exact E2M1 ties (after FLOOR scaling by 1), negative zeros and tiny values."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g) * torch.logspace(-3, 3, k)[torch.randperm(k, generator=g)]
    if k >= 32 and n >= 3:
        w[0, :32] = 0.0
        ties = torch.tensor([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, 7.0] * 4)
        w[1, :32] = ties * torch.where(torch.arange(32) % 3 == 0, -1.0, 1.0)  # amax 7 -> scale 1
        w[2, :16] = -0.0
        w[2, 16:32] = torch.randn(16, generator=g) * 1e-30
    return w.to(dtype)


def _same_bytes(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.shape == b.shape and torch.equal(a.view(torch.uint8), b.view(torch.uint8))


CODEC_CASES = [("mxfp4", "floor"), ("mxfp4", "rceil"), ("nvfp4", "floor")]


@kernel
@pytest.mark.parametrize("fmt,rule", CODEC_CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", [(7, 96), (5, 70), (3, 16)])
def test_quantize_bit_exact_with_reference(fmt, rule, dtype, shape):
    import vbhal.formats as VF
    from vbhal.backends.cuda.fp4_quantize import quantize_fp4

    w = _weight(*shape, dtype=dtype, seed=shape[0])
    got = quantize_fp4(w, fmt, scale_rule=rule)
    ref = VF.quantize(w, fmt, scale_rule=rule)
    assert _same_bytes(got.codes, ref.codes)
    assert got.scales.dtype == ref.scales.dtype and _same_bytes(got.scales, ref.scales)
    if fmt == "nvfp4":
        assert torch.equal(got.tensor_scale, ref.tensor_scale)
    else:
        assert got.tensor_scale is None
    assert (got.fmt, got.shape, got.orig_dtype, got.scale_rule) == (ref.fmt, ref.shape, ref.orig_dtype, ref.scale_rule)


@kernel
def test_quantize_nvfp4_given_tensor_scale():
    import vbhal.formats as VF
    from vbhal.backends.cuda.fp4_quantize import quantize_fp4

    w = _weight(4, 64)
    ts = torch.tensor(0.37)
    got = quantize_fp4(w, "nvfp4", tensor_scale=ts)
    ref = VF.quantize(w, "nvfp4", tensor_scale=ts)
    assert _same_bytes(got.codes, ref.codes) and _same_bytes(got.scales, ref.scales)
    assert torch.equal(got.tensor_scale, ref.tensor_scale)


@kernel
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_nvfp4_tensor_scale_amax_kernel(dtype):
    """The one-pass amax kernel (contiguous weights; more elements than one program's block, so several
    programs combine by atomic max) and the inf-norm fallback (a column slice, not contiguous) both give
    the reference's tensor scale, for mixed signs, a negative maximum, and an all-zero weight (the floor)."""
    from vbhal.backends.cuda.fp4_quantize import nvfp4_tensor_scale_gpu
    from vbhal.formats.nvfp4 import nvfp4_tensor_scale

    g = torch.Generator().manual_seed(11)
    w = torch.randn(97, 200, generator=g).to(dtype)  # 19,400 elements: 3 programs of 8192
    neg = w.clone()
    neg[50, 3] = -7.5  # the largest magnitude is negative, in the middle program
    for t in (w, neg, torch.zeros(5, 7, dtype=dtype), w[:, 10:150]):
        got, want = nvfp4_tensor_scale_gpu(t), nvfp4_tensor_scale(t)
        assert got.dtype == torch.float32 and got.shape == ()
        assert torch.equal(got, want), (t.shape, t.is_contiguous(), got, want)
    assert nvfp4_tensor_scale_gpu(neg) == torch.tensor(7.5) / 2688


@kernel
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_quantize_refuses_nan_inf(bad):
    from vbhal.backends.cuda.fp4_quantize import quantize_fp4
    from vbhal.errors import QuantizationError

    w = _weight(4, 64)
    w[3, 50] = bad
    for fmt in ("mxfp4", "nvfp4"):
        with pytest.raises(QuantizationError, match="NaN"):
            quantize_fp4(w, fmt)


@kernel
def test_quantize_bad_input_messages():
    from vbhal.backends.cuda.fp4_quantize import quantize_fp4
    from vbhal.errors import QuantizationError

    with pytest.raises(QuantizationError, match="2-D"):
        quantize_fp4(torch.randn(2, 3, 32), "mxfp4")
    with pytest.raises(QuantizationError, match="int32"):
        quantize_fp4(torch.ones(4, 32, dtype=torch.int32), "mxfp4")
    with pytest.raises(QuantizationError, match="unknown FP4 format"):
        quantize_fp4(torch.randn(4, 32), "int4")
    with pytest.raises(QuantizationError, match="scale rule"):
        quantize_fp4(torch.randn(4, 32), "mxfp4", scale_rule="up")
    with pytest.raises(QuantizationError, match="single block-scale rule"):
        quantize_fp4(torch.randn(4, 32), "nvfp4", scale_rule="rceil")


@kernel
@pytest.mark.parametrize("fmt,rule", CODEC_CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_dequantize_bit_exact_with_reference(fmt, rule, dtype):
    import vbhal.formats as VF
    from vbhal.backends.cuda.fp4_quantize import dequantize_fp4

    ref = VF.quantize(_weight(6, 80, seed=3), fmt, scale_rule=rule)
    got = dequantize_fp4(ref, dtype)
    want = ref.dequantize(dtype)
    assert got.dtype == dtype and got.shape == (6, 80)
    assert _same_bytes(got, want)


@kernel
def test_dequantize_special_scale_bytes():
    """E8M0 code 0 (2^-127, a float32 subnormal) and 0xFF (NaN); E4M3 subnormal scales and NaN."""
    import vbhal.formats as VF
    from vbhal.backends.cuda.fp4_quantize import dequantize_fp4

    g = torch.Generator().manual_seed(5)
    codes = torch.randint(0, 256, (2, 32), generator=g, dtype=torch.uint8)
    s_mx = torch.tensor([[0, 1, 127, 255], [254, 200, 100, 3]], dtype=torch.uint8).view(torch.float8_e8m0fnu)
    codes_mx = torch.randint(0, 256, (2, 64), generator=g, dtype=torch.uint8)
    qmx = VF.QuantizedWeight(codes_mx, s_mx, None, "mxfp4", (2, 128))
    s_nv = torch.tensor([[0, 1, 7, 8], [0x7F, 0x7E, 0x40, 0x3A]], dtype=torch.uint8).view(torch.float8_e4m3fn)
    qnv = VF.QuantizedWeight(codes, s_nv, torch.tensor(0.5), "nvfp4", (2, 64))
    for q in (qmx, qnv):
        got, want = dequantize_fp4(q, torch.float32), q.dequantize(torch.float32)
        assert torch.equal(torch.isnan(got), torch.isnan(want))
        assert torch.equal(torch.nan_to_num(got), torch.nan_to_num(want))


def _operands(qw):
    from vbhal.backends.cuda.fp4_quantize import qw_operands

    return qw_operands(qw)


def _check_linear(y, x, qw, bias):
    ref = torch.nn.functional.linear(x.double(), qw.dequantize(torch.float64),
                                     None if bias is None else bias.double())
    assert y.dtype == x.dtype and y.shape == ref.shape
    assert not torch.isnan(y).any(), "unwritten (poisoned) or NaN outputs"
    err = (y.double() - ref).abs().max().item()
    assert err <= TOL[x.dtype] * max(1.0, ref.abs().max().item()), err


@kernel
@pytest.mark.parametrize("fmt", ["mxfp4", "nvfp4"])
@pytest.mark.parametrize("path,dtype", [("gemv", torch.float32), ("gemv", torch.float16), ("gemv_w32", torch.float32),
                                        ("gemv_w32", torch.float16), ("gemv_pf", torch.float16), ("gemv_mr", torch.float32), ("gemv_mr", torch.float16),
                                        ("mm_w32", torch.float16),
                                        ("mm_t", torch.float16), ("mm_p", torch.float16), ("mm_pt", torch.float16),
                                        ("dequant", torch.float32), ("dequant", torch.float16)])
@pytest.mark.parametrize("m", [1, 3, 19])
def test_linear_paths_match_reference(fmt, path, dtype, m):
    import vbhal.formats as VF
    from vbhal.backends.cuda import fp4_linear as L

    n, k = 21, 100  # N not a multiple of any tile, K not a multiple of the block (padded)
    qw = VF.quantize(_weight(n, k, seed=m) * 1e-2, fmt)
    g = torch.Generator().manual_seed(m)
    x = torch.randn(m, k, generator=g).to(dtype)
    bias = torch.randn(n, generator=g).to(dtype)
    codes, scales, ts, fid = _operands(qw)
    for b in (bias, None):
        y = L._linear_2d(x, codes, scales, ts, b, fid, n, k, path)
        _check_linear(y, x, qw, b)


@kernel
@pytest.mark.parametrize("fmt", ["mxfp4", "nvfp4"])
def test_linear_gemv_split_k(fmt):
    """Split-K (float32 atomics into a zeroed buffer): the sums of the parts equal the whole."""
    import vbhal.formats as VF
    from vbhal.backends.cuda import fp4_linear as L

    n, k = 9, 300
    qw = VF.quantize(_weight(n, k, seed=11) * 1e-2, fmt)
    x = torch.randn(2, k, dtype=torch.float16)
    bias = torch.randn(n, dtype=torch.float16)
    codes, scales, ts, fid = _operands(qw)
    for split in (2, 3):
        for path in ("gemv", "gemv_w32", "gemv_pf"):
            y = L._linear_2d(x, codes, scales, ts, bias, fid, n, k, path, split_k=split)
            _check_linear(y, x, qw, bias)


@kernel
def test_gemv_split_override_wins_over_a_configs_split():
    """A GEMV runner given split_k launches that split even when its config fixes another (a tuned GEMV
    config may carry SPLIT_K; session 7's review: _linear_2d(..., split_k=1) could launch split 2)."""
    import vbhal.formats as VF
    from vbhal.backends.cuda import fp4_linear as L

    n, k = 9, 320
    qw = VF.quantize(_weight(n, k, seed=17) * 1e-2, "mxfp4")
    codes, scales, ts, _fid = _operands(qw)
    x = torch.randn(2, k, dtype=torch.float16)
    for split in (1, 3):
        run = L._KernelLaunch("gemv_pf", n, k, "mxfp4", False, config={**L._INTERP_CONFIGS["gemv_pf"], "SPLIT_K": 2},
                              split=split)
        y = run(x, codes, scales, ts, None)
        _check_linear(y, x, qw, None)
        (launched, _grid, consts), = run.per_m.values()
        assert launched == split and consts["SPLIT_K"] == split, (split, launched, consts["SPLIT_K"])


def _workspaces_are_zero():
    from vbhal.backends.cuda import fp4_linear as L

    return bool(L._WORKSPACES) and all(not ws.any() for ws in L._WORKSPACES.values())


@kernel
@pytest.mark.parametrize("fmt", ["mxfp4", "nvfp4"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_linear_gemv_mr_tiles_and_splits(fmt, dtype):
    """The multi-row GEMV over several M tiles, N tiles and K splits (a split with no K blocks left
    included), called twice in a row: the split-K workspace must be zero again after every call
    (_finalize resets it), or the second call would be wrong."""
    import vbhal.formats as VF
    from vbhal.backends.cuda import fp4_linear as L

    n, k, m = 19, 224, 7  # 7 mxfp4 blocks: split 4 x NBK 2 leaves the last split empty
    qw = VF.quantize(_weight(n, k, seed=9) * 1e-2, fmt)
    codes, scales, ts, fid = _operands(qw)
    g = torch.Generator().manual_seed(9)
    for bm, split in ((4, 4), (2, 3), (8, 1)):
        cfg = {"BLOCK_N": 8, "NBK": 2, "BLOCK_M": bm, "SPLIT_K": split}
        for rep in range(2):
            x = torch.randn(m, k, generator=g).to(dtype)
            bias = torch.randn(n, generator=g).to(dtype) if rep == 0 else None
            y = L._linear_2d(x, codes, scales, ts, bias, fid, n, k, "gemv_mr", config=cfg)
            _check_linear(y, x, qw, bias)
            assert split == 1 or _workspaces_are_zero(), (bm, split, rep)


@kernel
def test_split_k_workspace_survives_many_calls():
    """The same workspace serves gemv, gemv_mr, mm_t and mm_w32 split-K calls of different shapes back to
    back (split kernels add into it, _finalize writes y and zeroes it)."""
    import vbhal.formats as VF
    from vbhal.backends.cuda import fp4_linear as L

    g = torch.Generator().manual_seed(3)
    for n, k, m in ((9, 300, 2), (33, 96, 5), (16, 64, 1)):
        qw = VF.quantize(torch.randn(n, k, generator=g) * 1e-2, "mxfp4")
        codes, scales, ts, fid = _operands(qw)
        x = torch.randn(m, k, generator=g).to(torch.float16)
        bias = torch.randn(n, generator=g).to(torch.float16)
        for path in ("gemv_w32", "gemv_pf", "gemv_mr", "mm_t", "mm_w32", "mm_p", "mm_pt"):
            for b in (None, bias):
                y = L._linear_2d(x, codes, scales, ts, b, fid, n, k, path, split_k=2)
                _check_linear(y, x, qw, b)
                assert _workspaces_are_zero(), (n, k, m, path)


@kernel
@pytest.mark.parametrize("fmt", ["mxfp4", "nvfp4"])
def test_fp4linear_with_cuda_kernels_eager_fast_path(fmt):
    """FP4Linear bound to the CUDA kernels: the eager path (from_operands, no custom op) with and
    without autograd, the traced path (custom op, under a dispatch mode) and the reference give the
    same outputs; input and bias gradients equal those of the float64 reference."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from vbhal.backends.cuda import fp4_linear as L
    from vbhal.nn import FP4Linear

    torch.manual_seed(0)
    lin = torch.nn.Linear(96, 24)
    kernels = {"fp4_linear": L.fp4_linear, "dequantize_fp4": L.dequantize_fp4}
    q = FP4Linear.from_linear(lin, fmt, kernels=kernels)
    assert q._fast is L._from_operands
    x = torch.randn(2, 3, 96, requires_grad=True)
    y = q(x)
    gy = torch.randn_like(y)
    y.backward(gy)
    w64 = q.dequantized_weight(torch.float64)
    ref = torch.nn.functional.linear(x.detach().double(), w64, q.bias.detach().double())
    assert torch.allclose(y.double(), ref, atol=1e-5, rtol=1e-5)
    assert torch.allclose(x.grad.double(), gy.double() @ w64, atol=1e-5, rtol=1e-5)
    assert torch.allclose(q.bias.grad.double(), gy.double().sum((0, 1)), atol=1e-5, rtol=1e-5)
    with torch.no_grad():
        y_ng = q(x)
    assert not y_ng.requires_grad and torch.allclose(y_ng, y.detach(), atol=1e-6, rtol=1e-6)

    seen = []

    class Passthrough(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            seen.append(str(func))
            return func(*args, **(kwargs or {}))

    with torch.no_grad(), Passthrough():
        y_op = q(x)
    assert any("fp4_linear" in o for o in seen), seen
    assert torch.allclose(y_op, y.detach(), atol=1e-6, rtol=1e-6)


@kernel
def test_linear_mm_multi_tile_config():
    """Several M and N tiles and several K steps with a grouped tile order."""
    import vbhal.formats as VF
    from vbhal.backends.cuda import fp4_linear as L

    n, k, m = 40, 160, 35
    qw = VF.quantize(_weight(n, k, seed=2) * 1e-2, "mxfp4")
    x = torch.randn(m, k, dtype=torch.float16)
    codes, scales, ts, fid = _operands(qw)
    cfg = {"BLOCK_M": 16, "BLOCK_N": 16, "NBK": 1, "GROUP_M": 2}
    y = L._linear_2d(x, codes, scales, ts, None, fid, n, k, "mm_w32", config={**cfg, "SPLIT_K": 1})
    _check_linear(y, x, qw, None)
    # both kernels: direct tiles, and split-K into the float32 workspace + _finalize, with and without
    # bias, workspace zero afterwards
    bias = torch.randn(n, dtype=torch.float16)
    for path in ("mm_t", "mm_w32", "mm_p", "mm_pt"):
        for split in (1, 3):
            for b in (None, bias):
                y = L._linear_2d(x, codes, scales, ts, b, fid, n, k, path, config={**cfg, "SPLIT_K": split})
                _check_linear(y, x, qw, b)
                assert split == 1 or _workspaces_are_zero(), (path, split)


@kernel
def test_split_k_finalize_alone():
    """_finalize: y = ws (+ bias) cast, ws zeroed, on a poisoned y whose row stride is wider than N (every
    element written, nothing outside the (M, N) view touched)."""
    from vbhal.backends.cuda import fp4_linear as L

    m, n = 5, 700
    ws = torch.randn(m * n + 7)  # longer than needed, as a grown shared workspace is
    tail = ws[m * n:].clone()
    bias = torch.randn(n, dtype=torch.float16)
    for b in (bias, None):
        want = ws[: m * n].view(m, n).clone()
        big = torch.full((m, n + 3), float("nan"), dtype=torch.float16)
        y = big[:, :n]
        L._finalize(ws, b, y)
        ref = want + (b.float() if b is not None else 0.0)
        assert torch.equal(y, ref.to(torch.float16))
        assert torch.isnan(big[:, n:]).all()
        assert not ws[: m * n].any() and torch.equal(ws[m * n:], tail)
        ws[: m * n] = torch.randn(m * n)


@kernel
@pytest.mark.parametrize("fmt", ["mxfp4", "nvfp4"])
def test_fp4_linear_public_api_and_grads(fmt):
    """fp4_linear on (batch, seq, K) input; grads w.r.t. x and bias equal those of F.linear with the
    reference-dequantized weight."""
    import vbhal.formats as VF
    from vbhal.backends.cuda.fp4_linear import fp4_linear

    n, k = 12, 64
    qw = VF.quantize(_weight(n, k, seed=4) * 1e-2, fmt)
    x = torch.randn(2, 3, k, dtype=torch.float32, requires_grad=True)
    bias = torch.randn(n, dtype=torch.float32, requires_grad=True)
    y = fp4_linear(x, qw, bias)
    assert y.shape == (2, 3, n)
    gy = torch.randn_like(y)
    y.backward(gy)
    xr = x.detach().double().requires_grad_()
    br = bias.detach().double().requires_grad_()
    yr = torch.nn.functional.linear(xr, qw.dequantize(torch.float64), br)
    yr.backward(gy.double())
    assert torch.allclose(y.double(), yr, atol=1e-5, rtol=1e-5)
    assert torch.allclose(x.grad.double(), xr.grad, atol=1e-5, rtol=1e-5)
    assert torch.allclose(bias.grad.double(), br.grad, atol=1e-5, rtol=1e-5)


@kernel
def test_fp4_linear_bad_inputs():
    import vbhal.formats as VF
    from vbhal.backends.cuda.fp4_linear import fp4_linear
    from vbhal.errors import KernelError

    qw = VF.quantize(torch.randn(8, 64), "mxfp4")
    with pytest.raises(KernelError, match=r"\(\.\.\., 64\)"):
        fp4_linear(torch.randn(2, 63), qw)
    with pytest.raises(KernelError, match="int64"):
        fp4_linear(torch.ones(2, 64, dtype=torch.int64), qw)
    with pytest.raises(KernelError, match="bias"):
        fp4_linear(torch.randn(2, 64), qw, torch.randn(9))
    with pytest.raises(KernelError, match="QuantizedWeight"):
        fp4_linear(torch.randn(2, 64), torch.randn(8, 64))


@kernel
def test_custom_op_opcheck():
    """Schema, fake (meta) implementation and autograd registration are consistent (torch.library.opcheck)."""
    import vbhal.formats as VF
    from vbhal.backends.cuda import fp4_linear  # noqa: F401  registers the ops

    qw = VF.quantize(torch.randn(8, 64), "nvfp4")
    codes, scales, ts, fid = _operands(qw)
    x = torch.randn(3, 64, dtype=torch.float16, requires_grad=True)
    b = torch.randn(8, dtype=torch.float16, requires_grad=True)
    tests = ("test_schema", "test_autograd_registration", "test_faketensor")
    torch.library.opcheck(torch.ops.vbhal.fp4_linear_cuda.default, (x, codes, scales, ts, b, fid, 8, 64), test_utils=tests)
    torch.library.opcheck(torch.ops.vbhal.dequantize_fp4_cuda.default, (codes, scales, ts, fid, 64, torch.float16),
                          test_utils=tests)


def test_candidates_leave_gemv_mr_out_above_one_row():
    """gemv_mr measured 730-1370 us at M = 8..16 on the H100 (R5): timed at M = 1 only; every candidate
    list and the static (capture) choice name existing paths."""
    from vbhal.backends.cuda import fp4_linear as L

    for dtype in (torch.bfloat16, torch.float16, torch.float32):
        assert "gemv_mr" in L._candidates(1, dtype)
        for m in (2, 4, 8, 16, 64, 1024):
            assert "gemv_mr" not in L._candidates(m, dtype), (m, dtype)
            assert L._static_path(m, dtype) != "gemv_mr"
        for m in (1, 2, 4, 8, 16, 64, 256, 1024, 4096):
            assert set(L._candidates(m, dtype)) <= set(L.PATHS) and L._static_path(m, dtype) in L.PATHS
            if dtype == torch.float32:  # tl.dot on fp32 would be TF32
                assert not any(p.startswith("mm") for p in L._candidates(m, dtype) + (L._static_path(m, dtype),))


@kernel
@pytest.mark.parametrize("fmt", ["mxfp4", "nvfp4"])
def test_packed_paths_even_k_and_clamped_rows(fmt):
    """mm_p / mm_pt without K masks (EVEN_K: every split's blocks whole NBK steps, K filling the last
    block) and with them, N and M not multiples of the tiles (loads clamp to the last row, stores are
    masked), split-K and not. The float16 (float32-decode) variant: the interpreter cannot multiply
    bfloat16 (test_fp4_gpu.py runs the packed one)."""
    import vbhal.formats as VF
    from vbhal.backends.cuda import fp4_linear as L

    n, k = 37, 256
    qw = VF.quantize(_weight(n, k, seed=9) * 1e-2, fmt)
    codes, scales, ts, fid = _operands(qw)
    g = torch.Generator().manual_seed(9)
    bias = torch.randn(n, generator=g).to(torch.float16)
    cfg = {"BLOCK_M": 16, "BLOCK_N": 16, "NBK": 2 if fmt == "mxfp4" else 4, "GROUP_M": 2}
    for m in (1, 17):
        x = torch.randn(m, k, generator=g).to(torch.float16)
        for path in ("mm_p", "mm_pt"):
            for split in (1, 2, 3):  # whole NBK steps in every split (EVEN_K), 3 with an empty last split
                y = L._linear_2d(x, codes, scales, ts, bias, fid, n, k, path, config={**cfg, "SPLIT_K": split})
                _check_linear(y, x, qw, bias)
    run = L._RUNNERS[("mm_p", n, k, fid, True, tuple(sorted({**cfg, "SPLIT_K": 2}.items())), None, None,
                      torch.float16, 32, -1)]
    assert any(c["EVEN_K"] for _s, _g, c in run.per_m.values())
    assert not any(c["PACKED"] for _s, _g, c in run.per_m.values())  # interpreter: the float32 decode
    # K = 250 does not fill the last block: the masked loop
    k2 = 250
    qw2 = VF.quantize(_weight(n, k2, seed=10) * 1e-2, fmt)
    codes2, scales2, ts2, fid2 = _operands(qw2)
    x2 = torch.randn(5, k2, generator=g).to(torch.float16)
    for path in ("mm_p", "mm_pt"):
        y = L._linear_2d(x2, codes2, scales2, ts2, bias, fid2, n, k2, path, config={**cfg, "SPLIT_K": 2})
        _check_linear(y, x2, qw2, bias)
        run2 = L._RUNNERS[(path, n, k2, fid2, True, tuple(sorted({**cfg, "SPLIT_K": 2}.items())), None, None,
                           torch.float16, 8, -1)]
        assert not any(c["EVEN_K"] for _s, _g, c in run2.per_m.values())


@kernel
def test_packed_decode_bit_patterns():
    """The packed decode's integer part: _e2m1_pair_bf16 gives, for every code in every nibble position,
    the bfloat16 bits of E2M1_value * 2^-126 (elements P and P + 4 in the low / high half), and
    _scale_bf16 the bfloat16 bits of 2^(s - 127) for every E8M0 byte (0 -> subnormal, 255 -> NaN).
    (The bfloat16 multiplies that follow run on the GPU: test_fp4_gpu.py.)"""
    import triton
    import triton.language as tl

    from vbhal.backends.cuda import fp4_kernels
    from vbhal.formats.e2m1 import decode_e2m1

    global _K  # a @triton.jit body resolves names in the module's globals
    _K = fp4_kernels

    @triton.jit
    def probe(w_ptr, h_ptr, s_ptr, sb_ptr):
        i = tl.arange(0, 256)
        w = tl.load(w_ptr + i)
        for p in tl.static_range(4):
            tl.store(h_ptr + 256 * p + i, _K._e2m1_pair_bf16(w, p))
        tl.store(sb_ptr + i, _K._scale_bf16(tl.load(s_ptr + i).to(tl.uint8), False))

    g = torch.Generator().manual_seed(4)
    words = torch.randint(-2**31, 2**31 - 1, (256,), dtype=torch.int64, generator=g).to(torch.int32)
    words[:16] = torch.tensor([int.from_bytes(bytes([c | (c << 4)] * 4), "little") for c in range(16)],
                              dtype=torch.int64).to(torch.int32)  # every code in every position
    h = torch.empty(4, 256, dtype=torch.int32)
    sbits = torch.empty(256, dtype=torch.bfloat16)
    probe[(1,)](words, h, torch.arange(256, dtype=torch.int32), sbits)
    nib = torch.stack([(words.to(torch.int64) >> (4 * j)) & 0xF for j in range(8)], 1)  # [256, 8] codes
    val = decode_e2m1(nib.to(torch.uint8), torch.float64) * 2.0 ** -126
    bits = val.to(torch.bfloat16).view(torch.int16).to(torch.int64) & 0xFFFF
    for p in range(4):
        got = h[p].to(torch.int64) & 0xFFFFFFFF
        assert torch.equal(got & 0xFFFF, bits[:, p]), p
        assert torch.equal(got >> 16, bits[:, p + 4]), p
    ref = (2.0 ** (torch.arange(256, dtype=torch.float64) - 127)).to(torch.bfloat16)
    assert torch.equal(sbits[:255].view(torch.int16), ref[:255].view(torch.int16))
    assert torch.isnan(sbits[255])


@kernel
@pytest.mark.parametrize("path", ["gemv", "gemv_w32", "gemv_pf", "gemv_mr", "dequant"])
def test_linear_huge_block_scales(path):
    """E8M0 scale bytes 241..254 (blocks beyond 2^113, still finite float32 values): session 6 found the
    GEMVs' folded factor (scale * 2^14) overflowing to inf there; _block_factors splits it. (The
    tensor-core paths need bfloat16 for such weights: test_fp4_gpu.py.)"""
    import vbhal.formats as VF
    from vbhal.backends.cuda import fp4_linear as L

    n, k = 8, 64
    g = torch.Generator().manual_seed(12)
    w = torch.randn(n, k, generator=g)
    w[:, :32] *= 2.0 ** 118  # block 0 of every row: scale bytes ~ 243
    qw = VF.quantize(w, "mxfp4")
    assert int(qw.scales.view(torch.uint8)[:, 0].min()) > 240
    codes, scales, ts, fid = _operands(qw)
    x = (torch.randn(1, k, generator=g) * 2.0 ** -120).to(torch.float32)
    y = L._linear_2d(x, codes, scales, ts, None, fid, n, k, path)
    ref = torch.nn.functional.linear(x.double(), qw.dequantize(torch.float64))
    assert torch.isfinite(y).all()
    assert ((y.double() - ref).abs() <= 1e-5 * ref.abs().max()).all()


@kernel
def test_split_k_workspace_zero_after_a_bias_that_requires_grad():
    """A split-K call through the private entry point with a bias that requires grad (the public ones go
    through autograd.Function): the finalize takes the bias detached, so nothing raises, and the shared
    workspace is zero afterwards (review of session 6: out= refused such a bias after the split kernel
    had written the workspace, and the next split-K call was wrong)."""
    import vbhal.formats as VF
    from vbhal.backends.cuda import fp4_linear as L

    n, k = 16, 64
    qw = VF.quantize(_weight(n, k, seed=13) * 1e-2, "mxfp4")
    codes, scales, ts, fid = _operands(qw)
    x = torch.randn(3, k).to(torch.float16)
    bias = torch.randn(n).to(torch.float16).requires_grad_()
    for path in ("mm_p", "gemv_pf"):
        y = L._linear_2d(x, codes, scales, ts, bias, fid, n, k, path, split_k=2)
        _check_linear(y, x, qw, bias.detach())
        assert _workspaces_are_zero(), path
