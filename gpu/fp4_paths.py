"""Per-path probe of the fused FP4 linear on the GPU (session 3): every kernel path that applies at each M,
checked against the float32 reference and timed like the planner times (CUDA graph, L2 flushed), next to
cuBLAS bf16 in the same run. Usage: python gpu/fp4_paths.py [budget_s] [fmt,...] [K:N,...] [M,...]"""
import json
import os
import sys
import time

import torch

from vbhal.backends.cuda import fp4_linear as L
from vbhal.backends.cuda.fp4_quantize import qw_operands
from vbhal.formats import dequantize
from vbhal.backends.cuda.fp4_quantize import quantize_fp4

budget = float(sys.argv[1]) if len(sys.argv) > 1 else 240
fmts = sys.argv[2].split(",") if len(sys.argv) > 2 else ["mxfp4"]
shapes = [tuple(map(int, s.split(":"))) for s in (sys.argv[3].split(",") if len(sys.argv) > 3 else ["8192:8192"])]
ms = [int(v) for v in (sys.argv[4].split(",") if len(sys.argv) > 4 else ["1", "16", "64", "256", "1024", "4096"])]
out = os.environ.get("RES", "/tmp")
t0 = time.time()
rows = []
torch.manual_seed(0)
dev = "cuda"
print(torch.cuda.get_device_name(), "torch", torch.__version__, flush=True)
for k, n in shapes:
    w = torch.randn(n, k, device=dev, dtype=torch.bfloat16) * 0.02
    for fmt in fmts:
        qw = quantize_fp4(w, fmt)
        wd = dequantize(qw, torch.float32)
        codes, scales, ts, fid = qw_operands(qw)
        wb = wd.to(torch.bfloat16)
        for m in ms:
            if time.time() - t0 > budget:
                print("budget spent", flush=True)
                break
            x = torch.randn(m, k, device=dev, dtype=torch.bfloat16)
            ref = (x.float() @ wd.t())
            row = {"fmt": fmt, "K": k, "N": n, "M": m}
            row["cublas_us"] = L._gpu_time(lambda: torch.nn.functional.linear(x, wb), x.device) * 1e3
            only = os.environ.get("FP4PATHS_ONLY")
            for path in L._candidates(m, torch.bfloat16):
                if only and path not in only.split(","):
                    continue
                if time.time() - t0 > budget:
                    break
                try:
                    y = L._linear_2d(x, codes, scales, ts, None, fid, n, k, path=path)
                    err = float((y.float() - ref).norm() / ref.norm())
                    x2 = torch.randn(m, k, device=dev, dtype=torch.bfloat16)  # fresh input: a stale-buffer bug shows
                    y2 = L._linear_2d(x2, codes, scales, ts, None, fid, n, k, path=path)
                    r2 = x2.float() @ wd.t()
                    err = max(err, float((y2.float() - r2).norm() / r2.norm()))
                    us = L._gpu_time(lambda: L._linear_2d(x, codes, scales, ts, None, fid, n, k, path=path), x.device) * 1e3
                    row[path] = (round(us, 2), f"{err:.1e}" + (" WRONG" if err > 6e-3 else ""))
                except Exception as e:  # noqa: BLE001
                    row[path] = ("ERR", f"{type(e).__name__}: {str(e).strip().splitlines()[-1][:160] if str(e).strip() else ''}")
            best = min((v[0] for p, v in row.items() if isinstance(v, tuple) and isinstance(v[0], float)
                        and "WRONG" not in v[1]), default=None)
            row["best_us"] = best
            row["speedup"] = round(row["cublas_us"] / best, 3) if best else None
            rows.append(row)
            print(json.dumps(row), flush=True)
tuned = {str(kk): v for kk, v in L.TUNED_CONFIGS.items()}
with open(os.path.join(out, "fp4_paths.json"), "w") as f:
    json.dump({"rows": rows, "tuned": tuned, "device": torch.cuda.get_device_name()}, f, indent=1, default=str)
print("\nsummary (us, graph, L2 flushed):")
for r in rows:
    paths = " ".join(f"{p}={v[0]}" for p, v in r.items() if isinstance(v, tuple))
    print(f"{r['fmt']} K={r['K']} N={r['N']} M={r['M']:5d} cublas={r['cublas_us']:.1f} best={r['best_us']} x{r['speedup']} | {paths}")
print("tuned configs:")
for kk, v in L.TUNED_CONFIGS.items():
    print(kk, v)
