"""Session 6: why eager fp4_linear at M = 8..64 (split-K plans) measured 110-160 us in the benchmark's do_bench
(L2 flushed) while its CUDA-graph time is 44-60 us. K = N = 8192 mxfp4, bf16. Per M: host time per call (a
loop without syncs), do_bench with and without the L2 flush, the pieces (launch alone, _finalize alone);
then a cProfile of 300 nvfp4 calls at M = 1."""
import cProfile
import pstats
import time

import torch
import triton

from vbhal.backends.cuda import fp4_linear as L
from vbhal.backends.cuda.fp4_quantize import quantize_fp4

torch.manual_seed(0)
w = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16) * 0.02
qws = {f: quantize_fp4(w, f) for f in ("mxfp4", "nvfp4")}
bias = torch.randn(8192, device="cuda", dtype=torch.bfloat16)


def host_per_call(f, n=300):
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(n):
        f()
    t = (time.perf_counter() - t0) / n * 1e6
    torch.cuda.synchronize()
    return t


for fmt, m in [(f, m) for f in ("mxfp4", "nvfp4") for m in (1, 8, 16, 64, 256)]:
    qw = qws[fmt]
    x = torch.randn(m, 8192, device="cuda", dtype=torch.bfloat16)
    f = lambda: L.fp4_linear(x, qw, bias)  # noqa: E731
    f()
    torch.cuda.synchronize()
    key = next(k for k in L._PLANS if k[0] == L._m_bucket(m) and k[3] == L._FMT_IDS[fmt])
    run = L._PLANS[key]
    plan = getattr(run, "per_m", {})
    row = {"fmt": fmt, "M": m, "path": L.PATH_CHOICES.get(key), "plan": {str(k): (v[0], v[1]) for k, v in plan.items()}}
    row["host_us"] = host_per_call(f)
    row["do_bench_flush_us"] = triton.testing.do_bench(f, warmup=25, rep=100, return_mode="median") * 1e3
    a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    a.record()
    for _ in range(200):
        f()
    b.record()
    b.synchronize()
    row["back_to_back_us"] = a.elapsed_time(b) / 200 * 1e3  # max(host, GPU) per call, no flush
    if hasattr(run, "launch"):
        row["direct"] = run.launch.direct and L._DIRECT
        row["compiled_entries"] = len(run.launch.compiled)
        ws = L._workspace(m, 8192, x.device)
        y = torch.empty(m, 8192, device="cuda", dtype=torch.bfloat16)
        row["finalize_host_us"] = host_per_call(lambda: L._finalize(ws, bias, y))
    print(row, flush=True)

x = torch.randn(1, 8192, device="cuda", dtype=torch.bfloat16)
pr = cProfile.Profile()
pr.enable()
for _ in range(300):
    L.fp4_linear(x, qws["nvfp4"], bias)
torch.cuda.synchronize()
pr.disable()
pstats.Stats(pr).sort_stats("tottime").print_stats(14)
