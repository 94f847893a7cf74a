"""Streaming floor for the small-M FP4 linear (session 3): how fast can this H100 read the 8192x8192 FP4 weight's
bytes (35.7 MB: codes + scales) at all? Timed like the planner (CUDA graph, L2 flushed): a Triton kernel that
only reads the code words and scale bytes in the GEMV's tiling (no decode, no x), torch reductions over the same
bytes, a device-to-device copy, and cuBLAS bf16 / vbhal at M=1 for reference."""
import json
import os

import torch
import triton
import triton.language as tl

from vbhal.backends.cuda import fp4_linear as L
from vbhal.backends.cuda.fp4_quantize import quantize_fp4, qw_operands


@triton.jit
def read_only_kernel(codes_ptr, scales_ptr, out_ptr, N, WORDS, NB, stride_c, stride_s,
                     BLOCK_N: tl.constexpr, WK: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    acc = tl.zeros((BLOCK_N, WK), dtype=tl.int32)
    sacc = tl.zeros((BLOCK_N, WK // 4), dtype=tl.int32)
    for w0 in range(0, WORDS, WK):
        cols = w0 + tl.arange(0, WK)
        acc ^= tl.load(codes_ptr + rows[:, None].to(tl.int64) * stride_c + cols[None, :],
                       mask=(rows[:, None] < N) & (cols[None, :] < WORDS), other=0)
        sc = w0 // 4 + tl.arange(0, WK // 4)
        sacc ^= tl.load(scales_ptr + rows[:, None].to(tl.int64) * stride_s + sc[None, :],
                        mask=(rows[:, None] < N) & (sc[None, :] < NB), other=0).to(tl.int32)
    tl.store(out_ptr + rows, tl.xor_sum(acc, axis=1) ^ tl.xor_sum(sacc, axis=1), mask=rows < N)


def main() -> None:
    torch.manual_seed(0)
    k = n = 8192
    w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * 0.02
    qw = quantize_fp4(w, "mxfp4")
    codes, scales, ts, fid = qw_operands(qw)
    cw = codes.view(torch.int32)
    nbytes = codes.numel() + scales.numel()
    out = torch.empty(n, dtype=torch.int32, device="cuda")
    res = {"bytes": nbytes}
    best = None
    for bn, wk, warps in ((16, 128, 4), (16, 256, 4), (32, 128, 4), (8, 256, 2), (64, 64, 4), (16, 512, 8), (32, 256, 8)):
        f = lambda bn=bn, wk=wk, warps=warps: read_only_kernel[(triton.cdiv(n, bn),)](cw, scales, out, n, cw.shape[1], scales.shape[1],
                                                          cw.stride(0), scales.stride(0), BLOCK_N=bn, WK=wk, num_warps=warps)
        t = L._gpu_time(f, w.device) * 1e3
        res[f"triton_read bn={bn} wk={wk} w={warps}"] = t
        best = t if best is None else min(best, t)
    res["triton_read best"] = best
    res["torch int32 sum"] = L._gpu_time(lambda: cw.sum(dtype=torch.int64), w.device) * 1e3
    buf = torch.empty_like(codes)
    res["d2d copy of codes (read+write)"] = L._gpu_time(lambda: buf.copy_(codes), w.device) * 1e3
    wb = w
    x = torch.randn(1, k, device="cuda", dtype=torch.bfloat16)
    res["cublas bf16 M=1 (134 MB)"] = L._gpu_time(lambda: torch.nn.functional.linear(x, wb), w.device) * 1e3
    res["vbhal mxfp4 M=1"] = L._gpu_time(lambda: L._linear_2d(x, codes, scales, ts, None, fid, n, k), w.device) * 1e3
    for key, v in res.items():
        if key != "bytes":
            print(f"{key:40s} {v:7.2f} us" + (f"  {nbytes / v / 1e6:5.2f} TB/s of FP4 bytes" if "cublas" not in key and "copy" not in key else ""))
    print(f"cuBLAS effective bandwidth: {2 * k * n / res['cublas bf16 M=1 (134 MB)'] / 1e6:.2f} TB/s")
    with open(os.path.join(os.environ.get("RES", "/tmp"), "stream_floor.json"), "w") as fh:
        json.dump({"device": torch.cuda.get_device_name(), **res}, fh, indent=1)


if __name__ == "__main__":
    main()
