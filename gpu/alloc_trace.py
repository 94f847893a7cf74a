"""Session 5: where does the one caching-allocator retry per step (16k tokens, 8 GB cap) come from? Records one step
of the bench's 3.49B engine with torch.cuda.memory._record_memory_history and prints, at the first cached-memory
release of that step (the retry: segment unmaps), the allocation that triggered it and the live memory by stream and
by the code that allocated it. Usage: python gpu/alloc_trace.py  (env FRAC: gpu_step_fraction, default auto)"""
import collections
import json
import os
import sys
import time

import torch

sys.path.insert(0, "benchmarks")
import bench_offload as B  # noqa: E402

frac = os.environ.get("FRAC")
cfg = {"offload_activations": True}  # as the bench's speed part
if frac is not None:
    cfg["gpu_step_fraction"] = float(frac)
model, eng, t_build = B.build_vbhal(26, 16384, **cfg)
eng.replan()
B.reset_gpu()
B.set_cap(B.CAP_BYTES)
x = torch.randn(16384, B.D_MODEL, device="cuda", dtype=torch.bfloat16)
step = B.vbhal_step_fn(model, eng)
for i in range(int(os.environ.get("WARM", "5"))):
    t0 = time.perf_counter()
    step(x)
    torch.cuda.synchronize()
    r = eng.stats.steps[-1]
    print(f"step {i}: {time.perf_counter() - t0:.3f} s retries={r.get('alloc_retries')} mallocs={r.get('device_mallocs')} "
          f"pending={eng.plan_pending} gpu_units={sum(u.gpu_step for u in eng.units)}", flush=True)
ms0 = torch.cuda.memory_stats()
torch.cuda.memory._record_memory_history(max_entries=400000, stacks="python")
t0 = time.perf_counter()
step(x)
torch.cuda.synchronize()
dt = time.perf_counter() - t0
snap = torch.cuda.memory._snapshot()
torch.cuda.memory._record_memory_history(enabled=None)
ms1 = torch.cuda.memory_stats()
print(f"recorded step: {dt:.3f} s; retries {ms1['num_alloc_retries'] - ms0['num_alloc_retries']}, "
      f"syncs {ms1.get('num_sync_all_streams', 0) - ms0.get('num_sync_all_streams', 0)}, "
      f"device allocs {ms1['num_device_alloc'] - ms0['num_device_alloc']}, frees {ms1['num_device_free'] - ms0['num_device_free']}")
names = {}


def where(ev):
    fr = ev.get("frames") or []
    for f in fr:
        fn = f.get("filename", "")
        if "vbhal" in fn or "bench_offload" in fn:
            return f"{os.path.basename(fn)}:{f.get('line')} {f.get('name')}"
    return f"{os.path.basename(fr[0]['filename'])}:{fr[0]['line']} {fr[0]['name']}" if fr else "?"


trace = snap["device_traces"][0]
acts = collections.Counter(e["action"] for e in trace)
print("trace events:", dict(acts))
live = {}
requested = {}  # freed by Python but held by the allocator until other streams' uses are done (record_stream)
reported = 0
out = {"actions": dict(acts), "events": []}
for i, e in enumerate(trace):
    a = e["action"]
    if a == "alloc":
        live[e["addr"]] = (e["size"], e["stream"], where(e))
    elif a in ("free_completed",):
        live.pop(e["addr"], None)
        requested.pop(e["addr"], None)
    elif a == "free_requested":
        requested[e["addr"]] = (e["size"], where(e))
    elif a in ("segment_unmap", "segment_free", "oom") and (reported == 0 or trace[i - 1]["action"] not in
                                                            ("segment_unmap", "segment_free")) and reported < 3:
        reported += 1
        by_stream = collections.Counter()
        by_site = collections.Counter()
        for size, st, w in live.values():
            by_stream[st] += size
            by_site[w] += size
        nxt = next((t for t in trace[i:] if t["action"] == "alloc"), None)
        prev = [t for t in trace[max(0, i - 40):i] if t["action"] in ("alloc", "free_requested", "free_completed")][-12:]
        held = collections.Counter()
        for size, w in requested.values():
            held[w] += size
        info = {"event": a, "index": i, "size": e.get("size"), "live_bytes": sum(v[0] for v in live.values()),
                "freed_but_held": held.most_common(6),
                "live_by_stream": {str(k): v for k, v in by_stream.most_common()},
                "live_by_site": by_site.most_common(14),
                "next_alloc": None if nxt is None else (nxt["size"], nxt["stream"], where(nxt)),
                "recent": [(t["action"], t["size"], t["stream"], where(t)) for t in prev]}
        out["events"].append(info)
        print(json.dumps(info, indent=1), flush=True)
pending = collections.Counter()
for e in trace:  # blocks whose free was requested but completed only later (record_stream): bytes by site
    if e["action"] == "free_requested":
        pending[where(e)] += e["size"]
print("free_requested bytes by site:", pending.most_common(8))
with open(os.path.join(os.environ.get("RES", "/tmp"), "alloc_trace.json"), "w") as f:
    json.dump(out, f, indent=1, default=str)
eng.close()
