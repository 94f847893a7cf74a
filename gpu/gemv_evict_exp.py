"""Session 6: does an L2 eviction hint on the streamed weight help the M = 1 GEMV? gemv_pf's body with the
weight words and scales loaded with ``eviction_policy`` EVW (and x with EVX), against the shipped gemv_pf and
torch int4 in the same run: K = N = 8192 mxfp4, bf16, graph-timed with the L2 flushed, interleaved rounds."""
import json
import os
import statistics
import sys

import torch
import triton
import triton.language as tl

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "benchmarks"))
from bench_fp4_linear import _bench_graph, make_int4  # noqa: E402

from vbhal.backends.cuda import fp4_kernels as K  # noqa: E402
from vbhal.backends.cuda import fp4_linear as L  # noqa: E402
from vbhal.backends.cuda.fp4_quantize import qw_operands, quantize_fp4  # noqa: E402


@triton.jit
def _lw(codes_ptr, scales_ptr, r3, r2, rmask, blk0, blk_hi, stride_cn, stride_sn, NBK: tl.constexpr,
        WPB: tl.constexpr, EVW: tl.constexpr):
    blks = blk0 + tl.arange(0, NBK)
    bmask = blks < blk_hi
    word = blks[:, None] * WPB + tl.arange(0, WPB)[None, :]
    w = tl.load(codes_ptr + r3.to(tl.int64) * stride_cn + word[None, :, :],
                mask=rmask[:, None, None] & bmask[None, :, None], other=0, eviction_policy=EVW)
    sb = tl.load(scales_ptr + r2.to(tl.int64) * stride_sn + blks[None, :], mask=rmask[:, None] & bmask[None, :],
                 other=0, eviction_policy=EVW)
    return w, sb, word, bmask


@triton.jit
def _lx(x_row, word, bmask, K_, EVX: tl.constexpr):
    kx = word[:, :, None] * 8 + tl.arange(0, 8)[None, None, :]
    return tl.load(x_row + kx, mask=bmask[:, None, None] & (kx < K_), other=0.0, eviction_policy=EVX)


@triton.jit
def gemv_ev(x_ptr, codes_ptr, scales_ptr, ts_ptr, bias_ptr, y_ptr, ws_ptr, M, N, K_, NUM_BLOCKS, stride_xm,
            stride_cn, stride_sn, stride_ym, IS_NV: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK: tl.constexpr,
            BLOCK_N: tl.constexpr, NBK: tl.constexpr, SPLIT_K: tl.constexpr, EVW: tl.constexpr, EVX: tl.constexpr):
    pid_n = tl.program_id(0)
    m = tl.program_id(1)
    pid_k = tl.program_id(2)
    WPB: tl.constexpr = BLOCK // 8
    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rmask = rows < N
    r3 = rows[:, None, None]
    r2 = rows[:, None]
    acc = tl.zeros((BLOCK_N, NBK), dtype=tl.float32)
    blk_lo, blk_hi = K._k_range(pid_k, NUM_BLOCKS, SPLIT_K, NBK)
    x_row = x_ptr + m.to(tl.int64) * stride_xm
    w, sb, word, bmask = _lw(codes_ptr, scales_ptr, r3, r2, rmask, blk_lo, blk_hi, stride_cn, stride_sn, NBK, WPB, EVW)
    x8 = _lx(x_row, word, bmask, K_, EVX)
    for blk0 in range(blk_lo, blk_hi, NBK):
        w_n, sb_n, word_n, bmask_n = _lw(codes_ptr, scales_ptr, r3, r2, rmask, blk0 + NBK, blk_hi, stride_cn,
                                         stride_sn, NBK, WPB, EVW)
        x8_n = _lx(x_row, word_n, bmask_n, K_, EVX)
        f, g = K._block_factors(sb, IS_NV)
        acc += (K._word_dot(w, x8.to(tl.float32), NBK, WPB) * f) * g
        w, sb, x8 = w_n, sb_n, x8_n
    out = tl.sum(acc, axis=1) * K._tensor_scale(ts_ptr, IS_NV)
    K._write_out(out, K._bias(bias_ptr, rows, rmask, HAS_BIAS), y_ptr + m.to(tl.int64) * stride_ym + rows,
                 ws_ptr + m.to(tl.int64) * N + rows, rmask, SPLIT_K)


torch.manual_seed(0)
n = k = 8192
w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * 0.02
bias = torch.randn(n, device="cuda", dtype=torch.bfloat16)
qw = quantize_fp4(w, "mxfp4")
codes, scales, ts, fid = qw_operands(qw)
ci = codes.view(torch.int32)
x = torch.randn(1, k, device="cuda", dtype=torch.bfloat16)
ref = torch.nn.functional.linear(x.float(), qw.dequantize(torch.float32), bias.float())
int4_fn, _ = make_int4(w)
fns = {"gemv_pf (shipped plan)": lambda: L._forward_2d(x, codes, scales, ts, bias, fid, n, k),
       "torch int4 (+bias)": lambda: int4_fn(x, bias)}
for bn, nbk, warps in ((16, 32, 4), (16, 16, 4), (8, 32, 2)):
    for evw, evx in (("", ""), ("evict_first", ""), ("evict_first", "evict_last"), ("evict_last", "")):
        def f(bn=bn, nbk=nbk, warps=warps, evw=evw, evx=evx):
            y = torch.empty(1, n, device="cuda", dtype=torch.bfloat16)
            gemv_ev[(n // bn, 1, 1)](x, ci, scales, ts, bias, y, y, 1, n, k, scales.shape[1], x.stride(0), ci.stride(0),
                                     scales.stride(0), y.stride(0), IS_NV=False, HAS_BIAS=True, BLOCK=32, BLOCK_N=bn,
                                     NBK=nbk, SPLIT_K=1, EVW=evw, EVX=evx, num_warps=warps, num_stages=3)
            return y
        err = float((f().float() - ref).norm() / ref.norm())
        assert err < 6e-3, (bn, nbk, evw, evx, err)
        fns[f"ev[{bn},{nbk},w{warps}] W={evw or '-'} X={evx or '-'}"] = f
fns["gemv_pf (shipped plan)"]()
times = {name: [] for name in fns}
for _ in range(3):
    for name, f in fns.items():
        times[name].append(_bench_graph(f, n=20, reps=5))
res = {name: (round(min(t), 2), round(statistics.median(t), 2)) for name, t in times.items()}
for name, (mn, md) in sorted(res.items(), key=lambda kv: kv[1][1]):
    print(f"{name:48s} min {mn:6.2f}  median {md:6.2f} us")
out = os.environ.get("RES", "/tmp")
json.dump({"device": torch.cuda.get_device_name(), "us_min_median": res,
           "plan": {str(kk): v for kk, v in L.PATH_CHOICES.items()}}, open(os.path.join(out, "gemv_evict.json"), "w"),
          indent=1)
