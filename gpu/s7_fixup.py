"""Session 7: split-K summed in the kernel (FIXUP, one launch) against the two-step form (atomics + _finalize),
K = N = 8192 mxfp4, bf16 with bias, graph-timed with the L2 flushed: chosen configs of gemv_pf (M = 1) and mm_p /
mm_pt (M = 16, 64), each checked against the fp32 matmul; then the planned call in both modes beside cuBLAS and
torch int4, 3 interleaved rounds."""
import json
import os
import statistics
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "benchmarks"))
from bench_fp4_linear import _bench_graph, make_int4

from vbhal.backends.cuda import fp4_linear as L
from vbhal.backends.cuda.fp4_quantize import quantize_fp4, qw_operands

torch.manual_seed(0)
n = k = 8192
w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * 0.02
bias = torch.randn(n, device="cuda", dtype=torch.bfloat16)
qw = quantize_fp4(w, "mxfp4")
codes, scales, ts, fid = qw_operands(qw)
wd = qw.dequantize(torch.float32)
res = {"device": torch.cuda.get_device_name(), "configs": [], "plan": {}}
cases = {1: [("gemv_pf", {"BLOCK_N": 16, "NBK": 32, "num_warps": 4, "num_stages": 3, "SPLIT_K": s}) for s in (1, 2, 4)]
            + [("gemv_pf", {"BLOCK_N": 16, "NBK": 16, "num_warps": 4, "num_stages": 3, "SPLIT_K": s}) for s in (2, 4)]
            + [("gemv_pf", {"BLOCK_N": 8, "NBK": 32, "num_warps": 4, "num_stages": 3, "SPLIT_K": 2})],
         16: [("mm_p", {"BLOCK_M": 16, "BLOCK_N": bn, "NBK": nbk, "GROUP_M": 8, "SPLIT_K": s, "num_warps": 4,
                        "num_stages": 4}) for bn, nbk, s in ((128, 4, 1), (128, 4, 2), (128, 4, 4), (128, 4, 8),
                                                             (64, 4, 1), (64, 4, 4), (64, 4, 8), (32, 4, 4))],
         64: [("mm_p", {"BLOCK_M": bm, "BLOCK_N": bn, "NBK": 4, "GROUP_M": 8, "SPLIT_K": s, "num_warps": 4,
                        "num_stages": 4}) for bm, bn, s in ((16, 128, 1), (16, 128, 2), (16, 128, 4), (32, 64, 4),
                                                            (32, 64, 2), (16, 64, 4))]
             + [("mm_pt", {"BLOCK_M": 64, "BLOCK_N": 128, "NBK": 4, "GROUP_M": 8, "SPLIT_K": s, "num_warps": 4,
                           "num_stages": 4}) for s in (1, 2, 4)]}
for m, lst in cases.items():
    x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
    ref = torch.nn.functional.linear(x.float(), wd, bias.float())
    for kind, cfg in lst:
        row = {"M": m, "kind": kind, "cfg": cfg}
        for fix in (True, False):
            L.SPLITK_FIXUP = fix
            f = lambda x=x, kind=kind, cfg=cfg: L._linear_2d(x, codes, scales, ts, bias, fid, n, k, kind, config=cfg)
            try:
                err = float((f().float() - ref).norm() / ref.norm())
                row[f"us_fixup={fix}"] = _bench_graph(f, n=20, reps=5) if err < 6e-3 else None
                row[f"err_fixup={fix}"] = err
            except Exception as e:  # noqa: BLE001
                row[f"err_fixup={fix}"] = f"{type(e).__name__}: {str(e)[:120]}"
        res["configs"].append(row)
        print(f"M={m:3d} {kind:8s} {[cfg.get(c) for c in ('BLOCK_M', 'BLOCK_N', 'NBK', 'SPLIT_K')]}: "
              f"fixup {row.get('us_fixup=True')} us (err {row.get('err_fixup=True')}) | two-step "
              f"{row.get('us_fixup=False')} us", flush=True)
L.SPLITK_FIXUP = True
int4_fn, _ = make_int4(w)
fns = {}
for m in (1, 16, 64):
    x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
    fns[f"cublas M={m}"] = lambda x=x: torch.nn.functional.linear(x, w, bias)
    fns[f"int4 M={m}"] = lambda x=x: int4_fn(x, bias)
    fns[f"plan mxfp4 M={m}"] = lambda x=x: L._forward_2d(x, codes, scales, ts, bias, fid, n, k)
    ref = torch.nn.functional.linear(x.float(), wd, bias.float())
    res["plan"][f"err M={m}"] = float((fns[f"plan mxfp4 M={m}"]().float() - ref).norm() / ref.norm())
res["plan"]["choices"] = {str(kk): str(v) for kk, v in L.PATH_CHOICES.items()} if hasattr(L, "PATH_CHOICES") else {}
res["plan"]["tuned"] = {str(kk): str(v) for kk, v in L.TUNED_CONFIGS.items()}
times = {name: [] for name in fns}
for _ in range(3):
    for name, f in fns.items():
        times[name].append(_bench_graph(f, n=20, reps=5))
res["plan"]["median_us"] = {name: round(statistics.median(t), 2) for name, t in times.items()}
for name, t in res["plan"]["median_us"].items():
    print(f"{name:18s} {t:8.2f} us", flush=True)
print(json.dumps({kk: v for kk, v in res["plan"].items() if kk != "median_us"}, indent=0)[:3000], flush=True)
with open(os.path.join(os.environ.get("RES", "/tmp"), "s7_fixup.json"), "w") as fh:
    json.dump(res, fh, indent=1)
