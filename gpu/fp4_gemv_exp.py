"""Session 5: time the mask-free GEMV variants (gpu/fp4_gemv_exp_kernels.py) against vbhal's gemv_pf at M = 1, both
benchmark shapes and formats, as the planner times (CUDA graph, L2 flushed), each checked against float32 first.
Usage: python gpu/fp4_gemv_exp.py [budget_s]"""
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import fp4_gemv_exp_kernels as X  # noqa: E402

from vbhal.backends.cuda import fp4_linear as L  # noqa: E402
from vbhal.backends.cuda.fp4_quantize import qw_operands, quantize_fp4  # noqa: E402
from vbhal.formats import dequantize  # noqa: E402

budget = float(sys.argv[1]) if len(sys.argv) > 1 else 150
t0 = time.time()
torch.manual_seed(0)
rows = []
CFGS = [(16, 32, 4, 3), (16, 32, 4, 1), (16, 32, 4, 2), (32, 32, 4, 1), (32, 32, 8, 1), (32, 16, 4, 1), (16, 64, 4, 1),
        (32, 32, 4, 3), (16, 16, 2, 1), (32, 64, 8, 1), (64, 32, 8, 1), (64, 16, 4, 1), (8, 32, 2, 1)]
for (k, n) in ((8192, 8192), (4096, 14336)):
    for fmt in ("mxfp4", "nvfp4"):
        nv = 2 if fmt == "nvfp4" else 1
        w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * 0.02
        qw = quantize_fp4(w, fmt)
        wd = dequantize(qw, torch.float32)
        codes, scales, ts, fid = qw_operands(qw)
        x = torch.randn(1, k, device="cuda", dtype=torch.bfloat16)
        ref = x.float() @ wd.t()
        wb = wd.to(torch.bfloat16)
        base = {"K": k, "N": n, "fmt": fmt}
        cub = L._gpu_time(lambda: torch.nn.functional.linear(x, wb), x.device) * 1e3
        rows.append({**base, "kind": "cublas_bf16", "us": cub})
        pf = {"BLOCK_N": 16, "NBK": 32 * nv, "num_warps": 4, "num_stages": 3}
        fn = lambda: L._linear_2d(x, codes, scales, ts, None, fid, n, k, path="gemv_pf", config=pf, split_k=1)  # noqa: E731
        err = float((fn().float() - ref).norm() / ref.norm())
        rows.append({**base, "kind": "vbhal gemv_pf (16,32,4)", "us": L._gpu_time(fn, x.device) * 1e3, "err": err})
        print(json.dumps(rows[-2]), json.dumps(rows[-1]), flush=True)
        cw = codes.view(torch.int32)
        nb = scales.shape[1]
        for kern in (X.gemv_even_nopf, X.gemv_even):
            for bn, nbk, warps, stages in CFGS:
                if time.time() - t0 > budget:
                    break
                nbk *= nv
                if n % bn or nb % nbk or (kern is X.gemv_even and stages != 1):
                    continue
                y = torch.empty(1, n, device="cuda", dtype=torch.bfloat16)

                def call(kern=kern, bn=bn, nbk=nbk, warps=warps, stages=stages, y=y):
                    kern[(n // bn, 1, 1)](x, cw, scales, ts, x, y, y, 1, n, k, nb, x.stride(0), cw.stride(0),
                                          scales.stride(0), y.stride(0), IS_NV=fmt == "nvfp4", HAS_BIAS=False,
                                          BLOCK=16 if fmt == "nvfp4" else 32, BLOCK_N=bn, NBK=nbk, SPLIT_K=1,
                                          num_warps=warps, num_stages=stages)
                    return y
                try:
                    call()
                    e = float((y.float() - ref).norm() / ref.norm())
                    us = L._gpu_time(call, x.device) * 1e3
                except Exception as ex:  # noqa: BLE001
                    e, us = f"{type(ex).__name__}: {str(ex)[:120]}", None
                rows.append({**base, "kind": kern.fn.__name__ if hasattr(kern, "fn") else str(kern), "BLOCK_N": bn,
                             "NBK": nbk, "warps": warps, "stages": stages, "us": us, "err": e})
                print(json.dumps(rows[-1]), flush=True)
print("\nsummary (M = 1, us; ok = rel. error < 6e-3):")
for (k, n) in ((8192, 8192), (4096, 14336)):
    for fmt in ("mxfp4", "nvfp4"):
        sel = [r for r in rows if r["K"] == k and r["N"] == n and r["fmt"] == fmt]
        ok = sorted([r for r in sel if r.get("us") and (r["kind"] == "cublas_bf16" or (isinstance(r.get("err"), float) and r["err"] < 6e-3))],
                    key=lambda r: r["us"])
        bad = [r for r in sel if isinstance(r.get("err"), float) and r["err"] >= 6e-3 or isinstance(r.get("err"), str)]
        print(f"K={k} N={n} {fmt}: " + "; ".join(f"{r['kind']}{'' if 'BLOCK_N' not in r else (r['BLOCK_N'], r['NBK'], r['warps'], r['stages'])} {r['us']:.1f}" for r in ok[:6])
              + (f"  WRONG/FAILED {len(bad)}" if bad else ""))
with open(os.path.join(os.environ.get("RES", "/tmp"), "gemv_exp.json"), "w") as f:
    json.dump({"device": torch.cuda.get_device_name(), "rows": rows}, f, indent=1)
