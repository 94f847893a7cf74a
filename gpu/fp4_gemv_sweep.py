"""M=1 GEMV launch-config sweep (session 3): every GEMV kernel over a wide (BLOCK_N, NBK, warps, split) grid at
K=N=8192 bf16, each result checked against the float32 reference, timed as the planner times (graph, L2 flushed).
Usage: python gpu/fp4_gemv_sweep.py [budget_s] [fmt]"""
import itertools
import json
import os
import sys
import time

import torch

from vbhal.backends.cuda import fp4_linear as L
from vbhal.backends.cuda.fp4_quantize import qw_operands, quantize_fp4
from vbhal.formats import dequantize

budget = float(sys.argv[1]) if len(sys.argv) > 1 else 150
fmt = sys.argv[2] if len(sys.argv) > 2 else "mxfp4"
t0 = time.time()
torch.manual_seed(0)
k = n = 8192
w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * 0.02
qw = quantize_fp4(w, fmt)
wd = dequantize(qw, torch.float32)
codes, scales, ts, fid = qw_operands(qw)
x = torch.randn(1, k, device="cuda", dtype=torch.bfloat16)
ref = x.float() @ wd.t()
wb = wd.to(torch.bfloat16)
res = {"cublas": L._gpu_time(lambda: torch.nn.functional.linear(x, wb), x.device) * 1e3}
print("cublas", res["cublas"], flush=True)
nv = 2 if fmt == "nvfp4" else 1
grid = [(8, 16), (8, 32), (16, 8), (16, 16), (16, 32), (32, 4), (32, 8), (32, 16), (64, 4), (64, 8), (128, 2)]
rows = []
for kind in ("gemv_pf", "gemv_w32", "gemv"):
    for (bn, nbk), warps, split in itertools.product(grid, (2, 4, 8), (1, 2)):
        if time.time() - t0 > budget:
            break
        if bn * nbk > 512 and warps == 2:
            continue
        cfg = {"BLOCK_N": bn, "NBK": nbk * nv, "num_warps": warps, "num_stages": 3}
        try:
            y = L._linear_2d(x, codes, scales, ts, None, fid, n, k, path=kind, config=cfg, split_k=split)
            err = float((y.float() - ref).norm() / ref.norm())
            us = L._gpu_time(lambda: L._linear_2d(x, codes, scales, ts, None, fid, n, k, path=kind, config=cfg,
                                                  split_k=split), x.device) * 1e3
        except Exception as e:  # noqa: BLE001
            us, err = None, f"{type(e).__name__}"
        rows.append({"kind": kind, "BLOCK_N": bn, "NBK": nbk * nv, "warps": warps, "split": split, "us": us, "err": err})
        print(json.dumps(rows[-1]), flush=True)
good = sorted([r for r in rows if r["us"] and isinstance(r["err"], float) and r["err"] < 6e-3], key=lambda r: r["us"])
print(f"\n{fmt} M=1 K=N=8192: cuBLAS {res['cublas']:.1f} us; best 12:")
for r in good[:12]:
    print(f"  {r['kind']:9s} BN={r['BLOCK_N']:3d} NBK={r['NBK']:2d} w={r['warps']} split={r['split']}  {r['us']:.2f} us "
          f"x{res['cublas'] / r['us']:.2f} err={r['err']:.1e}")
for kind in ("gemv_pf", "gemv_w32", "gemv"):
    b = [r for r in good if r["kind"] == kind]
    if b:
        print(f"  best {kind}: {b[0]['us']:.2f} us {b[0]}")
print("wrong:", [r for r in rows if isinstance(r["err"], float) and r["err"] >= 6e-3][:5])
with open(os.path.join(os.environ.get("RES", "/tmp"), f"gemv_sweep_{fmt}.json"), "w") as f:
    json.dump({"cublas_us": res["cublas"], "rows": rows, "device": torch.cuda.get_device_name()}, f, indent=1)
