"""Session 9: why does the host AdamW run 4-5x slower inside the offloaded step (1.3-1.8 s per 1e9 params) than
alone (0.31-0.36)? 3.49B params, 16k tokens, 8 GB cap, the bench's engine. Per host step: wall, the worker
thread's CPU time, the time inside the compiled calls; per step: every thread's run time and run-queue wait
(/proc schedstat). Variants in one process: baseline; sys.setswitchinterval(2e-4); the host steps alone on the
engine's real buffers (nothing else running)."""
import json
import os
import sys
import threading
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "benchmarks"))
import torch  # noqa: E402

import bench_offload as B  # noqa: E402

RES = os.environ.get("RES", "/tmp/s9")
os.makedirs(RES, exist_ok=True)
out: dict = {"variants": {}}


def threads_snapshot() -> dict:
    snap = {}
    for tid in os.listdir("/proc/self/task"):
        try:
            with open(f"/proc/self/task/{tid}/schedstat") as f:
                run, wait, slices = (int(x) for x in f.read().split())
            with open(f"/proc/self/task/{tid}/comm") as f:
                comm = f.read().strip()
            snap[tid] = (comm, run, wait, slices)
        except OSError:
            pass
    return snap


def threads_delta(a: dict, b: dict, wall: float) -> list:
    rows = []
    for tid, (comm, run, wait, sl) in b.items():
        r0, w0, s0 = a.get(tid, (comm, 0, 0, 0))[1:]
        dr, dw = (run - r0) / 1e9, (wait - w0) / 1e9
        if dr > 0.01 * wall or dw > 0.01 * wall:
            rows.append({"tid": tid, "comm": comm, "run_s": round(dr, 4), "wait_s": round(dw, 4), "slices": sl - s0})
    return sorted(rows, key=lambda r: -r["run_s"])


SMOKE = not torch.cuda.is_available()
if SMOKE:
    B._smoke_mode()
n = 4 if SMOKE else 26
model, eng, t_build = B.build_vbhal(n, 16384, offload_activations=True, gpu_step_fraction=None)
print(f"built in {t_build:.1f} s: {eng.host_step_note}; {eng.gpu_step_note}", flush=True)
worker_tid = {}
log: list = []
TORCH_STEP = os.environ.get("VBHAL_HOST_STEP") == "torch"
orig_compiled = eng._host_step_chunked if TORCH_STEP else eng._host_step_compiled


def traced(unit, lr, grad32=None):
    worker_tid.setdefault("tid", threading.get_native_id())
    calls = []
    fn = eng._compiled_step
    if fn is not None and not getattr(fn, "_traced", False):
        def timed(*a):
            t = time.perf_counter()
            r = fn(*a)
            calls.append(time.perf_counter() - t)
            return r
        timed._traced = True
        eng._compiled_step = timed
    t0, c0 = time.perf_counter(), time.thread_time()
    try:
        orig_compiled(unit, lr, grad32)  # (chunked: the third argument is the clip coefficient, None here)
    finally:
        if getattr(eng._compiled_step, "_traced", False):
            eng._compiled_step = fn
        log.append({"unit": unit.idx, "numel": unit.train_numel, "t0": t0, "wall": time.perf_counter() - t0,
                    "cpu": time.thread_time() - c0, "calls": calls})


if TORCH_STEP:
    eng._host_step_chunked = traced
else:
    eng._host_step_compiled = traced
x = torch.randn(16384, B.D_MODEL, device=B.DEV, dtype=torch.bfloat16)
step = B.vbhal_step_fn(model, eng)
B.set_cap(None if SMOKE else B.CAP_BYTES)
done = 0
t_w = time.perf_counter()
while done < 10:
    step(x)
    done += 1
    if not eng.plan_pending and done >= 3:
        break
B.sync()
eng.synchronize()
print(f"warm-up {done} steps in {time.perf_counter() - t_w:.1f} s; compile wait {getattr(eng, 'compile_wait_s', None)}", flush=True)


def run_variant(name: str, steps: int = 3) -> None:
    rows = []
    for _ in range(steps):
        log.clear()
        a = threads_snapshot()
        t0 = time.perf_counter()
        step(x)
        B.sync()
        eng.synchronize()
        wall = time.perf_counter() - t0
        b = threads_snapshot()
        hs = list(log)
        numel = sum(h["numel"] for h in hs)
        r = {"step_s": wall, "host_units": len(hs), "host_numel": numel,
             "host_wall_s": sum(h["wall"] for h in hs), "host_cpu_s": sum(h["cpu"] for h in hs),
             "host_in_calls_s": sum(sum(h["calls"]) for h in hs), "n_calls": sum(len(h["calls"]) for h in hs),
             "per_unit": [(h["unit"], round(h["t0"] - t0, 4), round(h["wall"], 4), round(h["cpu"], 4),
                           [round(c, 4) for c in h["calls"]]) for h in hs],
             "threads": threads_delta(a, b, wall), "row": {k: v for k, v in eng.stats.steps[-1].items() if isinstance(v, (int, float))}}
        if numel:
            r["host_s_per_B"] = r["host_wall_s"] / numel * 1e9
        rows.append(r)
        ws = r["worker"] = [t for t in r["threads"] if t["tid"] == str(worker_tid.get("tid"))]
        tot_run = sum(t["run_s"] for t in r["threads"])
        tot_wait = sum(t["wait_s"] for t in r["threads"])
        print(f"[{name}] step {wall:.3f} s; host {len(hs)} units {numel / 1e9:.2f}B: wall {r['host_wall_s']:.3f} "
              f"cpu(worker) {r['host_cpu_s']:.3f} in-calls {r['host_in_calls_s']:.3f} ({r['n_calls']} calls) = "
              f"{r.get('host_s_per_B', 0):.3f} s/1e9; threads run {tot_run:.2f} s wait {tot_wait:.2f} s over "
              f"{len(r['threads'])} busy threads; worker {ws}", flush=True)
    out["variants"][name] = rows
    for t in rows[-1]["threads"][:24]:
        print(f"   {t}", flush=True)
    with open(f"{RES}/probe.json", "w") as f:
        json.dump(out, f, indent=1, default=str)


run_variant("baseline")
sys.setswitchinterval(2e-4)
run_variant("switch2e-4")
sys.setswitchinterval(5e-3)

# the host steps alone, on the engine's real (pinned) buffers, on the worker's thread (its affinity, threads)
host_units = [u for u in eng.units if not u.gpu_step]
print(f"host-stepped units: {len(host_units)} of {len(eng.units)}", flush=True)
for rep in range(2):
    log.clear()
    futs = [eng._worker.submit((10**9, u.idx), traced, u, 1e-5) for u in host_units]
    for f in futs:
        f.result()
    hs = list(log)
    numel = sum(h["numel"] for h in hs)
    w = sum(h["wall"] for h in hs)
    print(f"[alone rep {rep}] {len(hs)} units {numel / 1e9:.2f}B: wall {w:.3f} s = {w / numel * 1e9:.3f} s/1e9; "
          f"in-calls {sum(sum(h['calls']) for h in hs):.3f}; cpu {sum(h['cpu'] for h in hs):.3f}", flush=True)
    out["variants"][f"alone{rep}"] = {"wall": w, "numel": numel, "per_unit": [(h["wall"], h["cpu"], h["calls"]) for h in hs]}

# the same on fresh pageable buffers of the same size (page size / pinning)
if eng._compiled_step is None:
    eng.close()
    sys.exit(0)
nb = max(u.train_numel for u in host_units)
p, m, v = torch.randn(nb), torch.zeros(nb), torch.zeros(nb)
g, wk = torch.randn(nb).bfloat16(), torch.empty(nb, dtype=torch.bfloat16)
hp = eng._hp_tensor.clone()
def fresh():
    t = time.perf_counter()
    for _ in range(len(host_units)):
        eng._compiled_step(p, m, v, g, wk, hp)
    return time.perf_counter() - t
eng._worker.submit((10**9, 0), fresh).result()
w = eng._worker.submit((10**9, 0), fresh).result()
print(f"[alone fresh pageable buffers] {len(host_units)} x {nb / 1e9:.3f}B: {w:.3f} s = {w / (nb * len(host_units)) * 1e9:.3f} s/1e9", flush=True)
out["fresh_s_per_B"] = w / (nb * len(host_units)) * 1e9
with open(f"{RES}/probe.json", "w") as f:
    json.dump(out, f, indent=1, default=str)
eng.close()
