"""Offloaded training benchmark: vbhal's streamed training under an 8 GB GPU cap vs plain PyTorch.

Parts (run in separate processes so host memory of one does not count against the next):

* ``check``    — correctness at a real size in bf16: plain (fp32 params, bf16 autocast, fused AdamW) vs
                 vbhal (bf16 working copy streamed, host fused AdamW on fp32 masters), same seed and data.
* ``speed``    — ~3.5B-param stack of MLP blocks (d=4096): in-GPU on the uncapped card vs vbhal under the
                 8 GB cap, at 16k and 64k tokens/step; host<->device traffic per step.
* ``capacity`` — under the 8 GB cap: plain AdamW at 0.40B (fits) and at >= 4.7B (OOM), vbhal at >= 4.7B.
* ``largest``  — the largest model the whole machine trains with AdamW (GPU + host RAM + disk tier): fp32
                 masters and AdamW state beyond the RAM budget live on disk; per-step times and disk traffic.
* ``peers``    — torchao CPUOffloadOptimizer and DeepSpeed ZeRO-3 offload, where importable.
* ``hoststep`` — the host AdamW step variants on ``--hoststep-params`` parameters (bf16 gradient in, bf16
                 working copy out): torch fused AdamW with whole-tensor casts (the old engine path), the engine's
                 piecewise fused step (bitwise torch) at a few piece sizes, the compiled one-pass step, and the
                 step on the GPU with master/state streamed over PCIe from pinned memory; seconds per 1e9 params.
                 Runs on CPU too (no GPU row there).

Each part prints a table and merges its results into ``--out`` (JSON; default
``benchmarks/results/offload-<device>.json``).
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import sys
import threading
import time
import traceback
import zlib
from pathlib import Path

# Fewer fragmentation OOMs under the 8 GB cap, for every peer alike (must be set before CUDA initialises).
os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")

import torch
from torch import nn

from vbhal.conformance._reference import split_adamw_reference

GB = 1e9
_SAVE = None  # set by main(): save(part, partial_result) writes the JSON after every row
CAP_BYTES = 8 * 10**9  # "GPU capped at 8 GB"
D_MODEL = 4096
#: lr of the deep stacks (capacity, largest): AdamW's first, sign-like update moves each of 72 d=4096 blocks
#: coherently; at 1e-4 the loss went to inf at step 2 (a deep-stack scale effect, not the tiers; timing does not
#: depend on lr).
DEEP_LR = 2e-6
D_FFN = 4 * D_MODEL
DEV = "cuda"  # --smoke runs every code path on CPU with tiny sizes (no timings worth reading)


class MLPBlock(nn.Module):
    """x + W2 gelu(W1 x): 2 * d * 4d parameters (134M at d=4096); rows (tokens) are independent."""

    def __init__(self, d: int | None = None, ffn: int | None = None) -> None:
        super().__init__()
        d, ffn = d or D_MODEL, ffn or D_FFN
        self.fc1 = nn.Linear(d, ffn, bias=False)
        self.fc2 = nn.Linear(ffn, d, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.fc2(torch.nn.functional.gelu(self.fc1(x)))


def make_model(n_blocks: int, device: str | torch.device, d: int | None = None, ffn: int | None = None) -> nn.Sequential:
    d, ffn = d or D_MODEL, ffn or D_FFN
    with torch.device(device):
        m = nn.Sequential(*[MLPBlock(d, ffn) for _ in range(n_blocks)])
    if str(device) != "meta":
        with torch.no_grad():
            for name, p in m.named_parameters():
                p.normal_(0.0, _std(name, d, ffn))
    return m


def _std(name: str, d: int, ffn: int) -> float:
    # fc1 keeps unit scale, fc2 adds a small residual update: the residual stream stays finite in bf16.
    return 1.0 / math.sqrt(d) if "fc1" in name else 0.2 / math.sqrt(ffn)


_TILE: torch.Tensor | None = None


def fast_host_init(d: int | None = None, ffn: int | None = None):
    """init_fn for apply_offload: fills fp32 host masters with a tiled random pattern at memcpy speed
    (drawing billions of normals on the host would take minutes; timing does not depend on the values)."""

    d, ffn = d or D_MODEL, ffn or D_FFN
    roll = os.environ.get("VBHAL_BENCH_INIT_ROLL", "1") != "0"  # 0: every block the same (the pre-session-4 init)

    def init(name: str, t: torch.Tensor) -> None:
        global _TILE
        if _TILE is None:
            _TILE = torch.randn(1 << 22, generator=torch.Generator().manual_seed(0))
        flat = t.view(-1)
        std = _std(name, d, ffn)
        k = _TILE.numel()
        # Each parameter starts at its own place in the pattern: identical blocks would compound one direction
        # through a deep residual stack (72 identical blocks reached a loss of 8e6 before the first update).
        tile = _TILE.roll(zlib.crc32(name.encode()) % k) if roll else _TILE
        for i in range(0, flat.numel(), k):
            j = min(flat.numel(), i + k)
            torch.mul(tile[: j - i], std, out=flat[i:j])

    return init


def params_of(n_blocks: int, d: int | None = None, ffn: int | None = None) -> int:
    d, ffn = d or D_MODEL, ffn or D_FFN
    return n_blocks * 2 * d * ffn


def sync() -> None:
    torch.cuda.synchronize()


def reset_gpu() -> None:
    gc.collect()
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()


def set_cap(cap: int | None) -> None:
    total = torch.cuda.get_device_properties(0).total_memory
    torch.cuda.set_per_process_memory_fraction(1.0 if cap is None else cap / total)


# ------------------------------------------------------------------------------------------------ plain
def plain_step_fn(model: nn.Module, ckpt: bool, micro: int = 1):
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)

    def step(x: torch.Tensor) -> float:
        total = 0.0
        for xs in x.chunk(micro):
            with torch.autocast(DEV, dtype=torch.bfloat16):
                h = xs
                for b in model:
                    h = torch.utils.checkpoint.checkpoint(b, h, use_reentrant=False) if ckpt else b(h)
                loss = h.float().pow(2).mean() / micro
            loss.backward()
            total += loss.detach()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return total

    return step


def time_steps(step, x, warmup: int, steps: int) -> tuple[float, list[float]]:
    for _ in range(warmup):
        step(x)
    sync()
    times, losses = [], []
    for _ in range(steps):
        t0 = time.perf_counter()
        losses.append(step(x))
        sync()
        times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2], [float(v) for v in losses]


def run_plain(n_blocks: int, tokens: int, cap: int | None, warmup=2, steps=3, ckpt=True) -> dict:
    reset_gpu()
    set_cap(cap)
    res = {"peer": "pytorch (in GPU)", "params": params_of(n_blocks), "tokens": tokens, "cap_bytes": cap}
    model = None
    try:
        model = make_model(n_blocks, DEV)
        x = torch.randn(tokens, D_MODEL, device=DEV, dtype=torch.bfloat16)
        micro = 1
        while True:
            try:
                t, losses = time_steps(plain_step_fn(model, ckpt, micro), x, warmup, steps)
                break
            except torch.OutOfMemoryError:
                if cap is not None or micro >= 8:
                    raise
                micro *= 2  # uncapped: fall back to gradient accumulation, reported
                reset_gpu()
        res.update(status="ok", step_s=t, losses=losses, micro_batches=micro, peak_gpu_bytes=torch.cuda.max_memory_allocated())
    except torch.OutOfMemoryError as e:
        res.update(status="OOM", error=str(e).splitlines()[0][:200])
    finally:
        model = None
        reset_gpu()
        set_cap(None)
    return res


# ------------------------------------------------------------------------------------------------ vbhal
def build_vbhal(n_blocks: int, tokens: int, *, threads: int | None = None, **cfg):
    import vbhal.nn.offload as off
    from vbhal.nn.offload import apply_offload

    if os.environ.get("VBHAL_HOST_STEP_CHUNK"):  # piece size of the host step (from the hoststep part)
        off.HOST_STEP_CHUNK = int(os.environ["VBHAL_HOST_STEP_CHUNK"])
    model = make_model(n_blocks, "meta")
    t0 = time.perf_counter()
    # skip_nonfinite=False: the non-finite check (default on) defers every host step until backward ends, which
    # costs about the backward time per step; the speed rows measure the overlapped engine.
    cfg.setdefault("skip_nonfinite", False)
    if os.environ.get("VBHAL_BENCH_KEEP_BYTES"):  # the keep plan's device budget (default: what the cap leaves)
        cfg.setdefault("resident_cache_bytes", int(float(os.environ["VBHAL_BENCH_KEEP_BYTES"])))
    cfg.setdefault("lr", 1e-4)
    if os.environ.get("VBHAL_BENCH_RESERVE_CORES"):  # cores the host step leaves to the training thread
        cfg.setdefault("reserve_cores", int(os.environ["VBHAL_BENCH_RESERVE_CORES"]))
    # The backward's recompute without its dead ops (opt-in in the engine; these MLP blocks are what it is for);
    # VBHAL_BENCH_RECOMPUTE_SKIP=0: every op recomputed (the engine's default)
    cfg.setdefault("recompute_skip", os.environ.get("VBHAL_BENCH_RECOMPUTE_SKIP", "1") != "0")
    eng = apply_offload(
        model,
        device=DEV,
        work_dtype=torch.bfloat16,
        checkpoint=True,
        init_fn=fast_host_init(),
        optimizer_threads=(threads or int(os.environ.get("VBHAL_BENCH_OPT_THREADS", "0"))
                           or max(1, (os.cpu_count() or 2) - 1)),
        host_step=os.environ.get("VBHAL_HOST_STEP", "compiled"),
        **cfg,
    )
    return model, eng, time.perf_counter() - t0


def vbhal_step_fn(model, eng):
    def step(x: torch.Tensor) -> float:
        with torch.autocast(DEV, dtype=torch.bfloat16):
            loss = model(x).float().pow(2).mean()
        loss.backward()
        eng.step()
        return loss.detach()

    return step


def run_vbhal(model, eng, tokens: int, cap: int | None, warmup=2, steps=3, chunk_tokens=16384, label="",
              max_warmup=10) -> dict:
    """Time `steps` steps of the engine at `tokens` tokens. Per row, the engine plans again (device-stepped share
    and keep plan from this row's own measurements: eng.replan(), before the peak memory statistics are reset);
    warm-up runs at least `warmup` steps and until the plan has settled plus one more step, so one-time costs
    (pinning the device-stepped units' state, the ring, the first fetch of kept copies) stay out of the timing."""
    eng.replan()
    reset_gpu()
    set_cap(cap)
    eng.cfg.chunks = max(1, tokens // chunk_tokens) if tokens > 16384 else 1
    res = {"peer": "vbhal offload" + label, "params": sum(u.train_numel for u in eng.units), "tokens": tokens, "cap_bytes": cap,
           "chunks": eng.cfg.chunks}
    try:
        x = torch.randn(tokens, D_MODEL, device=DEV, dtype=torch.bfloat16)
        step = vbhal_step_fn(model, eng)
        done, settled, t_w = 0, None, time.perf_counter()
        while True:
            step(x)
            done += 1
            if settled is None and not eng.plan_pending:
                settled = done
            if settled is not None and done >= max(warmup, settled + 1):
                break
            if done >= max_warmup:
                break
        sync()
        res.update(warmup_steps=done, plan_settled_after=settled, warmup_s=time.perf_counter() - t_w)
        times, losses, rows = [], [], []
        for _ in range(steps):
            t0 = time.perf_counter()
            losses.append(float(step(x)))
            sync()
            times.append(time.perf_counter() - t0)
            rows.append(eng.stats.steps[-1])
        eng.synchronize()  # resolves the device timing of the last step into its row
        t = sorted(times)[len(times) // 2]
        mean = lambda k: sum(r.get(k, 0) for r in rows) / len(rows)
        h2d, d2h = mean("l0_in"), mean("l0_out")
        summ = eng.memory_summary()
        dev = {k: mean(k) for k in ("dev_compute_s", "dev_fwd_s", "dev_bwd_s", "dev_wait_w_s", "dev_wait_act_s",
                                    "dev_idle_s", "dev_span_s", "alloc_retries", "device_mallocs", "kept_bytes")}
        kinds = {k[6:]: mean(k) / GB for k in rows[-1] if k.startswith("bytes_")}
        res.update(
            status="ok", step_s=t, step_times=times, losses=losses, h2d_bytes_per_step=h2d, d2h_bytes_per_step=d2h,
            h2d_GBps=h2d / t / GB, d2h_GBps=d2h / t / GB, both_GBps=(h2d + d2h) / t / GB,
            host_adamw_s_per_step=mean("l1_busy"), gpu_adamw_s_per_step=mean("gpu_step_s"),
            stall_s_per_step=mean("l1_stall"), GB_by_kind=kinds, **dev,
            gpu_step_fraction=(summ["gpu_step"]["fraction"] or 0.0), gpu_step_units=summ["gpu_step"]["units"],
            gpu_step_note=summ["gpu_step"]["note"], gpu_step_auto=summ["gpu_step"]["auto"],
            step_rows=rows, peak_gpu_bytes=torch.cuda.max_memory_allocated(), **summ,
        )
    except torch.OutOfMemoryError as e:
        res.update(status="OOM", error=str(e).splitlines()[0][:200])
    finally:
        reset_gpu()
        set_cap(None)
    return res


# ------------------------------------------------------------------------------------------------ parts
def pcie_rates(nbytes: int = 256 << 20, reps: int = 4) -> dict:
    """Pinned host <-> device copy rates (bytes/s): up alone, down alone, and both at once on two streams.
    --smoke (CPU): a host memcpy rate stands in for all three."""
    if DEV == "cpu":
        a, b = torch.empty(nbytes, dtype=torch.uint8), torch.empty(nbytes, dtype=torch.uint8)
        b.copy_(a)
        t0 = time.perf_counter()
        b.copy_(a)
        r = nbytes / (time.perf_counter() - t0)
        return {"up": r, "down": r, "both": r}
    host_up = torch.empty(nbytes, dtype=torch.uint8).pin_memory()
    host_down = torch.empty(nbytes, dtype=torch.uint8).pin_memory()
    dev_a = torch.empty(nbytes, dtype=torch.uint8, device=DEV)
    dev_b = torch.empty(nbytes, dtype=torch.uint8, device=DEV)
    s_up, s_down = torch.cuda.Stream(), torch.cuda.Stream()

    def timed(up: bool, down: bool) -> float:
        sync()
        t0 = time.perf_counter()
        for _ in range(reps):
            if up:
                with torch.cuda.stream(s_up):
                    dev_a.copy_(host_up, non_blocking=True)
            if down:
                with torch.cuda.stream(s_down):
                    host_down.copy_(dev_b, non_blocking=True)
        sync()
        return reps * nbytes * (up + down) / (time.perf_counter() - t0)

    timed(True, True)  # warm
    return {"up": timed(True, False), "down": timed(False, True), "both": timed(True, True)}


def schedule_bound(row: dict, in_gpu_s: float, rates: dict) -> dict | None:
    """The shortest step this design can take on this machine (perfect overlap), from one vbhal row's own
    measurements: device compute = the in-GPU step (same run); host AdamW seconds per host-stepped parameter
    as measured in the row (under its PCIe traffic); copy rates of `rates` (pinned, same run). For a share f
    of the parameters stepped on the device, per step: up = the row's weights and activations up + 12 f N
    (fp32 master, exp_avg, exp_avg_sq), down = activations down + 2 (1 - f) N (bf16 gradients) + 14 f N
    (the state and the new bf16 working copy); host = (1 - f) N h. T(f) = max(compute, up / rate_up,
    down / rate_down, (up + down) / rate_both, host), minimised over f in steps of 1/100.

    Optimistic on purpose: h is the row's, taken as constant, though the host's AdamW slows under more copies
    (session 8: 1.57 -> 2.03 s per 1e9 parameters when the share went 0.57 -> 0.67 at 64k tokens); copies the keep
    plan avoids and the deferred steps' gradients up (clipping / non-finite skip, off in this benchmark) are not
    modelled."""
    n = row.get("params")
    f_row = row.get("gpu_step_fraction") or 0.0
    host_s = row.get("host_adamw_s_per_step")
    kinds = row.get("GB_by_kind") or {}
    if not n or not host_s or f_row >= 1.0 or not kinds:
        return None
    h = host_s / ((1.0 - f_row) * n)
    fixed_up = (kinds.get("weights_up", 0.0) + kinds.get("acts_up", 0.0)) * GB
    fixed_down = kinds.get("acts_down", 0.0) * GB
    best = None
    for i in range(101):
        f = i / 100
        up = fixed_up + 12 * f * n
        down = fixed_down + 2 * (1 - f) * n + 14 * f * n
        parts = {"compute": in_gpu_s, "up": up / rates["up"], "down": down / rates["down"],
                 "both": (up + down) / rates["both"], "host": (1 - f) * n * h}
        t = max(parts.values())
        if best is None or t < best["bound_s"]:
            best = {"bound_s": t, "bound_fraction": f, "bound_by": max(parts, key=parts.get),
                    "bound_parts_s": parts}
    best.update(host_s_per_Bparams=h * 1e9, ratio_bound=best["bound_s"] / in_gpu_s,
                rates_GBps={k: v / GB for k, v in rates.items()})
    return best


def part_check(args) -> dict:
    """bf16 at a real size, same seed and data: vbhal vs (a) plain GPU training whose AdamW runs on CPU copies with
    torch's fused CPU kernel (the same arithmetic: expected equal), (b) plain GPU training with CUDA fused AdamW
    (a different AdamW implementation: within a tolerance), (c) vbhal with 2 row chunks + activation offload."""
    import copy

    from vbhal.nn.offload import apply_offload

    torch.manual_seed(0)
    d, ffn, n, tokens, steps, lr = 2048, 8192, 6, 8192, 6, 1e-4
    if DEV == "cpu":  # --smoke
        d, ffn, tokens = 64, 256, 64
    base = make_model(n, "cpu", d, ffn)
    xs = [torch.randn(tokens, d, device=DEV, dtype=torch.bfloat16) for _ in range(steps)]
    ys = [torch.randn(tokens, d, device=DEV, dtype=torch.bfloat16) for _ in range(steps)]

    def loss_of(model, x, y):
        with torch.autocast(DEV, dtype=torch.bfloat16):
            return (model(x).float() - y.float()).pow(2).mean()

    def plain_run(host_adam: bool) -> list[float]:
        # AdamW on fp32 CPU copies (the engine's host step: same arithmetic) or all of it fused on the device
        names = frozenset() if host_adam else frozenset(n for n, _ in base.named_parameters())
        return split_adamw_reference(base, list(zip(xs, ys)), lambda m, b: loss_of(m, *b), DEV, lr, names)[0]

    def vbhal_run(**kw) -> list[float]:
        off = copy.deepcopy(base)
        eng = apply_offload(off, device=DEV, lr=lr, work_dtype=torch.bfloat16, poison=True, **kw)
        out = []
        for x, y in zip(xs, ys):
            loss = loss_of(off, x, y)
            loss.backward()
            eng.step()
            out.append(loss.item())
        eng.close()
        return out

    ref_host, ref_cuda = plain_run(True), plain_run(False)
    exact = vbhal_run(chunks=1, gpu_step_fraction=0.0)
    chunked = vbhal_run(chunks=2, offload_activations=True, gpu_step_fraction=0.0)
    hybrid = vbhal_run(chunks=1, gpu_step_fraction=0.5)

    def rel(a, b):
        return max(abs(u - v) / abs(v) for u, v in zip(a, b))

    res = {
        "model": f"{n} MLP blocks d={d} ffn={ffn}, {tokens} tokens, bf16 autocast, MSE loss, lr {lr}, {steps} steps",
        "plain_host_adamw_losses": ref_host, "plain_cuda_adamw_losses": ref_cuda,
        "vbhal_losses": exact, "vbhal_chunked_losses": chunked,
        "vbhal_equals_plain_same_arithmetic": exact == ref_host,
        "max_rel_diff_vs_plain_host_adamw": rel(exact, ref_host),
        "max_rel_diff_vs_plain_cuda_adamw": rel(exact, ref_cuda),
        "max_rel_diff_chunked_vs_plain": rel(chunked, ref_host),
        "vbhal_hybrid_losses": hybrid, "max_rel_diff_hybrid_vs_plain_cuda_adamw": rel(hybrid, ref_cuda),
    }
    res["pass"] = (res["max_rel_diff_vs_plain_host_adamw"] <= 1e-6 and res["max_rel_diff_vs_plain_cuda_adamw"] <= 1e-2
                   and res["max_rel_diff_chunked_vs_plain"] <= 1e-2 and res["max_rel_diff_hybrid_vs_plain_cuda_adamw"] <= 1e-2
                   and all(math.isfinite(v) for v in exact + chunked + hybrid))
    print(f"check: plain (host AdamW)  {[round(v, 6) for v in ref_host]}")
    print(f"check: plain (CUDA AdamW)  {[round(v, 6) for v in ref_cuda]}")
    print(f"check: vbhal               {[round(v, 6) for v in exact]}  bitwise equal to plain(host AdamW): "
          f"{res['vbhal_equals_plain_same_arithmetic']}")
    print(f"check: vbhal 2 row chunks  {[round(v, 6) for v in chunked]}")
    print(f"check: max rel diff vs plain host-AdamW {res['max_rel_diff_vs_plain_host_adamw']:.2e}, vs CUDA-AdamW "
          f"{res['max_rel_diff_vs_plain_cuda_adamw']:.2e}, chunked {res['max_rel_diff_chunked_vs_plain']:.2e} -> "
          f"{'PASS' if res['pass'] else 'FAIL'}")
    return res


def part_speed(args) -> dict:
    n = args.blocks or 26
    token_list = [int(t) for t in args.tokens.split(",")]
    rows = []
    for tokens in token_list:
        rows.append(run_plain(n, tokens, None, warmup=1, steps=min(2, args.steps)))
        print(_row(rows[-1]), flush=True)
        _SAVE("speed", {"rows": rows})
    gpu_frac = None if args.gpu_step in ("auto", "") else float(args.gpu_step)
    model, eng, t_build = build_vbhal(n, token_list[0], offload_activations=True, gpu_step_fraction=gpu_frac)
    print(f"vbhal engine built in {t_build:.1f} s ({eng.pool.describe()}; host step: {eng.host_step_note}; "
          f"gpu step: {eng.gpu_step_note})", flush=True)
    label = " hybrid" if gpu_frac != 0.0 else ""
    caps = [int(float(c) * 10**9) for c in args.caps.split(",") if c.strip()] or [CAP_BYTES]
    total = torch.cuda.get_device_properties(0).total_memory
    if any(c > total for c in caps):
        raise ValueError(f"--caps {args.caps}: a cap above the device's {total / 10**9:.1f} GB")

    def add(tokens: int, cap: int, row_label: str, fraction: float | None = None, **extra) -> None:
        """One vbhal row (with `extra` fields); `fraction`, when given, is the device-stepped share it runs at (as
        eng.cfg from then)."""
        if fraction is not None:
            eng.cfg.gpu_step_fraction = fraction
        rows.append(run_vbhal(model, eng, tokens, cap, warmup=2, steps=args.steps, chunk_tokens=args.chunk_tokens,
                              label=row_label))
        rows[-1].update(extra)
        print(_row(rows[-1]), flush=True)
        _SAVE("speed", {"rows": rows})

    for tokens in token_list:
        for cap in caps:
            # per row: the engine plans again (auto share from this row's step, keep plan from its peak memory) and
            # warms up until that has settled (run_vbhal)
            add(tokens, cap, label + ("" if cap == CAP_BYTES else f" cap {cap / 10**9:g} GB"), build_s=t_build)
    # VBHAL_BENCH_GPU_FRACS: more rows at the first token count with these fixed device-stepped shares (same engine)
    for f in [float(v) for v in os.environ.get("VBHAL_BENCH_GPU_FRACS", "").split(",") if v.strip()]:
        add(token_list[0], CAP_BYTES, f" hybrid f={f:g}", fraction=f)
    eng.cfg.gpu_step_fraction = gpu_frac
    for tokens in [int(t) for t in args.host_only_tokens.split(",") if t] if label else []:
        add(tokens, CAP_BYTES, " host-only", fraction=0.0)  # the same engine, every AdamW on the host: the comparison row
    eng.close()
    rates = pcie_rates()
    print("pinned copy rates: " + ", ".join(f"{k} {v / GB:.1f} GB/s" for k, v in rates.items()), flush=True)
    for r in rows:
        if r["peer"].startswith("vbhal"):
            base = next((b for b in rows if b["peer"].startswith("pytorch") and b["tokens"] == r["tokens"] and b.get("status") == "ok"), None)
            if base and r.get("status") == "ok":
                r["ratio_vs_in_gpu"] = r["step_s"] / base["step_s"]
                r["schedule_bound"] = bound = schedule_bound(r, base["step_s"], rates)
                if bound:
                    print(f"bound {r['peer']} {r['tokens']} tokens: {bound['bound_s']:.3f} s = {bound['ratio_bound']:.2f}x "
                          f"the in-GPU step (measured {r['step_s']:.3f} s = {r['ratio_vs_in_gpu']:.2f}x), at f = "
                          f"{bound['bound_fraction']:.2f}, bound by {bound['bound_by']}; host AdamW "
                          f"{bound['host_s_per_Bparams']:.3f} s per 1e9 params", flush=True)
    return {"rows": rows, "pcie_GBps": {k: v / GB for k, v in rates.items()}}


def part_capacity(args) -> dict:
    """Under the 8 GB cap: the largest plain PyTorch AdamW model (1, 2, 3 blocks), plain OOM at the vbhal size,
    then vbhal at the largest model this host's RAM holds (>= 4.7B) — also the machine's largest trainable model."""
    rows = []
    for nb in (1, 2, 3):
        rows.append(run_plain(nb, args.cap_tokens, CAP_BYTES, warmup=1, steps=2))
        print(_row(rows[-1]), flush=True)
        _SAVE("capacity", {"rows": rows})
        if rows[-1].get("status") != "ok":
            break
    fits = [r["params"] for r in rows if r.get("status") == "ok"]
    n_big = args.blocks or (4 if args.smoke else _largest_blocks())
    rows.append(run_plain(n_big, args.cap_tokens, CAP_BYTES, warmup=0, steps=1))
    print(_row(rows[-1]), flush=True)
    _SAVE("capacity", {"rows": rows})
    model, eng, t_build = build_vbhal(n_big, args.cap_tokens, offload_activations=True, lr=DEEP_LR)
    rows.append(run_vbhal(model, eng, args.cap_tokens, CAP_BYTES, warmup=1, steps=min(2, args.steps)))
    rows[-1]["lr"] = DEEP_LR
    rows[-1]["build_s"] = t_build
    rows[-1]["host_step"] = eng.host_step_note
    print(_row(rows[-1]), flush=True)
    res = {"rows": rows, "largest_plain_params": max(fits) if fits else None,
           "vbhal_params": rows[-1]["params"] if rows[-1].get("status") == "ok" else None}
    if res["largest_plain_params"] and res["vbhal_params"]:
        res["ratio"] = res["vbhal_params"] / res["largest_plain_params"]
    eng.close()
    return res


def _largest_blocks() -> int:
    """Blocks of 134M params whose host state (fp32 master + AdamW m, v + pinned bf16 weights and grads + pinned
    activations) fits 80% of the RAM available now."""
    from vbhal._sysinfo import host_memory_available

    per_block = params_of(1) * 16 + 16384 * D_MODEL * 2  # bytes
    return max(36, int(host_memory_available() * 0.8 // per_block))


#: Blocks' worth of master + AdamW state that the RAM budget keeps at least: the one being stepped and the next
#: ones read ahead from disk (the engine refuses a budget below one).
LARGEST_MIN_STATE_BLOCKS = 3


def largest_plan(tokens: int, host_avail: int, disk_free: int, host_frac: float = 0.8, disk_frac: float = 0.85,
                 blocks: int | None = None) -> dict:
    """The most blocks the whole machine trains with AdamW (or the plan for `blocks`): pinned bf16 weights + grads
    (4 B/param) and the saved activations stay in host RAM; fp32 masters and AdamW m, v (12 B/param) fill the rest
    of `host_frac` of the available RAM (at least LARGEST_MIN_STATE_BLOCKS blocks' worth), then `disk_frac` of the
    spill directory's free space. Raises ValueError when `blocks` does not fit."""
    p = params_of(1)
    pinned, state = 4 * p + tokens * D_MODEL * 2, 12 * p
    host, disk = int(host_avail * host_frac), int(disk_free * disk_frac)
    keep = LARGEST_MIN_STATE_BLOCKS * state
    most = max(0, min((host + disk) // (pinned + state), (host - keep) // pinned))
    n = most if blocks is None else blocks
    if n < 1 or n > most:
        raise ValueError(f"{n} blocks of {p} params do not fit this machine: at most {most} (RAM budget {host} bytes, "
                         f"disk {disk} bytes, {pinned} pinned + {state} state bytes per block)")
    budget = max(0, host - n * pinned)
    return {"blocks": int(n), "params": params_of(n), "state_budget_bytes": int(budget),
            "state_on_disk_bytes": max(0, n * state - budget), "host_bytes": host, "disk_bytes": disk,
            "host_available": host_avail, "disk_free": disk_free}


def part_largest(args) -> dict:
    """The largest model this whole machine (GPU + pinned host + disk) fully trains with AdamW, with its step
    times. Masters and AdamW state that do not fit the RAM budget live in checksummed files on the disk tier and
    are read and written back every step, so the step is bound by disk bandwidth: steps run until --deadline-s
    (each one's time, loss and disk traffic recorded; the third is the first with the learned order complete)."""
    from vbhal._sysinfo import disk_free, host_memory_available, spill_root

    root = Path(os.environ.get("VBHAL_SPILL_DIR") or spill_root())
    plan = largest_plan(args.cap_tokens, host_memory_available(), disk_free(root), blocks=args.blocks)
    if args.smoke:  # toy sizes: a budget of one block's state, so the disk tier is exercised
        plan = dict(plan, blocks=4, params=params_of(4), state_budget_bytes=12 * params_of(1),
                    state_on_disk_bytes=12 * params_of(3))
    n = plan["blocks"]
    print(f"plan: {n} blocks = {plan['params'] / 1e9:.2f}B params; state in RAM {plan['state_budget_bytes'] / GB:.1f} GB, "
          f"on disk {plan['state_on_disk_bytes'] / GB:.1f} GB ({root}); "
          f"RAM available {plan['host_available'] / GB:.1f} GB, disk free {plan['disk_free'] / GB:.1f} GB", flush=True)
    res = {"plan": plan, "params": plan["params"], "tokens": args.cap_tokens, "spill_root": str(root), "rows": []}
    _SAVE("largest", res)
    deadline = time.perf_counter() + args.deadline_s
    reset_gpu()
    res["lr"] = DEEP_LR
    model, eng, t_build = build_vbhal(n, args.cap_tokens, offload_activations=True, gpu_step_fraction=0.0, lr=res["lr"],
                                      state_budget_bytes=plan["state_budget_bytes"], spill_root=str(root))
    res["build_s"] = t_build
    res["host_step"] = eng.host_step_note
    print(f"built in {t_build:.1f} s ({eng.host_step_note})", flush=True)
    st = eng.state_stack
    try:
        x = torch.randn(args.cap_tokens, D_MODEL, device=DEV, dtype=torch.bfloat16)
        step = vbhal_step_fn(model, eng)
        while True:
            lv = {lvl: (s.bytes_in, s.bytes_out, s.stall_s) for lvl, s in st.stats.levels.items()} if st else {}
            t0 = time.perf_counter()
            loss = float(step(x))
            sync()
            eng.synchronize()  # the step's host AdamW (and its disk traffic) is done
            dt = time.perf_counter() - t0
            row = {"step": len(res["rows"]) + 1, "step_s": dt, "loss": loss}
            if st is not None:
                d = st.stats.levels[1]
                row.update(disk_read_GB=(d.bytes_out - lv[1][1]) / GB, disk_write_GB=(d.bytes_in - lv[1][0]) / GB,
                           state_stall_s=sum(s.stall_s for s in st.stats.levels.values()) - sum(v[2] for v in lv.values()))
                row["disk_GBps"] = (row["disk_read_GB"] + row["disk_write_GB"]) / dt
            res["rows"].append(row)
            _SAVE("largest", res)
            print("  step {step}: {step_s:.1f} s  loss {loss:.4f}".format(**row)
                  + (f"  disk read {row['disk_read_GB']:.1f} GB write {row['disk_write_GB']:.1f} GB "
                     f"({row['disk_GBps']:.2f} GB/s)  stall {row['state_stall_s']:.1f} s" if st is not None else ""), flush=True)
            if not math.isfinite(loss):
                res["status"] = "non-finite loss"
                break
            if len(res["rows"]) >= args.steps or time.perf_counter() + 1.2 * dt > deadline:
                break
        res["status"] = res.get("status", "ok")
        res["step_s"] = res["rows"][-1]["step_s"]
        res["peak_gpu_bytes"] = torch.cuda.max_memory_allocated()
        res["state_stack"] = {t.name: t.used_bytes for t in st.tiers} if st else None
    except torch.OutOfMemoryError as e:
        res.update(status="OOM", error=str(e).splitlines()[0][:200])
    finally:
        eng.close()
    return res


def part_peers(args) -> dict:
    """vbhal vs DeepSpeed ZeRO-3 (param + optimizer offload to CPU) vs torchao CPUOffloadOptimizer, same model,
    same tokens, same 8 GB cap, one process (DeepSpeed last: it initialises torch.distributed)."""
    n, tokens = args.blocks or 10, args.cap_tokens
    rows = []
    # vbhal twice: the defaults (auto hybrid share, no keep plan), then with the opt-in keep plan (R5: 0.325 s/step).
    for keep in (0, None):
        model, eng, t_build = build_vbhal(n, tokens, offload_activations=True, gpu_step_fraction=None,
                                          resident_cache_bytes=keep)
        # warm-up until the auto share and keep plan have settled (their one-time costs, e.g. pinning the state of
        # the device-stepped units, stay out of the timed steps), then at least 3 timed steps (median)
        rows.append(run_vbhal(model, eng, tokens, CAP_BYTES, warmup=2, steps=max(3, args.steps)))
        rows[-1]["build_s"] = t_build
        rows[-1]["config"] = "defaults (auto hybrid, no keep plan)" if keep == 0 else "auto hybrid + keep plan"
        print(_row(rows[-1]), rows[-1]["config"], flush=True)
        _SAVE("peers", {"rows": rows})
        eng.close()
        del model, eng
        gc.collect()
    rows.append(run_deepspeed(n, tokens, CAP_BYTES, steps=args.steps))
    print(_row(rows[-1]), flush=True)
    _SAVE("peers", {"rows": rows})
    if rows[-1].get("status") == "error" and os.environ.get("VBHAL_DS_TORCH_ADAM") != "1":
        os.environ["VBHAL_DS_TORCH_ADAM"] = "1"  # DeepSpeedCPUAdam failed to build: torch AdamW on its CPU partitions
        rows.append(run_deepspeed(n, tokens, CAP_BYTES, steps=args.steps))
        print(_row(rows[-1]), flush=True)
        _SAVE("peers", {"rows": rows})
    _peer_torchao(rows, n, tokens, CAP_BYTES, args.steps)
    _peer_torchao(rows, n, tokens, None, args.steps)
    base = rows[0]
    for r in rows[1:]:
        if r.get("status") == "ok" and base.get("status") == "ok":
            r["vbhal_speedup"] = r["step_s"] / base["step_s"]
    return {"rows": rows}


def _peer_torchao(rows: list, n: int, tokens: int, cap: int | None, steps: int) -> None:
    # torchao keeps bf16 weights and grads on the GPU (only AdamW state and its step on the host).
    try:
        from torchao.optim import CPUOffloadOptimizer  # noqa: F401

        rows.append(run_torchao(n, tokens, cap, steps=steps))
    except ImportError as e:
        rows.append({"peer": "torchao CPUOffloadOptimizer", "status": "unavailable", "error": f"import failed: {e}"})
    print(_row(rows[-1]), flush=True)
    _SAVE("peers", {"rows": rows})


def run_torchao(n: int, tokens: int, cap: int | None, steps: int = 3) -> dict:
    from torchao.optim import CPUOffloadOptimizer

    reset_gpu()
    set_cap(cap)
    res = {"peer": "torchao CPUOffloadOptimizer", "params": params_of(n), "tokens": tokens, "cap_bytes": cap}
    model = None
    try:
        model = make_model(n, DEV).to(torch.bfloat16)
        opt = CPUOffloadOptimizer(model.parameters(), torch.optim.AdamW, lr=1e-4, fused=True)
        x = torch.randn(tokens, D_MODEL, device=DEV, dtype=torch.bfloat16)

        def step(x):
            h = x
            for b in model:
                h = torch.utils.checkpoint.checkpoint(b, h, use_reentrant=False)
            loss = h.float().pow(2).mean()
            loss.backward()
            opt.step()
            opt.zero_grad()
            return loss.detach()

        t, losses = time_steps(step, x, 1, steps)
        res.update(status="ok", step_s=t, losses=losses, peak_gpu_bytes=torch.cuda.max_memory_allocated(),
                   note="bf16 params/grads on GPU (no fp32 master), fp32 AdamW state on host")
    except torch.OutOfMemoryError as e:
        res.update(status="OOM", error=str(e).splitlines()[0][:200])
    except Exception as e:  # noqa: BLE001 - torchao build mismatch with this torch, etc.
        res.update(status="error", error=f"{type(e).__name__}: {e}"[:300])
    finally:
        model = None
        reset_gpu()
        set_cap(None)
    return res


def _ds_cpu_adam_for_host() -> None:
    """DeepSpeedCPUAdam's JIT build wants the CUDA toolkit (nvcc, CUDA_HOME) when a GPU is present, although its
    Adam step is host code. Without a toolkit, build it the way DeepSpeed does on CPU-only machines."""
    from torch.utils import cpp_extension

    if cpp_extension.CUDA_HOME is not None:
        return
    from deepspeed.ops.op_builder.cpu_adam import CPUAdamBuilder

    if getattr(CPUAdamBuilder, "_vbhal_patched", False):
        return
    orig = CPUAdamBuilder.jit_load

    def jit_load(self, verbose=True):
        real = torch.cuda.is_available
        torch.cuda.is_available = lambda: False
        try:
            return orig(self, verbose)
        finally:
            torch.cuda.is_available = real

    CPUAdamBuilder.jit_load = jit_load
    CPUAdamBuilder._vbhal_patched = True


def part_dsbuild(args) -> dict:
    """Build (JIT) DeepSpeedCPUAdam ahead of the peers part, so its compile time is not in the peers' budget."""
    t0 = time.perf_counter()
    try:
        import deepspeed  # noqa: F401

        _ds_cpu_adam_for_host()
        from deepspeed.ops.op_builder.cpu_adam import CPUAdamBuilder

        CPUAdamBuilder().load(verbose=False)
        res = {"status": "ok", "build_s": time.perf_counter() - t0}
    except Exception as e:  # noqa: BLE001 - a peer failing for any reason is a result row
        res = {"status": "error", "error": f"{type(e).__name__}: {e}"[:400], "build_s": time.perf_counter() - t0}
    print(f"DeepSpeedCPUAdam build: {res}", flush=True)
    return res


def run_deepspeed(n: int, tokens: int, cap: int | None, steps: int = 3) -> dict:
    res = {"peer": "deepspeed ZeRO-3 offload", "params": params_of(n), "tokens": tokens, "cap_bytes": cap}
    try:
        import deepspeed
    except Exception as e:  # noqa: BLE001 - ImportError or its own setup errors
        res.update(status="unavailable", error=f"import failed: {type(e).__name__}: {e}"[:300])
        return res
    for k, v in (("MASTER_ADDR", "127.0.0.1"), ("MASTER_PORT", "29517"), ("RANK", "0"), ("WORLD_SIZE", "1"), ("LOCAL_RANK", "0")):
        os.environ.setdefault(k, v)
    reset_gpu()
    set_cap(cap)
    engine = None
    try:
        _ds_cpu_adam_for_host()
        deepspeed.init_distributed(dist_backend="nccl")
        cpu_adam = os.environ.get("VBHAL_DS_TORCH_ADAM") != "1"
        cfg = {
            "train_micro_batch_size_per_gpu": 1,
            "gradient_accumulation_steps": 1,
            "bf16": {"enabled": True},
            "zero_optimization": {
                "stage": 3,
                "offload_param": {"device": "cpu", "pin_memory": True},
                "offload_optimizer": {"device": "cpu", "pin_memory": True},
                "overlap_comm": True,
                "contiguous_gradients": True,
                "stage3_prefetch_bucket_size": 2e8,  # about 3 blocks in flight, like vbhal's prefetch depth
                "stage3_param_persistence_threshold": 1e5,
                "stage3_max_live_parameters": 4e8,
                "stage3_max_reuse_distance": 4e8,
                "sub_group_size": 1e9,
            },
            "optimizer": {"type": "AdamW", "params": {"lr": 1e-4, "weight_decay": 0.01}},
            "zero_force_ds_cpu_optimizer": cpu_adam,
            "steps_per_print": 10**9,
        }
        t0 = time.perf_counter()
        with deepspeed.zero.Init(config_dict_or_path=cfg, remote_device="cpu", pin_memory=True):
            model = make_model(n, DEV)
        optimizer = None
        if not cpu_adam:  # torch's fused CPU AdamW on DeepSpeed's fp32 CPU partitions (as fast as its CPU Adam)
            try:
                optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.01, fused=True)
            except (RuntimeError, TypeError):
                optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.01)
            cfg.pop("optimizer")
        engine, _, _, _ = deepspeed.initialize(model=model, config=cfg, model_parameters=model.parameters(), optimizer=optimizer)
        res["init_s"] = time.perf_counter() - t0
        x = torch.randn(tokens, D_MODEL, device=DEV, dtype=torch.bfloat16)

        def step(x):
            h = x
            for b in engine.module:
                h = torch.utils.checkpoint.checkpoint(b, h, use_reentrant=False)
            loss = h.float().pow(2).mean()
            engine.backward(loss)
            engine.step()
            return loss.detach()

        t, losses = time_steps(step, x, 1, steps)
        res.update(status="ok", step_s=t, losses=losses, peak_gpu_bytes=torch.cuda.max_memory_allocated(),
                   optimizer="DeepSpeedCPUAdam" if cpu_adam else f"torch AdamW on CPU (fused={getattr(optimizer, 'defaults', {}).get('fused')})",
                   deepspeed=deepspeed.__version__)
    except torch.OutOfMemoryError as e:
        res.update(status="OOM", error=str(e).splitlines()[0][:200])
    except Exception as e:  # noqa: BLE001 - compile failure of its CPU Adam, config errors...
        traceback.print_exc()
        res.update(status="error", error=f"{type(e).__name__}: {e}"[:400])
    finally:
        engine = None
        reset_gpu()
        set_cap(None)
    return res


def part_hoststep(args) -> dict:
    """Seconds per 1e9 parameters of each host AdamW variant, on one flat unit of --hoststep-params parameters
    stepped in pieces of 134M (one d=4096 MLP block) like the engine does."""
    import vbhal.nn.offload as off

    n_total = args.hoststep_params
    unit = min(n_total, 2 * 4096 * 16384)
    n_units = max(1, n_total // unit)
    n = n_units * unit
    threads = max(1, (os.cpu_count() or 2) - 1)
    torch.set_num_threads(threads)
    rows: list[dict] = []
    p = torch.randn(n) * 0.02
    m, v = torch.zeros(n), torch.zeros(n)
    g = (torch.randn(n) * 1e-3).to(torch.bfloat16)
    w = torch.empty(n, dtype=torch.bfloat16)
    b1, b2, lr, wd, eps = 0.9, 0.999, 1e-4, 0.01, 1e-8
    step_t = torch.tensor(0.0)
    g32 = torch.empty(unit)

    def timed(name: str, fn, reps: int = 2, **extra) -> None:
        fn()  # warm-up (first touch, compile caches)
        t0 = time.perf_counter()
        for _ in range(reps):
            fn()
        sync() if torch.cuda.is_available() else None
        s = (time.perf_counter() - t0) / reps
        rows.append({"variant": name, "params": n, "s_per_step": s, "s_per_Bparams": s / n * 1e9, **extra})
        _SAVE("hoststep", {"rows": rows})
        print(f"hoststep {name:38s} {s / n * 1e9:7.3f} s per 1e9 params ({n / 1e9:.2f}B, {threads} threads)", flush=True)

    def torch_whole() -> None:  # cast whole unit, fused step, cast back: ~40 bytes per parameter
        for u in range(n_units):
            sl = slice(u * unit, (u + 1) * unit)
            g32.copy_(g[sl])
            step_t.add_(1)
            torch._fused_adamw_([p[sl]], [g32], [m[sl]], [v[sl]], [], [step_t], lr=lr, beta1=b1, beta2=b2,
                                weight_decay=wd, eps=eps, amsgrad=False, maximize=False)
            w[sl].copy_(p[sl])

    def chunked(chunk: int):
        def run() -> None:  # the engine's piecewise step (same code shape as OffloadEngine._host_step_chunked)
            for u in range(n_units):
                step_t.add_(1)
                for a in range(u * unit, (u + 1) * unit, chunk):
                    b = min((u + 1) * unit, a + chunk)
                    gc_ = g32[: b - a]
                    gc_.copy_(g[a:b])
                    torch._fused_adamw_([p[a:b]], [gc_], [m[a:b]], [v[a:b]], [], [step_t], lr=lr, beta1=b1, beta2=b2,
                                        weight_decay=wd, eps=eps, amsgrad=False, maximize=False)
                    w[a:b].copy_(p[a:b])
        return run

    timed("torch fused, whole-unit casts", torch_whole)
    for chunk in (1 << 18, 1 << 20, 1 << 22):
        timed(f"torch fused, pieces of {chunk >> 10}K (engine)", chunked(chunk), chunk=chunk)
    if torch.cuda.is_available() and DEV == "cuda":
        _hoststep_gpu(rows, n, unit, timed)
    t0 = time.perf_counter()
    fn = off._make_compiled_step()
    t_compile = time.perf_counter() - t0
    if fn is not None:
        hp = torch.tensor([1 - lr * wd, b1, 1 - b1, b2, 1 - b2, lr / (1 - b1), math.sqrt(1 - b2), eps], dtype=torch.float64)

        def compiled() -> None:
            for u in range(n_units):
                sl = slice(u * unit, (u + 1) * unit)
                fn(p[sl], m[sl], v[sl], g[sl], w[sl], hp)

        timed("compiled one-pass", compiled, compile_s=t_compile)
    else:
        rows.append({"variant": "compiled one-pass", "status": "compile failed", "compile_s": t_compile})
    # AdamW state decayed into the subnormal range (zero gradients for a while: rare embedding rows, unrouted
    # experts), stepped in a fresh thread as the engine's host-step thread does, without and with its FTZ/DAZ
    # (OffloadConfig.host_flush_denormal, on by default).
    g.zero_()
    for flush in (False, True):
        def decayed(flush=flush) -> None:
            # filled here, on a thread without FTZ: under FTZ the fill itself would store zeros
            m.fill_(1e-39)
            v.fill_(1e-40)

            def run() -> None:
                if flush:
                    torch.set_flush_denormal(True)
                torch.set_num_threads(threads)
                chunked(1 << 22)()
            th = threading.Thread(target=run)
            th.start()
            th.join()
        timed(f"pieces of 4096K, subnormal state{', flushed' if flush else ''} (+ m, v refill)", decayed, flush=flush)
    gc.collect()
    return {"rows": rows, "threads": threads}


def _hoststep_gpu(rows: list, n: int, unit: int, timed) -> None:
    """AdamW of host-resident state on the GPU: master/exp_avg/exp_avg_sq (pinned) go up in pieces on a copy
    stream, torch's fused CUDA AdamW steps them, they and the bf16 working copy come back on another stream;
    the gradient is already on the device (as in the engine). Three pieces in flight."""
    piece = 1 << 24  # 16M params: 192 MB of state per piece on the device
    n = min(n, 8 * piece * 4)
    try:
        hp_ = [torch.empty(n, pin_memory=True) for _ in range(3)]
        for t in hp_:
            t.normal_() if t is hp_[0] else t.zero_()
        w_h = torch.empty(n, dtype=torch.bfloat16, pin_memory=True)
        g_d = (torch.randn(piece, device="cuda") * 1e-3)
        bufs = [[torch.empty(piece, device="cuda") for _ in range(3)] for _ in range(3)]
        w_d = [torch.empty(piece, device="cuda", dtype=torch.bfloat16) for _ in range(3)]
        up, down = torch.cuda.Stream(), torch.cuda.Stream()
        comp = torch.cuda.current_stream()
        step_d = torch.tensor(1.0, device="cuda")
        freed = [torch.cuda.Event() for _ in range(3)]
        for e in freed:
            e.record(down)

        def run() -> None:
            for k, a in enumerate(range(0, n, piece)):
                b = min(n, a + piece)
                s = k % 3
                bb = bufs[s]
                with torch.cuda.stream(up):
                    up.wait_event(freed[s])
                    for d, h in zip(bb, hp_):
                        d[: b - a].copy_(h[a:b], non_blocking=True)
                    ev = torch.cuda.Event()
                    ev.record(up)
                comp.wait_event(ev)
                torch._fused_adamw_([bb[0][: b - a]], [g_d[: b - a]], [bb[1][: b - a]], [bb[2][: b - a]], [], [step_d],
                                    lr=1e-4, beta1=0.9, beta2=0.999, weight_decay=0.01, eps=1e-8, amsgrad=False, maximize=False)
                w_d[s][: b - a].copy_(bb[0][: b - a])
                ev2 = torch.cuda.Event()
                ev2.record(comp)
                with torch.cuda.stream(down):
                    down.wait_event(ev2)
                    for d, h in zip(bb, hp_):
                        h[a:b].copy_(d[: b - a], non_blocking=True)
                    w_h[a:b].copy_(w_d[s][: b - a], non_blocking=True)
                    freed[s].record(down)
            torch.cuda.synchronize()

        timed("GPU step, state streamed (pinned)", run, reps=3)
        rows[-1]["params"] = n
        rows[-1]["pcie_GBps_each_way"] = n * 12 / rows[-1]["s_per_step"] / GB
    except Exception as e:  # noqa: BLE001 - a row, not a crash
        rows.append({"variant": "GPU step, state streamed (pinned)", "status": "error", "error": f"{type(e).__name__}: {e}"[:300]})
    finally:
        gc.collect()
        torch.cuda.empty_cache()


def _row(r: dict) -> str:
    def f(k, fmt):
        v = r.get(k)
        return "-" if v is None else format(v, fmt)

    return (f"{r.get('peer', ''):30s} params={r.get('params', 0) / 1e9:6.2f}B tokens={r.get('tokens', 0):6d} "
            f"cap={'8GB' if r.get('cap_bytes') else 'none':4s} status={r.get('status')} step_s={f('step_s', '.3f')} "
            f"ratio={f('ratio_vs_in_gpu', '.2f')} vs_vbhal={f('vbhal_speedup', '.2f')} h2d={f('h2d_GBps', '.1f')}GB/s d2h={f('d2h_GBps', '.1f')}GB/s "
            f"hostAdamW={f('host_adamw_s_per_step', '.3f')}s gpuAdamW={f('gpu_adamw_s_per_step', '.3f')}s "
            f"gpuFrac={f('gpu_step_fraction', '.2f')} stall={f('stall_s_per_step', '.3f')}s "
            f"peakGPU={f('peak_gpu_bytes', '.3e')} {r.get('error', '')}"
            + (f"\n{'':30s} device: compute={f('dev_compute_s', '.3f')}s (fwd {f('dev_fwd_s', '.3f')} bwd "
               f"{f('dev_bwd_s', '.3f')}) waitW={f('dev_wait_w_s', '.3f')}s waitAct={f('dev_wait_act_s', '.3f')}s "
               f"idle={f('dev_idle_s', '.3f')}s span={f('dev_span_s', '.3f')}s allocRetries={f('alloc_retries', '.1f')} "
               f"mallocs={f('device_mallocs', '.1f')} warmup={r.get('warmup_steps')} chunks={r.get('chunks')} "
               f"kept={f('kept_bytes', '.2e')}B\n{'':30s} GB/step: "
               + " ".join(f"{k}={v:.2f}" for k, v in (r.get("GB_by_kind") or {}).items())
               + f" | keep plan: {_plan_str(r.get('keep_plan'))}" if "dev_compute_s" in r or "GB_by_kind" in r else ""))


def _plan_str(p) -> str:
    if not p:
        return "-"
    return (f"budget {p.get('budget_bytes', 0) / GB:.2f} GB ({p.get('source')}), all={p.get('all')} "
            f"acts={p.get('acts')} fb={p.get('fb')} used {p.get('used_bytes', 0) / GB:.2f} GB")


def _smoke_mode() -> None:
    """CPU stand-ins for the CUDA calls and toy sizes, so the whole script can be exercised without a GPU."""
    global DEV, D_MODEL, D_FFN, CAP_BYTES
    DEV, D_MODEL, D_FFN, CAP_BYTES = "cpu", 64, 256, 10**9
    cuda = torch.cuda
    cuda.synchronize = lambda *a, **k: None
    cuda.empty_cache = lambda: None
    cuda.reset_peak_memory_stats = lambda *a: None
    cuda.max_memory_allocated = lambda *a: 0
    cuda.set_per_process_memory_fraction = lambda *a, **k: None
    cuda.get_device_name = lambda *a: "cpu-smoke"

    class _Props:
        total_memory = 80 * 10**9

    cuda.get_device_properties = lambda *a: _Props()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("parts", nargs="+", choices=["check", "speed", "capacity", "largest", "peers", "dsbuild", "hoststep"])
    ap.add_argument("--hoststep-params", type=int, default=5 * 10**8)
    ap.add_argument("--tokens", default="16384,65536")
    ap.add_argument("--cap-tokens", type=int, default=16384)
    ap.add_argument("--blocks", type=int, default=None)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--caps", default="", help="speed: GPU caps in GB for the vbhal rows (comma list; default the 8 GB "
                    "cap), e.g. 8,12,20 to see what memory pressure (allocator retries, chunking) costs")
    ap.add_argument("--deadline-s", type=float, default=420.0, help="largest: no new step after this many seconds")
    ap.add_argument("--chunk-tokens", type=int, default=8192)
    ap.add_argument("--gpu-step", default="auto", help="speed: gpu_step_fraction of the vbhal rows ('auto' or 0..1)")
    ap.add_argument("--host-only-tokens", default="16384",
                    help="speed: token counts also run with every AdamW on the host (comma list; '' for none)")
    ap.add_argument("--smoke", action="store_true", help="run every code path on CPU at toy sizes (a test of this script)")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    if args.smoke:
        _smoke_mode()
    elif not torch.cuda.is_available() and args.parts != ["hoststep"]:
        print("bench_offload needs a CUDA GPU (it measures host<->device streaming); nothing to do here")
        return 0
    dev = torch.cuda.get_device_name(0) if torch.cuda.is_available() or args.smoke else "cpu"
    short = "h100" if "H100" in dev else ("h200" if "H200" in dev else dev.replace(" ", "_").lower())
    out = Path(args.out or f"benchmarks/results/offload-{short}.json")
    data = json.loads(out.read_text()) if out.exists() else {}
    data["device"] = dev
    data["torch"] = torch.__version__
    data["cpu_count"] = os.cpu_count()
    rc = 0

    def save(part: str, partial: dict) -> None:
        data[part] = dict(partial, partial=True)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(data, indent=1, default=str))

    global _SAVE
    _SAVE = save
    for part in args.parts:
        print(f"== {part} ==", flush=True)
        t0 = time.perf_counter()
        try:
            data[part] = globals()[f"part_{part}"](args)
        except Exception as e:  # noqa: BLE001 - record and go on with the next part
            traceback.print_exc()
            data[part] = {"error": f"{type(e).__name__}: {e}"[:500]}
            rc = 1
        data[part]["wall_s"] = time.perf_counter() - t0
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(data, indent=1, default=str))
    print(f"wrote {out}")
    return rc


if __name__ == "__main__":
    sys.exit(main())
