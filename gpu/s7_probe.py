"""Session 7 probe (H100): (1) the FP4 weight's streaming floor again, with read kernels that keep several
loads in flight per thread (session 3's read_only_kernel issued one load per loop step, so it measured a
latency floor: 17.1 us); (2) NVFP4 quantize split into its parts (tensor amax; the quantize kernel) beside
MXFP4's kernel, with a one-pass Triton amax as the alternative to torch's inf-norm. Graph-timed, L2 flushed."""
import json
import os
import sys

import torch
import triton
import triton.language as tl

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "benchmarks"))
from bench_fp4_linear import _bench_graph

from vbhal.backends.cuda import fp4_quantize as Q
from vbhal.backends.cuda.fp4_quantize import quantize_fp4, qw_operands


@triton.jit
def read_flat_kernel(ptr, out_ptr, n_words, CHUNK: tl.constexpr, UNROLL: tl.constexpr):
    """Every load of the program issued before any use: UNROLL x CHUNK int32 words."""
    pid = tl.program_id(0)
    offs = pid.to(tl.int64) * (CHUNK * UNROLL) + tl.arange(0, UNROLL)[:, None] * CHUNK + tl.arange(0, CHUNK)[None, :]
    v = tl.load(ptr + offs, mask=offs < n_words, other=0)
    tl.store(out_ptr + pid, tl.xor_sum(tl.xor_sum(v, axis=1), axis=0))


@triton.jit
def read_persist_kernel(ptr, out_ptr, n_words, CHUNK: tl.constexpr, UNROLL: tl.constexpr):
    """Persistent grid: each program walks chunks pid, pid + grid, ...; UNROLL chunks loaded per step."""
    pid = tl.program_id(0)
    np_ = tl.num_programs(0)
    acc = tl.zeros((UNROLL, CHUNK), dtype=tl.int32)
    step = CHUNK * UNROLL
    for start in range(pid * step, n_words, np_ * step):
        offs = start + tl.arange(0, UNROLL)[:, None] * CHUNK + tl.arange(0, CHUNK)[None, :]
        acc ^= tl.load(ptr + offs, mask=offs < n_words, other=0)
    tl.store(out_ptr + pid, tl.xor_sum(tl.xor_sum(acc, axis=1), axis=0))


@triton.jit
def amax_kernel(w_ptr, out_ptr, n, BLOCK: tl.constexpr):
    """max |w| over a flat tensor into *out_ptr (int32 bits of a non-negative float32: they order as ints)."""
    pid = tl.program_id(0)
    offs = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    v = tl.load(w_ptr + offs, mask=offs < n, other=0.0).to(tl.float32)
    m = tl.max(tl.abs(v), axis=0)
    tl.atomic_max(out_ptr, m.to(tl.int32, bitcast=True))


def main() -> None:
    torch.manual_seed(0)
    n = k = 8192
    w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * 0.02
    qw = quantize_fp4(w, "mxfp4")
    codes, scales, _ts, _fid = qw_operands(qw)
    flat = torch.cat([codes.reshape(-1), scales.reshape(-1).view(torch.uint8)]).view(torch.int32)
    nw = flat.numel()
    res = {"device": torch.cuda.get_device_name(), "bytes": flat.numel() * 4, "floor": {}, "quantize": {}}
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    for chunk, unroll, warps in ((1024, 4, 4), (1024, 8, 4), (2048, 4, 8), (512, 8, 4), (4096, 2, 8), (1024, 2, 4),
                                 (2048, 8, 8), (512, 4, 2)):
        grid = triton.cdiv(nw, chunk * unroll)
        out = torch.empty(grid, dtype=torch.int32, device="cuda")
        f = lambda chunk=chunk, unroll=unroll, warps=warps, grid=grid, out=out: read_flat_kernel[(grid,)](
            flat, out, nw, CHUNK=chunk, UNROLL=unroll, num_warps=warps)
        res["floor"][f"flat chunk={chunk} unroll={unroll} w={warps}"] = _bench_graph(f)
    for chunk, unroll, warps, per_sm in ((1024, 4, 4, 4), (1024, 2, 4, 8), (2048, 2, 8, 4), (512, 4, 4, 8)):
        grid = sms * per_sm
        out = torch.empty(grid, dtype=torch.int32, device="cuda")
        f = lambda chunk=chunk, unroll=unroll, warps=warps, grid=grid, out=out: read_persist_kernel[(grid,)](
            flat, out, nw, CHUNK=chunk, UNROLL=unroll, num_warps=warps, num_stages=3)
        res["floor"][f"persistent chunk={chunk} unroll={unroll} w={warps} grid={grid}"] = _bench_graph(f)
    buf = torch.empty_like(flat)
    res["floor"]["d2d copy (read + write)"] = _bench_graph(lambda: buf.copy_(flat))
    best = min(v for kk, v in res["floor"].items() if "copy" not in kk)
    res["floor"]["best read"] = best
    for kk, v in res["floor"].items():
        print(f"floor {kk:48s} {v:7.2f} us {res['bytes'] / v / 1e6:5.2f} TB/s", flush=True)

    # quantize parts (K = N = 8192 bf16 weight)
    q = res["quantize"]
    q["nvfp4 tensor scale (torch inf-norm)"] = _bench_graph(lambda: Q.nvfp4_tensor_scale_gpu(w))
    am = torch.zeros((), dtype=torch.int32, device="cuda")
    for block in (4096, 8192, 16384):
        def tri(block=block):
            am.zero_()
            amax_kernel[(triton.cdiv(w.numel(), block),)](w, am, w.numel(), BLOCK=block, num_warps=8)
        tri()
        ok = am.view(torch.float32).item() == w.abs().amax().float().item()
        q[f"triton amax block={block} (+ memset) exact={ok}"] = _bench_graph(tri)
    q["w.abs().amax()"] = _bench_graph(lambda: w.abs().amax())
    tsv = Q.nvfp4_tensor_scale_gpu(w)
    q["nvfp4 quantize kernel (ts given)"] = _bench_graph(lambda: torch.ops.vbhal.quantize_fp4_cuda(w, 1, False, tsv))
    q["mxfp4 quantize kernel"] = _bench_graph(lambda: torch.ops.vbhal.quantize_fp4_cuda(w, 0, False, tsv))
    q["nvfp4 inf-norm + kernel"] = _bench_graph(
        lambda: torch.ops.vbhal.quantize_fp4_cuda(w, 1, False, Q.nvfp4_tensor_scale_gpu(w)))
    for kk, v in q.items():
        print(f"quantize {kk:48s} {v:8.2f} us", flush=True)
    with open(os.path.join(os.environ.get("RES", "/tmp"), "s7_probe.json"), "w") as fh:
        json.dump(res, fh, indent=1)


if __name__ == "__main__":
    main()
