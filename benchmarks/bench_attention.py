"""Attention benchmark: SDPA's backends against vbhal's Triton kernel and dispatcher, one run, one GPU.

Grid (the issue's): 16k tokens per batch (B = 16384 / S), model width 2048 (32 heads of 64 or 16 heads
of 128), S in {1k, 2k, 4k, 8k, 16k}, causal and not, forward and forward+backward, bf16. Plus
grouped-query shapes (Hkv = Hq / 4; SDPA with ``enable_gqa``) for the dispatcher's table, packed
variable-length input (ours against one SDPA call per document), and peak memory of forward+backward
at S = 64k.

Providers are timed identically (CUDA events around windows of back-to-back calls, median of 7
windows) and round-robin with a rotating order on the same inputs (``measure_interleaved``), so drift
or other work on the GPU hits all of them alike. ``sdpa_default2`` is the very same call as
``sdpa_default`` timed as a separate provider: its ratio to ``sdpa_default`` is the noise floor of
the "dispatcher vs default" column. Throughput is reported as TFLOP/s with the usual attention count: forward 4 * B * Hq * Sq * Sk * D
(halved when causal), backward 2.5x the forward, so forward+backward = 3.5x the forward FLOPs.

    python benchmarks/bench_attention.py                  # full grid
    python benchmarks/bench_attention.py --budget 150     # stop measuring after 150 s (rest marked)

Prints a table and writes ``benchmarks/results/attention-<device>.json`` (input of
``benchmarks/make_attention_table.py``, which writes the dispatcher's table).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import re
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

PROVIDERS = ("sdpa_default", "sdpa_flash", "sdpa_cudnn", "sdpa_efficient", "vbhal", "vbhal_dispatch", "sdpa_default2")
#: Providers timed with extra windows (the dispatcher claim: dispatcher vs default, default2 = noise).
TRIO = ("sdpa_default", "vbhal_dispatch", "sdpa_default2")
TOKENS = 16384
WIDTH = 2048
SEQS = (1024, 2048, 4096, 8192, 16384)


def _fn(provider: str):
    from vbhal.backends.cuda.attention import flash_attention
    from vbhal.backends.cuda.attention_dispatch import attention as dispatch, sdpa

    if provider == "vbhal":
        return lambda q, k, v, causal: flash_attention(q, k, v, causal=causal)
    if provider == "vbhal_dispatch":
        return lambda q, k, v, causal: dispatch(q, k, v, causal=causal)
    return _strict_sdpa(provider)


def _strict_sdpa(provider: str):
    """SDPA pinned to exactly one backend (no fallback: a refusal is reported, not hidden)."""
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    backend = {"sdpa_flash": SDPBackend.FLASH_ATTENTION, "sdpa_cudnn": SDPBackend.CUDNN_ATTENTION,
               "sdpa_efficient": SDPBackend.EFFICIENT_ATTENTION}.get(provider)  # sdpa_default(2): None

    def run(q, k, v, causal):
        gqa = {"enable_gqa": True} if q.shape[1] != k.shape[1] else {}
        if backend is None:
            return F.scaled_dot_product_attention(q, k, v, is_causal=causal, **gqa)
        with sdpa_kernel([backend]):
            return F.scaled_dot_product_attention(q, k, v, is_causal=causal, **gqa)

    return run


def _time(fn, window_ms: float = 4.0, rounds: int = 7) -> float:
    """Median milliseconds per call of fn(): ``rounds`` windows of back-to-back calls, CUDA events."""
    fn()
    fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    fn()
    end.record()
    end.synchronize()
    n = int(min(200, max(2, window_ms / max(start.elapsed_time(end), 1e-3))))
    times = []
    for _ in range(rounds):
        start.record()
        for _ in range(n):
            fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / n)
    times.sort()
    return times[len(times) // 2]


def _flops(b, h, s, d, causal, mode):
    f = 4.0 * b * h * s * s * d * (0.5 if causal else 1.0)
    return f * (3.5 if mode == "fwdbwd" else 1.0)


def measure(provider, b, hq, hkv, s, d, causal, mode, dtype=torch.bfloat16):
    """One provider alone (used by tune_attention.py)."""
    return measure_interleaved([provider], b, hq, hkv, s, d, causal, mode, dtype)[provider]


def measure_interleaved(providers, b, hq, hkv, s, d, causal, mode, dtype=torch.bfloat16, window_ms=4.0, rounds=7,
                        fns=None, trio=(), trio_rounds=12, seed=0):
    """Median ms and TFLOP/s of each provider, timed round-robin on the same inputs.

    Every provider is timed the same way: a CUDA event, ``n`` calls back to back (``n`` chosen so
    that one window is about ``window_ms`` of GPU time), a second event, a sync; ms = window / n.
    Back-to-back calls let the host run ahead of the GPU as in training, so per-call Python cost only
    counts where it exceeds the kernel's time. Providers take turns window by window in an order
    shuffled every round (seeded), so that no provider always runs first or right after the same
    other one, and clock drift or other work on the GPU hits all of them alike; the median of the
    windows is kept. ``trio`` (e.g. default, dispatcher, default2) then gets ``trio_rounds`` more
    windows each, cycling through every order of the trio (each one follows each other equally
    often), and its medians are over all its windows: the dispatcher-vs-default ratio is the one
    the grid's claim rests on, so it gets the most samples. ``fns`` maps a provider name to its own
    ``fn(q, k, v, causal)`` (tune_attention.py's candidates); others come from ``_fn``.
    Returns {provider: (ms, tflops)} or {provider: exception} for a provider that refused the shape.
    """
    import itertools
    import random

    gen = torch.Generator(device="cuda").manual_seed(0)
    q = torch.randn(b, hq, s, d, device="cuda", dtype=dtype, generator=gen)
    k = torch.randn(b, hkv, s, d, device="cuda", dtype=dtype, generator=gen)
    v = torch.randn(b, hkv, s, d, device="cuda", dtype=dtype, generator=gen)
    do = torch.randn(b, hq, s, d, device="cuda", dtype=dtype, generator=gen)
    if mode != "fwd":
        for t in (q, k, v):
            t.requires_grad_(True)
    steps, out = {}, {}
    for p in providers:
        fn = (fns or {}).get(p) or _fn(p)
        if mode == "fwd":
            def step(fn=fn):
                with torch.no_grad():
                    fn(q, k, v, causal)
        else:
            def step(fn=fn):
                fn(q, k, v, causal).backward(do)
                q.grad = k.grad = v.grad = None
        try:
            step()
            step()  # second call: plan caches (cuDNN graphs, dispatcher plans) are warm
            torch.cuda.synchronize()
            steps[p] = step
        except Exception as e:
            out[p] = e
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    calls = {}
    for p, step in steps.items():
        start.record()
        step()
        end.record()
        end.synchronize()
        calls[p] = int(min(200, max(2, window_ms / max(start.elapsed_time(end), 1e-3))))
    # Same call count for every provider of the shape (the fastest one's): identical host/GPU overlap.
    n = min(calls.values()) if calls else 1
    names = list(steps)
    times = {p: [] for p in names}

    def window(p):
        step = steps[p]
        start.record()
        for _ in range(n):
            step()
        end.record()
        end.synchronize()
        times[p].append(start.elapsed_time(end) / n)

    rng = random.Random(seed)
    for r in range(rounds):
        order = names[r % len(names):] + names[: r % len(names)]
        rng.shuffle(order)
        for p in order:
            window(p)
    trio = [p for p in trio if p in steps]
    if len(trio) > 1:
        orders = list(itertools.permutations(trio))
        for r in range(trio_rounds):
            for p in orders[r % len(orders)]:
                window(p)
    flops = _flops(b, hq, s, d, causal, mode)
    for p, ts in times.items():
        ts.sort()
        ms = ts[len(ts) // 2]
        out[p] = (ms, flops / ms / 1e9)
    return out


def _default_backend(b, hq, hkv, s, d, causal, dtype=torch.bfloat16) -> str:
    """Which backend F.scaled_dot_product_attention's default runs for this shape (SDPA's own choice)."""
    try:
        q = torch.empty(b, hq, s, d, device="cuda", dtype=dtype)
        k = torch.empty(b, hkv, s, d, device="cuda", dtype=dtype)
        kw = {"enable_gqa": True} if hq != hkv else {}
        choice = int(torch._fused_sdp_choice(q, k, k, is_causal=causal, **kw))
        from torch.nn.attention import SDPBackend

        name = SDPBackend(choice).name
        return {"FLASH_ATTENTION": "sdpa_flash", "CUDNN_ATTENTION": "sdpa_cudnn",
                "EFFICIENT_ATTENTION": "sdpa_efficient"}.get(name, name.lower())
    except Exception as e:  # private API: record why, never fail the benchmark
        return f"unknown ({type(e).__name__})"


def _dispatch_plan(b, hq, hkv, s, d, causal, needs_grad, dtype=torch.bfloat16) -> str:
    """What vbhal's dispatcher runs for this shape (from the committed table)."""
    from vbhal.backends.cuda.attention_dispatch import choose

    return choose(dtype=dtype, head_dim=d, seq=s, causal=causal, gqa=hq != hkv, needs_grad=needs_grad,
                  device_name=torch.cuda.get_device_name(0))[0]


def measure_varlen(provider, lens, hq, hkv, d, dtype=torch.bfloat16):
    """Packed documents, causal, forward+backward: ours with cu_seqlens vs SDPA one call per document."""
    from vbhal.backends.cuda.attention import flash_attention
    from vbhal.backends.cpu.attention import attention as per_document

    t = sum(lens)
    cu = torch.tensor([0] + list(torch.tensor(lens).cumsum(0).tolist()), dtype=torch.int32, device="cuda")
    q = torch.randn(t, hq, d, device="cuda", dtype=dtype, requires_grad=True)
    k = torch.randn(t, hkv, d, device="cuda", dtype=dtype, requires_grad=True)
    v = torch.randn(t, hkv, d, device="cuda", dtype=dtype, requires_grad=True)
    do = torch.randn_like(q)
    fn = flash_attention if provider == "vbhal" else per_document

    def step():
        fn(q, k, v, causal=True, cu_seqlens=cu, max_seqlen=max(lens)).backward(do)
        q.grad = k.grad = v.grad = None

    ms = _time(step)
    flops = sum(_flops(1, hq, n, d, True, "fwdbwd") for n in lens)
    return ms, flops / ms / 1e9


def peak_memory(provider, s, hq, d, dtype=torch.bfloat16):
    """Peak extra GiB of one forward+backward at batch 1 (inputs and their gradients excluded)."""
    fn = _fn(provider)
    q, k, v = (torch.randn(1, hq, s, d, device="cuda", dtype=dtype, requires_grad=True) for _ in range(3))
    do = torch.randn_like(q)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    # Baseline: inputs, dO, and the q/k/v gradients backward must allocate whatever the kernel.
    base = torch.cuda.memory_allocated() + 3 * q.numel() * q.element_size()
    fn(q, k, v, True).backward(do)
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**30


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--budget", type=float, default=1e9, help="seconds of measuring before the rest is skipped")
    ap.add_argument("--providers", default=",".join(PROVIDERS))
    ap.add_argument("--seqs", default=",".join(map(str, SEQS)))
    ap.add_argument("--out", default=None)
    ap.add_argument("--skip-memory", action="store_true")
    ap.add_argument("--trio-rounds", type=int, default=12,
                    help="extra windows each for SDPA default / dispatcher / default2 (all orders of the trio)")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench_attention: no CUDA device; this benchmark times GPU kernels only.")
        return 0
    t0 = time.time()
    device = torch.cuda.get_device_name(0)
    slug = re.sub(r"[^a-z0-9]+", "-", device.lower()).strip("-")
    out_path = Path(args.out or Path(__file__).parent / "results" / f"attention-{slug}.json")
    providers = args.providers.split(",")
    seqs = [int(s) for s in args.seqs.split(",")]
    meta = {"device": device, "torch": torch.__version__, "python": platform.python_version(),
            "dtype": "bfloat16", "tokens_per_batch": TOKENS, "width": WIDTH,
            "flops": "fwd 4*B*Hq*S*S*D (x0.5 causal); fwdbwd 3.5x fwd"}
    try:
        import triton

        meta["triton"] = triton.__version__
    except ImportError:
        pass
    rows, skipped = [], 0

    def save():
        out_path.parent.mkdir(parents=True, exist_ok=True)
        out_path.write_text(json.dumps({"meta": meta, "rows": rows, "skipped": skipped}, indent=1))

    cases = []
    for d in (128, 64):
        for causal in (True, False):
            for s in seqs:
                cases.append((d, causal, s, WIDTH // d, WIDTH // d))
    for d in (128,):
        for causal in (True, False):
            for s in (2048, 8192):
                cases.append((d, causal, s, WIDTH // d, WIDTH // d // 4))  # GQA, group 4
    for d, causal, s, hq, hkv in cases:
        b = max(1, TOKENS // s)
        for mode in ("fwd", "fwdbwd"):
            if time.time() - t0 > args.budget:
                skipped += len(providers)
                continue
            got = measure_interleaved(providers, b, hq, hkv, s, d, causal, mode, trio=TRIO,
                                      trio_rounds=args.trio_rounds, seed=len(rows))
            for p in providers:
                row = {"provider": p, "head_dim": d, "causal": causal, "seq": s, "batch": b, "hq": hq, "hkv": hkv,
                       "gqa": hq != hkv, "mode": mode}
                if p == "sdpa_default":
                    row["default_backend"] = _default_backend(b, hq, hkv, s, d, causal)
                if p == "vbhal_dispatch":
                    row["dispatch_impl"] = _dispatch_plan(b, hq, hkv, s, d, causal, mode == "fwdbwd")
                r = got[p]
                if isinstance(r, Exception):  # a backend refusing a shape is a result, not a crash
                    row["error"] = f"{type(r).__name__}: {(str(r).splitlines() or [''])[0][:160]}"
                else:
                    row["ms"], row["tflops"] = r
                rows.append(row)
            torch.cuda.empty_cache()
        save()

    varlen = []
    if time.time() - t0 < args.budget:
        lens = [3000, 1000, 517, 7000, 64, 2048, 2757]  # 16383 tokens, ragged
        for p in ("vbhal", "sdpa_per_document"):
            try:
                ms, tf = measure_varlen(p, lens, 16, 16, 128)
                varlen.append({"provider": p, "ms": ms, "tflops": tf, "lens": lens})
            except Exception as e:
                varlen.append({"provider": p, "error": f"{type(e).__name__}: {str(e)[:160]}"})
    memory = []
    if not args.skip_memory and time.time() - t0 < args.budget:
        for p in ("sdpa_default", "sdpa_flash", "sdpa_cudnn", "sdpa_efficient", "vbhal"):
            try:
                memory.append({"provider": p, "seq": 65536, "hq": 16, "head_dim": 128,
                               "peak_gib": peak_memory(p, 65536, 16, 128)})
            except Exception as e:
                memory.append({"provider": p, "seq": 65536, "error": f"{type(e).__name__}: {str(e)[:120]}"})
            torch.cuda.empty_cache()
    meta["seconds"] = round(time.time() - t0, 1)
    out = {"meta": meta, "rows": rows, "varlen": varlen, "memory": memory, "skipped": skipped}
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_text(json.dumps(out, indent=1))
    print_table(out)
    print(f"wrote {out_path}")
    return 0


def print_table(out):
    rows = out["rows"]
    meta = out["meta"]
    print(f"# attention, {meta['device']}, torch {meta['torch']}, triton {meta.get('triton')}, bf16, TFLOP/s")
    provs = [p for p in PROVIDERS if any(r["provider"] == p for r in rows)]
    short = {"sdpa_default": "default", "sdpa_flash": "flash", "sdpa_cudnn": "cudnn", "sdpa_efficient": "effic",
             "vbhal": "vbhal", "vbhal_dispatch": "dispatch", "sdpa_default2": "default2"}
    print(f"{'hd':>3} {'cau':>3} {'gqa':>3} {'S':>6} {'mode':>6} | " + " ".join(f"{short[p]:>8}" for p in provs)
          + " | vb/fl vb/cu dp/def d2/def")
    keys = []
    for r in rows:
        key = (r["head_dim"], r["causal"], r["gqa"], r["seq"], r["mode"])
        if key not in keys:
            keys.append(key)
    for key in keys:
        got = {r["provider"]: r for r in rows if (r["head_dim"], r["causal"], r["gqa"], r["seq"], r["mode"]) == key}
        cells = []
        for p in provs:
            r = got.get(p)
            cells.append(f"{r['tflops']:8.1f}" if r and "tflops" in r else f"{'err' if r else '-':>8}")

        def ratio(a, b):
            ra, rb = got.get(a, {}), got.get(b, {})
            return f"{ra['tflops'] / rb['tflops']:5.2f}" if "tflops" in ra and "tflops" in rb else "    -"

        hd, c, g, s, mode = key
        print(f"{hd:>3} {'y' if c else 'n':>3} {'y' if g else 'n':>3} {s:>6} {mode:>6} | " + " ".join(cells)
              + f" | {ratio('vbhal', 'sdpa_flash')} {ratio('vbhal', 'sdpa_cudnn')} {ratio('vbhal_dispatch', 'sdpa_default')} {ratio('sdpa_default2', 'sdpa_default')}")
    errs = {(r["provider"], r["error"]) for r in rows if "error" in r}
    for p, e in sorted(errs)[:8]:
        print(f"  error {p}: {e}")
    for r in out.get("varlen", []):
        print(f"varlen causal fwd+bwd {r['provider']:>18}: " + (f"{r['ms']:.2f} ms {r['tflops']:.1f} TFLOP/s" if "ms" in r else r["error"]))
    for r in out.get("memory", []):
        print(f"peak fwd+bwd S=64k hd128 16 heads {r['provider']:>15}: " + (f"{r['peak_gib']:.2f} GiB" if "peak_gib" in r else r["error"]))
    if out.get("skipped"):
        print(f"skipped (time budget): {out['skipped']} measurements")
    print_targets(out)


def print_targets(out) -> None:
    """The issue's targets, one line each, from one run's rows."""
    rows = [r for r in out["rows"] if "tflops" in r]

    def get(p, **kw):
        return {r["seq"]: r["tflops"] for r in rows if r["provider"] == p and all(r[k] == v for k, v in kw.items())}

    long = dict(head_dim=128, causal=True, gqa=False)
    fwd = get("vbhal", mode="fwd", **long)
    if fwd:
        print("target fwd hd128 causal >= 450 TFLOP/s at S>=4k: " +
              "  ".join(f"S={s}:{t:.0f}" for s, t in sorted(fwd.items()) if s >= 4096))
    ours, cu, fl = (get(p, mode="fwdbwd", **long) for p in ("vbhal", "sdpa_cudnn", "sdpa_flash"))
    if ours:
        print("target fwd+bwd hd128 causal >= 0.8x cuDNN, >= 1.0x flash at S>=4k: " + "  ".join(
            f"S={s}:{ours[s] / cu[s]:.2f}x/{ours[s] / fl[s]:.2f}x" for s in sorted(ours)
            if s >= 4096 and s in cu and s in fl))
    # Dispatcher vs SDPA default, next to the noise of the identical default call timed twice.
    keyf = ("head_dim", "causal", "gqa", "seq", "mode")
    base = {tuple(r[k] for k in keyf): r for r in rows if r["provider"] == "sdpa_default"}
    ratios, noise, routed = {}, {}, {}
    for r in rows:
        key = tuple(r[k] for k in keyf)
        if key in base and r["provider"] in ("vbhal_dispatch", "sdpa_default2"):
            (ratios if r["provider"] == "vbhal_dispatch" else noise)[key] = r["tflops"] / base[key]["tflops"]
            if r.get("dispatch_impl", "sdpa_default") != "sdpa_default":
                routed[key] = r["dispatch_impl"]
    if ratios:
        vals = sorted(ratios.values())
        line = (f"target dispatcher >= 1.0x SDPA default on the grid: min {vals[0]:.3f} median "
                f"{vals[len(vals) // 2]:.3f} over {len(vals)} shapes")
        if noise:
            floor, tol = min(noise.values()), 0.01
            below = sorted((k for k, x in ratios.items() if x < floor - tol), key=ratios.get)
            line += (f"; same call timed twice (noise): min {floor:.3f} max {max(noise.values()):.3f}; "
                     f"below noise floor - {tol}: {len(below)}" + (
                         " [" + " ".join(f"{_short(k)}:{ratios[k]:.3f}" for k in below[:6]) + "]" if below else ""))
        line += f"; routed away from default: {len(routed)}" + (
            " [" + " ".join(f"{_short(k)}={v.removeprefix('sdpa_')}:{ratios[k]:.3f}" for k, v in routed.items()) + "]"
            if routed else "")
        print(line)


def _short(key) -> str:
    """(head dim, causal, gqa, S, mode) -> '128c4k-fwd' (c causal, n not, g GQA)."""
    hd, causal, gqa, s, mode = key
    return f"{hd}{'c' if causal else 'n'}{'g' if gqa else ''}{s // 1024}k-{mode}"

if __name__ == "__main__":
    raise SystemExit(main())
