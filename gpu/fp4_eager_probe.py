"""Lead's probe: where does an eager FP4Linear call spend host time on the GPU machine? (final round)"""
import time, torch, torch.nn as nn
from vbhal.nn.fp4_linear import FP4Linear
dev = "cuda"
torch.manual_seed(0)
for fmt in ("mxfp4", "nvfp4"):
    lin = nn.Linear(8192, 8192, bias=False, device=dev, dtype=torch.bfloat16)
    q = FP4Linear.from_linear(lin, fmt=fmt)
    print(fmt, "kernel:", q.kernel_key, flush=True)
    for m in (1, 16, 64):
        x = torch.randn(m, 8192, device=dev, dtype=torch.bfloat16)
        with torch.no_grad():
            for _ in range(30):
                q(x); lin(x)
            torch.cuda.synchronize()
            for name, f in (("fp4", q), ("bf16", lin)):
                t0 = time.perf_counter()
                for _ in range(300):
                    f(x)
                t_host = (time.perf_counter() - t0) / 300 * 1e6
                torch.cuda.synchronize()
                t_all = (time.perf_counter() - t0) / 300 * 1e6
                print(f"{fmt} M={m:3d} {name:5s} host enqueue {t_host:7.1f} us/call, back-to-back wall {t_all:7.1f} us/call", flush=True)
        if m == 1:
            from torch.profiler import profile, ProfilerActivity
            with torch.no_grad(), profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
                for _ in range(20):
                    q(x)
                torch.cuda.synchronize()
            print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=18, max_name_column_width=60))
