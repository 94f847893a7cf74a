"""vbhal's Triton FP4 kernels on a CUDA GPU at real sizes, bfloat16 included (skipped without a GPU).

Codecs bit for bit against vbhal.formats computed on the same GPU; the fused linear (every path, and
the automatic choice) against an fp32 cuBLAS matmul of the reference-dequantized weight; gradients.
Outputs are poisoned (NaN / 0xA5) before every kernel run.
"""

from __future__ import annotations

import pytest
import torch

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (kernels run on the H100 rounds)")]

# relative Frobenius error of the output vs an fp32 reference of the same quantized weight:
# bf16 output rounding (2^-9) dominates; fp16 2^-11
REL_TOL = {torch.bfloat16: 6e-3, torch.float16: 2e-3, torch.float32: 1e-5}
_K = None  # vbhal.backends.cuda.fp4_kernels, for test_gpu_packed_decode_bit_exact's probe kernel


@pytest.fixture(autouse=True)
def _poison():
    from vbhal.backends.cuda import fp4_quantize as Q

    Q.POISON_OUTPUTS = True
    yield
    Q.POISON_OUTPUTS = False


def _same_bytes(a, b):
    return a.shape == b.shape and torch.equal(a.view(torch.uint8), b.view(torch.uint8))


def _rel(a, b):
    return float((a.float() - b.float()).norm() / b.float().norm())


@pytest.mark.parametrize("fmt,rule", [("mxfp4", "floor"), ("mxfp4", "rceil"), ("nvfp4", "floor")])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32, torch.float16])
def test_gpu_quantize_dequantize_bit_exact(fmt, rule, dtype):
    import vbhal.formats as VF
    from vbhal.backends.cuda.fp4_quantize import dequantize_fp4, quantize_fp4

    g = torch.Generator(device="cuda").manual_seed(0)
    n, k = 4096, 4096 + 80  # K not a multiple of 32: padded tail
    scale = torch.logspace(-4, 2, k, device="cuda")[torch.randperm(k, device="cuda", generator=g)]
    w = (torch.randn(n, k, device="cuda", generator=g) * scale).to(dtype)
    got = quantize_fp4(w, fmt, scale_rule=rule)
    ref = VF.quantize(w, fmt, scale_rule=rule)
    assert _same_bytes(got.codes, ref.codes)
    assert _same_bytes(got.scales, ref.scales)
    if fmt == "nvfp4":
        assert torch.equal(got.tensor_scale, ref.tensor_scale)
    for out in (torch.bfloat16, torch.float32, torch.float16):
        assert _same_bytes(dequantize_fp4(ref, out), ref.dequantize(out)), out


MM_CONFIGS = {  # fixed tiles (the autotuned choice is checked by "auto"): (path, config)
    "mm16": ("mm_w32", {"BLOCK_M": 16, "BLOCK_N": 64, "NBK": 4, "GROUP_M": 8, "num_warps": 4, "num_stages": 3}),
    "t16": ("mm_t", {"BLOCK_M": 16, "BLOCK_N": 64, "NBK": 4, "GROUP_M": 8, "SPLIT_K": 4, "num_warps": 4,
                     "num_stages": 4}),
    "t128": ("mm_t", {"BLOCK_M": 128, "BLOCK_N": 128, "NBK": 2, "GROUP_M": 8, "SPLIT_K": 1, "num_warps": 8,
                      "num_stages": 3}),
    "p16": ("mm_p", {"BLOCK_M": 16, "BLOCK_N": 128, "NBK": 4, "GROUP_M": 8, "SPLIT_K": 2, "num_warps": 4,
                     "num_stages": 4}),
    "pt64": ("mm_pt", {"BLOCK_M": 64, "BLOCK_N": 128, "NBK": 4, "GROUP_M": 8, "SPLIT_K": 4, "num_warps": 4,
                       "num_stages": 4}),
    "pt128": ("mm_pt", {"BLOCK_M": 128, "BLOCK_N": 128, "NBK": 2, "GROUP_M": 8, "SPLIT_K": 1, "num_warps": 8,
                        "num_stages": 3}),
}


@pytest.mark.parametrize("fmt", ["mxfp4", "nvfp4"])
@pytest.mark.parametrize("path,dtype", [("auto", torch.bfloat16), ("gemv", torch.bfloat16), ("gemv_w32", torch.bfloat16),
                                        ("gemv_w32", torch.float16), ("gemv_pf", torch.bfloat16), ("gemv_mr", torch.bfloat16),
                                        ("gemv_mr", torch.float16), ("mm16", torch.bfloat16),
                                        ("t16", torch.bfloat16),
                                        ("t128", torch.bfloat16), ("t16", torch.float16), ("p16", torch.bfloat16),
                                        ("pt64", torch.bfloat16), ("pt128", torch.bfloat16), ("pt64", torch.float16),
                                        ("p16", torch.float16), ("dequant", torch.bfloat16),
                                        ("dequant_pipelined", torch.bfloat16)])
def test_gpu_linear_paths(fmt, path, dtype):
    import vbhal.formats as VF
    from vbhal.backends.cuda import fp4_linear as L

    g = torch.Generator(device="cuda").manual_seed(1)
    n, k = 4096 + 48, 4096 + 32
    w = torch.randn(n, k, device="cuda", generator=g) * 0.02
    qw = L.quantize_fp4(w.to(torch.bfloat16), fmt)
    wd = VF.dequantize(qw, torch.float32)
    bias = torch.randn(n, device="cuda", generator=g).to(dtype)
    codes, scales, ts, fid = L.qw_operands(qw)
    kpath, cfg = MM_CONFIGS.get(path, (path, None))
    for m in (1, 3, 16, 300, 1024):
        x = torch.randn(m, k, device="cuda", generator=g).to(dtype)
        y = L._linear_2d(x, codes, scales, ts, bias, fid, n, k, kpath, config=cfg)
        ref = torch.nn.functional.linear(x.float(), wd, bias.float())
        assert y.dtype == dtype and not torch.isnan(y).any()
        assert _rel(y, ref) < REL_TOL[dtype], (m, _rel(y, ref))


@pytest.mark.parametrize("fmt", ["mxfp4", "nvfp4"])
def test_gpu_linear_split_k_and_fp32(fmt):
    import vbhal.formats as VF
    from vbhal.backends.cuda import fp4_linear as L

    n, k = 256, 8192
    qw = L.quantize_fp4(torch.randn(n, k, device="cuda") * 0.02, fmt)
    wd = VF.dequantize(qw, torch.float32)
    codes, scales, ts, fid = L.qw_operands(qw)
    for dtype in (torch.bfloat16, torch.float32):
        x = torch.randn(2, k, device="cuda").to(dtype)
        for split in (1, 4):
            for path in ("gemv", "gemv_w32", "gemv_pf", "gemv_mr"):
                y = L._linear_2d(x, codes, scales, ts, None, fid, n, k, path, split_k=split)
                assert _rel(y, x.float() @ wd.t()) < REL_TOL[dtype], (dtype, split, path)


@pytest.mark.parametrize("fmt", ["mxfp4", "nvfp4"])
def test_gpu_fp4_linear_grads(fmt):
    import vbhal.formats as VF
    from vbhal.backends.cuda.fp4_linear import fp4_linear, quantize_fp4

    n, k = 1024, 2048
    qw = quantize_fp4(torch.randn(n, k, device="cuda") * 0.02, fmt)
    wd = VF.dequantize(qw, torch.float32)
    x = torch.randn(2, 8, k, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    b = torch.randn(n, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    y = fp4_linear(x, qw, b)
    gy = torch.randn_like(y)
    y.backward(gy)
    xr = x.detach().float().requires_grad_()
    br = b.detach().float().requires_grad_()
    torch.nn.functional.linear(xr, wd, br).backward(gy.float())
    assert _rel(x.grad, xr.grad) < 1e-2
    assert _rel(b.grad, br.grad) < 1e-2


def test_gpu_split_k_workspace_clean_and_graph_capture():
    """Split-K calls leave the shared workspace zero; a split-K call captured in a CUDA graph replays
    correctly (its own workspace) while eager calls of the same layer run in between."""
    import vbhal.formats as VF
    from vbhal.backends.cuda import fp4_linear as L

    n, k = 2048, 4096
    qw = L.quantize_fp4(torch.randn(n, k, device="cuda") * 0.02, "mxfp4")
    wd = VF.dequantize(qw, torch.float32)
    codes, scales, ts, _fid = L.qw_operands(qw)
    cfg = {"BLOCK_N": 32, "NBK": 4, "BLOCK_M": 4, "SPLIT_K": 8, "num_warps": 4, "num_stages": 2}
    run = L._make_runner("gemv_mr", n, k, "mxfp4", False, config=cfg)
    x = torch.randn(3, k, device="cuda", dtype=torch.bfloat16)
    for _ in range(3):
        assert _rel(run(x, codes, scales, ts, None), x.float() @ wd.t()) < REL_TOL[torch.bfloat16]
    torch.cuda.synchronize()
    assert L._WORKSPACES and all(not ws.any() for ws in L._WORKSPACES.values())
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        y_g = run(x, codes, scales, ts, None)
    for i in range(3):
        x.copy_(torch.randn_like(x))
        g.replay()
        y_e = run(x, codes, scales, ts, None)
        assert _rel(y_g, x.float() @ wd.t()) < REL_TOL[torch.bfloat16], i
        assert _rel(y_e, x.float() @ wd.t()) < REL_TOL[torch.bfloat16], i


def test_gpu_first_call_inside_graph_capture():
    """A shape never seen before, called first inside a CUDA-graph capture (auto and an explicit,
    untuned path): nothing may be timed or synchronized there (R4: tuning inside the capture broke it
    and killed the CUDA context); the graph replays correctly and eager calls afterwards still plan."""
    import vbhal.formats as VF
    from vbhal.backends.cuda import fp4_linear as L

    n, k = 1536, 2560  # a shape no other test uses: no plan, no tuned runner yet
    qw = L.quantize_fp4(torch.randn(n, k, device="cuda") * 0.02, "mxfp4")
    wd = VF.dequantize(qw, torch.float32)
    codes, scales, ts, fid = L.qw_operands(qw)
    x = torch.randn(3, k, device="cuda", dtype=torch.bfloat16)
    ys = {}
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g, stream=side):
        ys["auto"] = L.fp4_linear(x, qw)
        ys["gemv_w32"] = L._linear_2d(x, codes, scales, ts, None, fid, n, k, "gemv_w32")
    for _ in range(2):
        x.copy_(torch.randn_like(x))
        g.replay()
        torch.cuda.synchronize()
        for name, y in ys.items():
            assert _rel(y, x.float() @ wd.t()) < REL_TOL[torch.bfloat16], name
    assert _rel(L.fp4_linear(x, qw), x.float() @ wd.t()) < REL_TOL[torch.bfloat16]
    assert _rel(L._linear_2d(x, codes, scales, ts, None, fid, n, k, "gemv_w32"), x.float() @ wd.t()) < 6e-3


def test_gpu_fp4linear_eager_matches_compiled():
    from vbhal.backends.cuda import fp4_linear as L
    from vbhal.nn import FP4Linear

    lin = torch.nn.Linear(1024, 512, device="cuda", dtype=torch.bfloat16)
    q = FP4Linear.from_linear(lin, "mxfp4", kernels={"fp4_linear": L.fp4_linear,
                                                     "dequantize_fp4": L.dequantize_fp4}).to(torch.bfloat16)
    x = torch.randn(4, 1024, device="cuda", dtype=torch.bfloat16)
    with torch.no_grad():
        ref = torch.nn.functional.linear(x.float(), q.dequantized_weight(), q.bias.float())
        assert _rel(q(x), ref) < REL_TOL[torch.bfloat16]
        assert _rel(torch.compile(q, fullgraph=True)(x), ref) < REL_TOL[torch.bfloat16]


def test_gpu_torch_compile_traces_the_op():
    from vbhal.backends.cuda.fp4_linear import fp4_linear, quantize_fp4

    qw = quantize_fp4(torch.randn(512, 1024, device="cuda") * 0.02, "mxfp4")
    x = torch.randn(4, 1024, device="cuda", dtype=torch.bfloat16)
    f = torch.compile(lambda x: fp4_linear(x, qw) * 2, fullgraph=True)
    assert _rel(f(x), fp4_linear(x, qw) * 2) < 1e-6


def _split_k_cases():
    """(M, kind, config) of every split-K launch configuration the runtime can pick at K = N = 8192
    (mxfp4; _configs), the ones the plans chose in R5 first: M = 64 and 16 tensor-core tiles, then
    M = 8, then M = 1 (GEMVs, two mm_t tiles), gemv_mr at M > 1 last (never timed there now, still a
    forced path). The GPU script runs them in this order under a time limit, stopping at the first
    failure (-x)."""
    from vbhal.backends.cuda import fp4_linear as L

    nblocks = 8192 // 32
    cases = []
    for m in (64, 16, 8):
        for kind in ("mm_pt", "mm_p", "mm_t", "mm_w32"):
            cases += [(m, kind, c) for c in L._configs(kind, m, "mxfp4", nblocks) if c["SPLIT_K"] > 1]
    cases += [(1, "gemv_mr", c) for c in L._configs("gemv_mr", 1, "mxfp4", nblocks) if c["SPLIT_K"] > 1]
    for kind in ("gemv_pf", "gemv_w32"):  # the GEMVs' own split (_gemv_split) forced to 4
        cases.append((1, kind, {**L._configs(kind, 1, "mxfp4", nblocks)[1], "SPLIT_K": 4}))
    cases += [(1, "mm_t", c) for c in L._configs("mm_t", 1, "mxfp4", nblocks)[:2]]  # the M = 16 tiles again
    cases += [(16, "gemv_mr", L._configs("gemv_mr", 16, "mxfp4", nblocks)[0])]
    return cases


_SPLIT_K_DATA = {}


def _split_k_data():
    """One K = N = 8192 mxfp4 weight, its fp32 dequantization and a bias, made once for every case."""
    if not _SPLIT_K_DATA:
        import vbhal.formats as VF
        from vbhal.backends.cuda import fp4_linear as L

        g = torch.Generator(device="cuda").manual_seed(5)
        w = torch.randn(8192, 8192, device="cuda", generator=g) * 0.02
        qw = L.quantize_fp4(w.to(torch.bfloat16), "mxfp4")
        _SPLIT_K_DATA.update(qw=qw, wd=VF.dequantize(qw, torch.float32), ops=L.qw_operands(qw),
                             bias=(torch.randn(8192, device="cuda", generator=g) * 0.1).to(torch.bfloat16))
    return _SPLIT_K_DATA


@pytest.mark.parametrize("m,kind,cfg", _split_k_cases() if torch.cuda.is_available() else [],
                         ids=lambda v: v if isinstance(v, (int, str)) else "-".join(f"{a}{b}" for a, b in v.items()))
def test_gpu_split_k_real_size_repeated_and_graph(m, kind, cfg):
    """Split-K at K = N = 8192 (R5: every split-K config gave rel. errors 4e-2..3e-1 on the H100 -- a
    race in the one-launch "last split finalizes" read-back). Races are intermittent, so each config
    runs 6 times eagerly on fresh activations (outputs poisoned), then from a CUDA graph replayed 4
    times on new inputs with eager calls of the same runner in between; every output is compared with
    the fp32 matmul of the same quantized weight, and the shared workspace must be zero afterwards."""
    from vbhal.backends.cuda import fp4_linear as L

    d = _split_k_data()
    codes, scales, ts, _fid = d["ops"]
    wd, bias = d["wd"], d["bias"]
    run = L._make_runner(kind, 8192, 8192, "mxfp4", True, config=cfg)
    g = torch.Generator(device="cuda").manual_seed(m)
    x = torch.randn(m, 8192, device="cuda", generator=g).to(torch.bfloat16)

    def check(y, what):
        ref = torch.nn.functional.linear(x.float(), wd, bias.float())
        err = _rel(y, ref)
        assert not torch.isnan(y).any() and err < REL_TOL[torch.bfloat16], (what, err)

    for i in range(6):
        x.copy_(torch.randn(m, 8192, device="cuda", generator=g))
        check(run(x, codes, scales, ts, bias), f"eager call {i}")
    torch.cuda.synchronize()
    assert L._WORKSPACES and all(not ws.any() for ws in L._WORKSPACES.values())
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, stream=side):
        y_g = run(x, codes, scales, ts, bias)
    for i in range(4):
        x.copy_(torch.randn(m, 8192, device="cuda", generator=g))
        graph.replay()
        torch.cuda.synchronize()
        check(y_g, f"graph replay {i}")
        check(run(x, codes, scales, ts, bias), f"eager call between replays {i}")
    torch.cuda.synchronize()
    assert all(not ws.any() for ws in L._WORKSPACES.values())


@pytest.mark.parametrize("fmt", ["mxfp4", "nvfp4"])
def test_gpu_packed_decode_bit_exact(fmt):
    """The packed decode (shift/mask to bfloat16 pairs, then two bfloat16 multiplies) on the GPU, bit for
    bit against the codec: every code in every position of a word, under every scale byte (E8M0 0..254
    and 255 = NaN; every finite E4M3). bfloat16 subnormals (E8M0 bytes 0..2, code 0.5) included."""
    import triton
    import triton.language as tl

    from vbhal.backends.cuda import fp4_kernels
    from vbhal.formats.e2m1 import decode_e2m1

    global _K
    _K = fp4_kernels
    is_nv = fmt == "nvfp4"
    block = 16 if is_nv else 32
    wpb = block // 8

    @triton.jit
    def probe(w_ptr, s_ptr, out_ptr, IS_NV: tl.constexpr, WPB: tl.constexpr, BN: tl.constexpr, NBK: tl.constexpr):
        r = tl.arange(0, BN)
        w = tl.load(w_ptr + r[:, None, None] * (NBK * WPB) + tl.arange(0, NBK)[None, :, None] * WPB
                    + tl.arange(0, WPB)[None, None, :])
        sb = tl.load(s_ptr + r[:, None] * NBK + tl.arange(0, NBK)[None, :])
        t = _K._e2m1_packed_tile(w, sb, tl.bfloat16, IS_NV, True, BN, NBK * WPB * 8)
        tl.store(out_ptr + r[:, None] * (NBK * WPB * 8) + tl.arange(0, NBK * WPB * 8)[None, :], t)

    nbk = 256
    g = torch.Generator().manual_seed(6)
    codes = torch.randint(0, 256, (16, nbk * block // 2), dtype=torch.uint8, generator=g)
    codes[0, :8] = torch.tensor([c | (c << 4) for c in range(8)], dtype=torch.uint8)
    codes[1, :8] = torch.tensor([c | (c << 4) for c in range(8, 16)], dtype=torch.uint8)
    sbytes = torch.arange(nbk, dtype=torch.int64)
    if is_nv:
        sbytes = torch.where((sbytes & 0x7F) == 0x7F, 0, sbytes)  # E4M3 NaN bytes out
    scales = sbytes.to(torch.uint8).repeat(16, 1)
    out = torch.empty(16, nbk * block, dtype=torch.bfloat16, device="cuda")
    probe[(1,)](codes.cuda().view(torch.int32), scales.cuda(), out, is_nv, wpb, 16, nbk)
    nib = torch.stack([codes.to(torch.int64) & 0xF, codes.to(torch.int64) >> 4], 2).reshape(16, -1)
    vals = decode_e2m1(nib.to(torch.uint8), torch.float64)
    if is_nv:
        sc = scales.view(torch.float8_e4m3fn).to(torch.float64)
    else:
        sc = torch.where(scales == 255, float("nan"), 2.0 ** (scales.to(torch.float64) - 127))
    ref = (vals.reshape(16, nbk, block) * sc[:, :, None]).reshape(16, -1).to(torch.bfloat16)
    got = out.cpu()
    nan = torch.isnan(ref)
    assert torch.equal(torch.isnan(got), nan)
    assert torch.equal(got[~nan].view(torch.int16), ref[~nan].view(torch.int16))


@pytest.mark.parametrize("path", ["mm_t", "mm_w32", "mm_p", "mm_pt", "gemv_pf", "dequant"])
def test_gpu_huge_block_scales_bf16(path):
    """E8M0 scale bytes 241..254 (a block of 2^118-sized bfloat16 weights, finite): every bf16 path gives
    the float32 reference's finite values (session 6: the float32 tile decode's single factor overflowed
    to inf there, so zero codes became NaN; the packed decode was exact from the start)."""
    import vbhal.formats as VF
    from vbhal.backends.cuda import fp4_linear as L

    g = torch.Generator(device="cuda").manual_seed(14)
    n, k = 256, 512
    w = torch.randn(n, k, device="cuda", generator=g)
    w[:, :32] *= 2.0 ** 118
    qw = L.quantize_fp4(w.to(torch.bfloat16), "mxfp4")
    assert int(qw.scales.view(torch.uint8)[:, 0].min()) > 240
    wd = VF.dequantize(qw, torch.float32)
    codes, scales, ts, fid = L.qw_operands(qw)
    for m in (1, 16, 64):
        x = (torch.randn(m, k, device="cuda", generator=g) * 2.0 ** -120).to(torch.bfloat16)
        y = L._linear_2d(x, codes, scales, ts, None, fid, n, k, path)
        ref = x.float() @ wd.t()
        assert torch.isfinite(y).all(), (path, m)
        assert _rel(y, ref) < REL_TOL[torch.bfloat16], (path, m, _rel(y, ref))
