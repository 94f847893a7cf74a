"""Session 9: why is the device's compute inside the offloaded step 16-20% longer than the whole in-GPU step's
(0.79 against 0.66 s at 16k tokens, 2.91 against 2.51 at 64k)? torch.profiler (CUDA activity) over one step of
each: GPU kernel time by kernel, and the idle gaps between kernels on the compute stream."""
import collections
import json
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "benchmarks"))
import torch  # noqa: E402
from torch.profiler import ProfilerActivity, profile  # noqa: E402

import bench_offload as B  # noqa: E402

RES = os.environ.get("RES", "/tmp/s9prof")
os.makedirs(RES, exist_ok=True)
TOKENS = [int(t) for t in os.environ.get("S9_TOKENS", "16384,65536").split(",")]
out: dict = {}


def summarize(prof, label: str, wall: float) -> None:
    evs = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    kern = [e for e in evs if "memcpy" not in e.name.lower() and "memset" not in e.name.lower()]
    by = collections.defaultdict(lambda: [0.0, 0])
    for e in kern:
        k = e.name[:90]
        by[k][0] += (e.time_range.end - e.time_range.start) / 1e6
        by[k][1] += 1
    total = sum(v[0] for v in by.values())
    # the busiest stream's timeline: gaps between consecutive kernels
    streams = collections.defaultdict(list)
    for e in kern:
        tr = e.time_range
        streams[getattr(e, "device_resource_id", 0)].append((tr.start, tr.end))
    info = {}
    for sid, iv in streams.items():
        iv.sort()
        busy = sum(b - a for a, b in iv) / 1e6
        span = (iv[-1][1] - iv[0][0]) / 1e6
        gaps = [iv[i + 1][0] - iv[i][1] for i in range(len(iv) - 1)]
        big = sum(g for g in gaps if g > 50) / 1e6
        info[str(sid)] = {"kernels": len(iv), "busy_s": round(busy, 4), "span_s": round(span, 4),
                          "gaps_over_50us_s": round(big, 4), "n_gaps_over_1ms": sum(g > 1000 for g in gaps)}
    top = sorted(by.items(), key=lambda kv: -kv[1][0])[:18]
    print(f"== {label}: wall {wall:.3f} s, GPU kernel time {total:.3f} s", flush=True)
    for sid, d in sorted(info.items(), key=lambda kv: -kv[1]["busy_s"])[:4]:
        print(f"   stream {sid}: {d}", flush=True)
    for k, (t, n) in top:
        print(f"   {t:8.4f} s {n:6d}x  {k}", flush=True)
    out[label] = {"wall": wall, "kernel_s": total, "streams": info, "top": [(k, t, n) for k, (t, n) in top]}
    with open(f"{RES}/prof.json", "w") as f:
        json.dump(out, f, indent=1)


def profiled(step, x, label):
    step(x)
    B.sync()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        t0 = time.perf_counter()
        step(x)
        B.sync()
        wall = time.perf_counter() - t0
    summarize(prof, label, wall)


n = 26
for tokens in TOKENS:
    B.reset_gpu()
    model = B.make_model(n, B.DEV)
    x = torch.randn(tokens, B.D_MODEL, device=B.DEV, dtype=torch.bfloat16)
    step = B.plain_step_fn(model, True, 1)
    step(x)
    profiled(step, x, f"in-GPU {tokens}")
    del model, step, x
    B.reset_gpu()

model, eng, t_build = B.build_vbhal(n, TOKENS[0], offload_activations=True, gpu_step_fraction=None)
B.set_cap(B.CAP_BYTES)
for tokens in TOKENS:
    eng.replan()
    eng.cfg.chunks = max(1, tokens // 16384) if tokens > 16384 else 1
    x = torch.randn(tokens, B.D_MODEL, device=B.DEV, dtype=torch.bfloat16)
    step = B.vbhal_step_fn(model, eng)
    for _ in range(6):
        step(x)
        if not eng.plan_pending:
            break
    step(x)
    profiled(step, x, f"offload {tokens} ({eng.memory_summary()['gpu_step']['units']} device-stepped units)")
eng.close()
