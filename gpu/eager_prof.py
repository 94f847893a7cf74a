"""Eager host time of one FP4Linear call on the GPU machine (session 3), and of its parts, on a small layer
(1024x1024, M=1: GPU time ~3 us, so the loop measures the host). Direct Triton launches off/on are
interleaved in one process, 7 rounds each; min and median per call are printed. Then a cProfile."""
import cProfile
import pstats
import statistics
import time

import torch
import torch.nn as nn

import vbhal.backends.cuda.fp4_linear as L
from vbhal.nn.fp4_linear import FP4Linear

torch.manual_seed(0)
N = 400


def per_call(f, n=N):
    t0 = time.perf_counter()
    for _ in range(n):
        f()
    t = (time.perf_counter() - t0) / n * 1e6
    torch.cuda.synchronize()
    return t


res = {}
for size in (1024, 8192):
    lin = nn.Linear(size, size, bias=False, device="cuda", dtype=torch.bfloat16)
    q = FP4Linear.from_linear(lin, fmt="mxfp4")
    x = torch.randn(1, size, device="cuda", dtype=torch.bfloat16)
    codes = q.codes
    parts = {
        "torch.empty": lambda: torch.empty((1, size), dtype=torch.bfloat16, device="cuda"),
        "codes.view(int32)": lambda: codes.view(torch.int32),
        "F.linear bf16": lambda: lin(x),
        "FP4Linear direct=off": None,
        "FP4Linear direct=on": None,
    }
    with torch.no_grad():
        for _ in range(50):
            q(x), lin(x)
        torch.cuda.synchronize()
        times = {k: [] for k in parts}
        for _ in range(7):
            for name, f in parts.items():
                if name.startswith("FP4Linear"):
                    L._DIRECT = name.endswith("on")
                    f = lambda: q(x)  # noqa: E731
                times[name].append(per_call(f))
        L._DIRECT = True
    print(f"\n{size}x{size} M=1, host us per call (7 interleaved rounds of {N} calls): min / median")
    for name, ts in times.items():
        print(f"  {name:22s} {min(ts):7.1f} / {statistics.median(ts):7.1f}")
    res[size] = {k: (min(v), statistics.median(v)) for k, v in times.items()}
import triton  # noqa: E402

rt = getattr(getattr(triton, "knobs", None), "runtime", None)
print("triton", triton.__version__, "launch hooks:", rt and (rt.launch_enter_hook, rt.launch_exit_hook))
for key, run in L._PLANS.items():
    la = getattr(run, "launch", None)
    if la is not None:
        print("plan", key[:4], "direct", la.direct, "compiled kernels kept", len(la.compiled))
        if la.compiled:
            ck, tail = next(iter(la.compiled.values()))
            print("  launcher:", getattr(ck, "run", None), "constexpr values:", tail)

with torch.no_grad():
    pr = cProfile.Profile()
    pr.enable()
    for _ in range(400):
        q(x)
    pr.disable()
    torch.cuda.synchronize()
pstats.Stats(pr).sort_stats("tottime").print_stats(16)
