"""Session 7: stress of split-K at K = N = 8192 (mxfp4, bf16, bias, outputs poisoned): per config, one fixed input
run N times; with the in-kernel sum every output must equal the first bit for bit (no NaN), with the two-step form
(atomics, order varies) match the fp32 reference; the tile counters must be back at zero. argv: label calls."""
import json
import os
import sys
import time

import torch

from vbhal.backends.cuda import fp4_linear as L
from vbhal.backends.cuda import fp4_quantize as Q
from vbhal.backends.cuda.fp4_quantize import quantize_fp4, qw_operands

label, calls = sys.argv[1], int(sys.argv[2])
Q.POISON_OUTPUTS = True
torch.manual_seed(0)
n = k = 8192
w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * 0.02
bias = torch.randn(n, device="cuda", dtype=torch.bfloat16)
qw = quantize_fp4(w, "mxfp4")
codes, scales, ts, fid = qw_operands(qw)
wd = qw.dequantize(torch.float32)
cases = [(64, "mm_pt", (64, 128, 2, 4, 4, 4)), (64, "mm_pt", (64, 128, 4, 4, 4, 3)), (16, "mm_p", (16, 128, 4, 4, 4, 3)),
         (16, "mm_p", (16, 64, 8, 2, 4, 4)), (8, "mm_p", (16, 64, 4, 4, 4, 4)), (64, "mm_p", (32, 64, 4, 4, 4, 4))]
out = {"label": label, "fixup": L.SPLITK_FIXUP, "warp_fence": os.environ.get("VBHAL_FP4_SPLITK_WARP_FENCE"), "rows": []}
only = os.environ.get("STRESS_KINDS")  # e.g. "mm_pt,gemv_pf": those kinds only
for m, kind, tup in cases + [(1, "gemv_pf", None)]:
    if only and kind not in only.split(","):
        continue
    if kind == "gemv_pf":
        cfg = {"BLOCK_N": 16, "NBK": 32, "num_warps": 4, "num_stages": 3, "SPLIT_K": 4}
    else:
        bm, bn, nbk, s, wp, st = tup
        cfg = {"BLOCK_M": bm, "BLOCK_N": bn, "NBK": nbk, "GROUP_M": 8, "SPLIT_K": s, "num_warps": wp, "num_stages": st}
    run = L._make_runner(kind, n, k, "mxfp4", True, config=cfg)
    x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
    ref = torch.nn.functional.linear(x.float(), wd, bias.float())
    y0 = run(x, codes, scales, ts, bias).clone()
    err0 = float((y0.float() - ref).norm() / ref.norm())
    bad_bits = bad_nan = bad_err = 0
    t0 = time.time()
    for i in range(calls):
        y = run(x, codes, scales, ts, bias)
        if L.SPLITK_FIXUP:
            bad_bits += int(not torch.equal(y, y0))
        bad_nan += int(torch.isnan(y).any())
        if i % 50 == 0:
            bad_err += int(float((y.float() - ref).norm() / ref.norm()) > 6e-3)
    torch.cuda.synchronize()
    rest = all(not c.any() for _, c in L._SPLIT_BUFFERS.values()) if L.SPLITK_FIXUP else \
        all(not ws.any() for ws in L._WORKSPACES.values())
    row = {"M": m, "kind": kind, "cfg": cfg, "calls": calls, "err0": err0, "bitwise_mismatch": bad_bits,
           "nan_calls": bad_nan, "err_over_tol (every 50th)": bad_err, "at_rest": rest, "s": round(time.time() - t0, 1)}
    out["rows"].append(row)
    print(label, row, flush=True)
with open(os.path.join(os.environ.get("RES", "/tmp"), f"s7_stress_{label}.json"), "w") as fh:
    json.dump(out, fh, indent=1)
