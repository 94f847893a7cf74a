"""Where an eager FP4Linear call spends host time on the GPU machine (session 3): cProfile of 400 calls at M=1."""
import cProfile
import pstats
import time

import torch
import torch.nn as nn

from vbhal.nn.fp4_linear import FP4Linear

torch.manual_seed(0)
lin = nn.Linear(8192, 8192, bias=False, device="cuda", dtype=torch.bfloat16)
q = FP4Linear.from_linear(lin, fmt="mxfp4")
x = torch.randn(1, 8192, device="cuda", dtype=torch.bfloat16)
with torch.no_grad():
    for _ in range(50):
        q(x)
    torch.cuda.synchronize()
    for name, f in (("empty", lambda: torch.empty((1, 8192), dtype=torch.bfloat16, device="cuda")),
                    ("F.linear bf16", lambda: lin(x)), ("FP4Linear", lambda: q(x))):
        t0 = time.perf_counter()
        for _ in range(400):
            f()
        print(f"{name:14s} host {1e6 * (time.perf_counter() - t0) / 400:7.1f} us/call", flush=True)
        torch.cuda.synchronize()
    pr = cProfile.Profile()
    pr.enable()
    for _ in range(400):
        q(x)
    pr.disable()
    torch.cuda.synchronize()
pstats.Stats(pr).sort_stats("tottime").print_stats(22)
