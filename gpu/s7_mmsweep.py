"""Session 7: mm_p / mm_pt launch configs at M = 8, 16, 64 with the in-kernel split-K sum -- warps 4/8, stages 3/4/5,
BLOCK_N 32..128, splits 1..8 -- K = N = 8192 mxfp4, bf16 with bias, graph-timed with the L2 flushed, each result
checked against the fp32 matmul (wrong ones print WRONG)."""
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "benchmarks"))
from bench_fp4_linear import _bench_graph

from vbhal.backends.cuda import fp4_linear as L
from vbhal.backends.cuda.fp4_quantize import quantize_fp4, qw_operands

t0 = time.time()
torch.manual_seed(0)
n = k = 8192
w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * 0.02
bias = torch.randn(n, device="cuda", dtype=torch.bfloat16)
qw = quantize_fp4(w, "mxfp4")
codes, scales, ts, fid = qw_operands(qw)
wd = qw.dequantize(torch.float32)
rows = []
for m in (16, 64, 8):
    x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
    ref = torch.nn.functional.linear(x.float(), wd, bias.float())
    cub = _bench_graph(lambda x=x: torch.nn.functional.linear(x, w, bias), n=20, reps=5)
    cands = []
    for kind in ("mm_p", "mm_pt"):
        bms = (16, 32) if kind == "mm_p" else (16, 64)
        for bm in bms:
            if bm > max(16, m):
                continue
            for bn, nbk, split, warps, stages in ((64, 8, 2, 4, 4), (64, 8, 2, 8, 4), (128, 4, 4, 8, 4), (128, 4, 2, 8, 4),
                                                  (64, 4, 4, 4, 3), (64, 4, 4, 4, 5), (128, 4, 4, 4, 3), (32, 8, 4, 4, 4),
                                                  (64, 8, 4, 4, 4), (128, 8, 2, 8, 3), (64, 4, 8, 8, 4), (32, 4, 8, 4, 4)):
                cands.append((kind, {"BLOCK_M": bm, "BLOCK_N": bn, "NBK": nbk, "GROUP_M": 8, "SPLIT_K": split,
                                     "num_warps": warps, "num_stages": stages}))
    for kind, cfg in cands:
        if time.time() - t0 > 170:
            break
        f = lambda x=x, kind=kind, cfg=cfg: L._linear_2d(x, codes, scales, ts, bias, fid, n, k, kind, config=cfg)  # noqa: E731
        try:
            err = float((f().float() - ref).norm() / ref.norm())
            t = _bench_graph(f, n=20, reps=5) if err < 6e-3 else None
        except Exception as e:  # noqa: BLE001
            err, t = f"{type(e).__name__}", None
        rows.append({"M": m, "kind": kind, "cfg": cfg, "us": t, "err": err, "cublas_us": cub})
    best = sorted([r for r in rows if r["M"] == m and r["us"]], key=lambda r: r["us"])[:6]
    print(f"M={m}: cuBLAS {cub:.2f} us; best:", flush=True)
    for r in best:
        c = r["cfg"]
        print(f"   {r['us']:7.2f} us {r['kind']:6s} bm{c['BLOCK_M']} bn{c['BLOCK_N']} nbk{c['NBK']} s{c['SPLIT_K']} "
              f"w{c['num_warps']} st{c['num_stages']}", flush=True)
    print("   wrong/failed:", [(r["kind"], r["cfg"], r["err"]) for r in rows if r["M"] == m and not r["us"]], flush=True)
with open(os.path.join(os.environ.get("RES", "/tmp"), "s7_mmsweep.json"), "w") as fh:
    json.dump({"device": torch.cuda.get_device_name(), "rows": rows}, fh, indent=1)
