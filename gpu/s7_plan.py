"""Session 7: the planned FP4 linear (both formats) at M in {1, 16, 64} beside torch int4 and cuBLAS bf16, graph-timed
with the L2 flushed, 3 interleaved rounds; run once per source tree (argv[1] names it) so that two builds can be
compared on one machine. Prints which vbhal it imported."""
import json
import os
import statistics
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "benchmarks"))
from bench_fp4_linear import _bench_graph, make_int4

import vbhal
from vbhal.backends.cuda import fp4_linear as L
from vbhal.backends.cuda.fp4_quantize import quantize_fp4, qw_operands

tag = sys.argv[1]
ms = [int(v) for v in (sys.argv[2] if len(sys.argv) > 2 else "1,16,64").split(",")]
print("vbhal from", vbhal.__file__, flush=True)
torch.manual_seed(0)
n = k = 8192
w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * 0.02
bias = torch.randn(n, device="cuda", dtype=torch.bfloat16)
int4_fn, _ = make_int4(w)
qws = {f: quantize_fp4(w, f) for f in ("mxfp4", "nvfp4")}
ops = {f: qw_operands(q) for f, q in qws.items()}
errs = {}
fns = {}
for m in ms:
    x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
    fns[f"cublas M={m}"] = lambda x=x: torch.nn.functional.linear(x, w, bias)
    if m == 1:
        fns[f"int4 M={m}"] = lambda x=x: int4_fn(x, bias)
    for f, (codes, scales, ts, fid) in ops.items():
        fn = lambda x=x, codes=codes, scales=scales, ts=ts, fid=fid: L._forward_2d(x, codes, scales, ts, bias, fid, n, k)
        ref = torch.nn.functional.linear(x.float(), qws[f].dequantize(torch.float32), bias.float())
        errs[f"{f} M={m}"] = float((fn().float() - ref).norm() / ref.norm())  # vs the codec's weight in fp32
        fns[f"{f} M={m}"] = fn
times = {name: [] for name in fns}
for _ in range(3):
    for name, f in fns.items():
        times[name].append(_bench_graph(f, n=20, reps=5))
med = {name: round(statistics.median(t), 2) for name, t in times.items()}
for name, t in med.items():
    print(f"{tag:4s} {name:16s} {t:8.2f} us" + (f"  rel.err {errs[name]:.1e}" if name in errs else ""), flush=True)
out = os.path.join(os.environ.get("RES", "/tmp"), f"s7_plan_{tag}.json")
runs = []
if os.path.exists(out):
    with open(out) as fh:
        runs = json.load(fh)
runs.append({"tag": tag, "device": torch.cuda.get_device_name(), "median_us": med, "rel_err": errs, "rounds": times})
with open(out, "w") as fh:
    json.dump(runs, fh, indent=1)
