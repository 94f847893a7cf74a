"""Session 8: the host AdamW (torch fused, pieces of 4M like the engine's torch step) alone and while pinned copies
stream both ways (the engine's traffic at 16k tokens: ~35 GB/s each way), 0.4B params, every core but one."""
import json
import os
import sys
import time

import torch

n = 402653184
threads = max(1, (os.cpu_count() or 2) - 1)
torch.set_num_threads(threads)
p, m, v = torch.randn(n) * 0.02, torch.zeros(n), torch.zeros(n)
g = (torch.randn(n) * 1e-3).to(torch.bfloat16)
w = torch.empty(n, dtype=torch.bfloat16)
step_t = torch.tensor(0.0)
chunk = 1 << 22
g32 = torch.empty(chunk)


def adamw() -> float:
    t0 = time.perf_counter()
    step_t.add_(1)
    for a in range(0, n, chunk):
        b = min(n, a + chunk)
        gc = g32[: b - a]
        gc.copy_(g[a:b])
        torch._fused_adamw_([p[a:b]], [gc], [m[a:b]], [v[a:b]], [], [step_t], lr=1e-4, beta1=0.9, beta2=0.999,
                            weight_decay=0.01, eps=1e-8, amsgrad=False, maximize=False)
        w[a:b].copy_(p[a:b])
    return (time.perf_counter() - t0) / n * 1e9


nb = 256 << 20
hu, hd = torch.empty(nb, dtype=torch.uint8).pin_memory(), torch.empty(nb, dtype=torch.uint8).pin_memory()
da, db = torch.empty(nb, dtype=torch.uint8, device="cuda"), torch.empty(nb, dtype=torch.uint8, device="cuda")
su, sd = torch.cuda.Stream(), torch.cuda.Stream()


def with_dma(up: bool, down: bool, reps: int = 160) -> tuple[float, float, bool]:
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(reps):
        if up:
            with torch.cuda.stream(su):
                da.copy_(hu, non_blocking=True)
        if down:
            with torch.cuda.stream(sd):
                hd.copy_(db, non_blocking=True)
    s = adamw()
    q = su.query() and sd.query()  # copies still running when the AdamW ended: it ran under them throughout
    torch.cuda.synchronize()
    rate = reps * nb * (up + down) / (time.perf_counter() - t0) / 1e9
    return s, rate, not q


adamw()
res = {"threads": threads, "alone_s_per_B": [adamw() for _ in range(2)]}
for name, up, down in (("up", True, False), ("both", True, True), ("down", False, True)):
    s, rate, covered = with_dma(up, down)
    res[f"dma_{name}"] = {"s_per_B": s, "dma_GBps_overall": rate, "dma_outlasted_adamw": covered}
res["alone_after_s_per_B"] = adamw()
print(json.dumps(res, indent=1))
json.dump(res, open(sys.argv[1], "w"), indent=1)
