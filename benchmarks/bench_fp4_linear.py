"""FP4 linear on one GPU, side by side: cuBLAS bf16, torch int4 (group 128), bitsandbytes fp4/nf4, vbhal MXFP4/NVFP4.

One run, one device. For each weight shape (K, N) and batch rows M, the median of CUDA-event timings
(``triton.testing.do_bench``, L2 flushed before every call, so weights stream from HBM as in a real
decoder) of y = x @ W^T + b in bfloat16, plus each result's error against an fp32 reference of the
*same* quantized weight (kernel correctness) and against the original weight (format accuracy).
Also: quantize throughput (bytes read + written) and weight relative error on gaussian weights, and
the two floors of each shape (HBM bytes of the 4.25-bit weight at the measured copy bandwidth;
bf16 tensor-core flops).

    python benchmarks/bench_fp4_linear.py            # full table, JSON to benchmarks/results/
    python benchmarks/bench_fp4_linear.py --quick    # one shape, fewer M

Peers that are not installed (bitsandbytes) or fail are reported as unavailable with the reason.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import sys
import time
import traceback

import torch
import torch.nn.functional as F

SHAPES = [(8192, 8192), (4096, 14336)]  # (K, N)
MS = [1, 16, 64, 1024, 8, 256, 4096]  # the targets' M first: a run cut short still has them
INT4_GROUP = 128
BF16_PEAK_TFLOPS_H100 = 989.0  # H100 SXM dense bf16 (NVIDIA datasheet), for the flops floor column
#: largest correct relative error of a bf16 output vs the fp32 matmul of the same quantized weight (bf16
#: rounding gives ~2e-3); above it a result is WRONG: printed as such, never as a speed-up (R5)
OUT_REL_TOL = 6e-3


def _bench(fn, rep=100):
    import triton

    return triton.testing.do_bench(fn, warmup=25, rep=rep, return_mode="median") * 1e3  # us


_FLUSH = []


def _bench_graph(fn, n: int = 20, reps: int = 7) -> float:
    """GPU-only time (us) of one call: ``n`` calls captured in a CUDA graph, each after an L2 flush
    (256 MiB memset), minus a graph of the ``n`` flushes alone; median of ``reps`` replays. No Python
    launch overhead (what a served model running under CUDA graphs sees), weights still from HBM."""
    if not _FLUSH:
        _FLUSH.append(torch.empty(1 << 28, dtype=torch.uint8, device="cuda"))
    buf = _FLUSH[0]
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        fn()
        buf.zero_()
    torch.cuda.current_stream().wait_stream(side)
    g1, g0 = torch.cuda.CUDAGraph(), torch.cuda.CUDAGraph()
    with torch.cuda.graph(g1):
        for _ in range(n):
            buf.zero_()
            fn()
    with torch.cuda.graph(g0):
        for _ in range(n):
            buf.zero_()
    t1, t0 = [], []
    for g, acc in ((g1, t1), (g0, t0)) * reps:
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        g.replay()
        b.record()
        b.synchronize()
        acc.append(a.elapsed_time(b))
    t1.sort()
    t0.sort()
    return max(0.0, (t1[len(t1) // 2] - t0[len(t0) // 2]) / n * 1e3)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a = a.float()
    b = b.float()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


# ---------------------------------------------------------------------------------------------------
# peers
# ---------------------------------------------------------------------------------------------------
def make_int4(w: torch.Tensor):
    """torch's int4 weight-only kernel (tinygemm): asymmetric group-128 quantization, as gpt-fast/torchao.

    Returns (fn(x) -> y, dequantized weight) or raises with the reason.
    """
    n, k = w.shape
    g = w.float().reshape(-1, INT4_GROUP)
    mx, mn = g.amax(1, keepdim=True), g.amin(1, keepdim=True)
    scales = ((mx - mn).clamp(min=1e-6) / 15).to(torch.bfloat16)
    zeros = (mn + scales.float() * 8).to(torch.bfloat16)
    s32, z32 = scales.float(), zeros.float()
    q = ((g - (z32 - s32 * 8)) / s32).round().clamp(0, 15).to(torch.int32).reshape(n, k)
    deq = ((q.reshape(-1, INT4_GROUP).float() - 8) * s32 + z32).reshape(n, k)
    packed_u8 = (q[:, ::2] << 4 | q[:, 1::2]).to(torch.uint8)
    wp = torch.ops.aten._convert_weight_to_int4pack(packed_u8.contiguous(), 8)
    sz = torch.cat([scales.reshape(n, -1, 1), zeros.reshape(n, -1, 1)], 2).transpose(0, 1).contiguous()

    def fn(x, bias):
        y = torch.ops.aten._weight_int4pack_mm(x, wp, INT4_GROUP, sz)
        return y + bias

    return fn, deq


def make_bnb(w: torch.Tensor, quant_type: str):
    import bitsandbytes as bnb
    import bitsandbytes.functional as bf

    wq, state = bf.quantize_4bit(w, quant_type=quant_type, blocksize=64)
    deq = bf.dequantize_4bit(wq, state).float()

    def fn(x, bias):
        return bnb.matmul_4bit(x, wq.t(), quant_state=state, bias=bias)

    return fn, deq, (wq, state)


def import_bnb():
    if "BNB_CUDA_VERSION" not in os.environ and torch.version.cuda:
        cv = torch.version.cuda.replace(".", "")
        if cv not in ("128", "130"):  # the slimmed wheel in .whl carries these two builds only
            os.environ["BNB_CUDA_VERSION"] = "128"
    import bitsandbytes  # noqa: F401

    return bitsandbytes.__version__


# ---------------------------------------------------------------------------------------------------
def host_overhead(device: str, calls: int = 400, shape=(1024, 1024), stub: bool = False) -> dict:
    """Host (Python + launch) time per call in us of FP4Linear / fp4_linear vs nn.Linear, eager.

    On a GPU: a layer small enough that the GPU finishes each call before the host issues the next, so
    wall time / calls is the host time. ``stub`` (CPU, no GPU needed): the Triton launches replaced by
    no-ops, so the number is vbhal's own Python time per call (everything but Triton's launcher).
    """
    from vbhal.backends.cuda import fp4_kernels as K4
    from vbhal.backends.cuda import fp4_linear as L
    from vbhal.nn import FP4Linear

    class _NoLaunch:
        def __getitem__(self, grid):
            return lambda *a, **kw: None

    saved = {}
    if stub:
        for name in dir(K4):
            if name.startswith("fp4_") and name.endswith("_kernel"):
                saved[name] = getattr(K4, name)
                setattr(K4, name, _NoLaunch())
    try:
        k, n = shape
        dev = torch.device(device)
        dt = torch.bfloat16 if dev.type == "cuda" else torch.float32
        lin = torch.nn.Linear(k, n, device=dev, dtype=dt)
        kernels = {"fp4_linear": L.fp4_linear, "dequantize_fp4": L.dequantize_fp4}
        q = FP4Linear.from_linear(lin, "mxfp4", kernels=kernels).to(dt)
        qw = q.qweight
        out = {}
        sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
        for m in (1, 16):
            x = torch.randn(m, k, device=dev, dtype=dt)
            cases = {
                "nn.Linear no_grad": (lambda: lin(x), True),
                "FP4Linear no_grad": (lambda: q(x), True),
                "FP4Linear grad (bias trainable)": (lambda: q(x), False),
                "fp4_linear(x, qw) no_grad": (lambda: L.fp4_linear(x, qw, q.bias), True),
                "FP4Linear via custom op no_grad": (lambda: torch.ops.vbhal.fp4_linear(
                    x, q.codes, q.scales, q.tensor_scale, q.bias, q.fmt, q.in_features, q._key()), True),
            }
            for name, (fn, nograd) in cases.items():
                if stub and name.startswith("nn.Linear"):
                    continue
                with torch.set_grad_enabled(not nograd):
                    for _ in range(20):
                        fn()
                    sync()
                    best = float("inf")
                    for _ in range(3):
                        t0 = time.perf_counter()
                        for _ in range(calls):
                            fn()
                        sync()
                        best = min(best, (time.perf_counter() - t0) / calls * 1e6)
                out[f"M={m} {name}"] = best
        return out
    finally:
        for name, fn in saved.items():
            setattr(K4, name, fn)


def _variant_name(path: str, cfg: dict | None, chunk=None) -> str:
    if chunk:
        return f"{path}[chunk{chunk}]"
    if not cfg:
        return path
    short = {"BLOCK_M": "bm", "BLOCK_N": "bn", "NBK": "nbk", "SPLIT_K": "s", "GROUP_M": "g", "num_warps": "w",
             "num_stages": "st"}
    return path + "[" + ",".join(f"{short.get(k, k)}{v}" for k, v in cfg.items()) + "]"


SWEEP_MS = (1, 16, 64, 1024)


def sweep_variant_list(ms=SWEEP_MS, k: int = 8192, fmt: str = "mxfp4", splitk_only: bool = False) -> list[tuple]:
    """(M, path, config, chunk) of every variant the sweep times, in order (the same list in the parent
    and in each worker, so a worker can start at an index). Per M the runtime's own candidates first.
    ``splitk_only``: cuBLAS and the SPLIT_K > 1 kernel configs only (the short correctness sweep)."""
    from vbhal.backends.cuda import fp4_linear as L
    from vbhal.formats import BLOCK_SIZES

    nblocks = k // BLOCK_SIZES[fmt]
    out = []
    for m in ms:
        variants = [("cublas_bf16", None, None)]
        if m <= L.GEMV_MAX_M:
            variants += [(p, cfg, None) for p in ("gemv_w32", "gemv_pf") for cfg in L._configs(p, m, fmt, nblocks)]
        if m == 1:  # R5: 730-1370 us at M = 16; no longer a candidate above M = 1
            extra = [{"BLOCK_N": bn, "NBK": nbk, "BLOCK_M": min(L._m_bucket(m), 16), "SPLIT_K": sp, "num_warps": wp,
                      "num_stages": 2} for bn, nbk, sp, wp in ((128, 2, 16, 4), (32, 4, 32, 4))]
            variants += [("gemv_mr", cfg, None) for cfg in L._configs("gemv_mr", m, fmt, nblocks) + extra]
        if m <= L.GEMV_MAX_M:
            variants += [("mm_t", cfg, None) for cfg in L._configs("mm_t", m, fmt, nblocks)[:2]]
        elif m <= L.MM_T_SMALL_M:
            variants += [("mm_t", cfg, None) for cfg in L._configs("mm_t", m, fmt, nblocks)]
            variants += [("mm_w32", cfg, None) for cfg in L._configs("mm_w32", m, fmt, nblocks)]
        else:
            variants += [("mm_t", cfg, None) for cfg in L._configs("mm_t", m, fmt, nblocks)]
            variants += [("dequant", None, None)] + [("dequant_pipelined", None, c) for c in (2048, 4096)]
        if splitk_only:
            variants = [v for v in variants if v[0] == "cublas_bf16" or (v[1] or {}).get("SPLIT_K", 1) > 1]
        out += [(m, p, cfg, chunk) for p, cfg, chunk in variants]
    return out


def _is_cuda_fatal(e: BaseException) -> bool:
    """True for an error after which the CUDA context (or the RNG's capture state) cannot be trusted."""
    s = f"{type(e).__name__}: {e}"
    return any(t in s for t in ("AcceleratorError", "CUDA error", "illegal", "device-side assert", "capture",
                                "Offset increment", "unspecified launch failure"))


def sweep_worker(out_path: str, start: int, deadline: float, k: int = 8192, n: int = 8192,
                 fmt: str = "mxfp4", ms=SWEEP_MS, splitk_only: bool = False) -> int:
    """Time sweep variants from index ``start`` on; rows appended to ``out_path`` (JSON) as they finish.
    Returns the index to restart at after a CUDA error that poisons the context (the parent starts a
    fresh process there), or -1 when done. Each M gets an equal share of the time left at its start."""
    from vbhal.backends.cuda import fp4_linear as L
    from vbhal.backends.cuda.fp4_quantize import dequantize_fp4, quantize_fp4, qw_operands

    variants = sweep_variant_list(ms, k=k, fmt=fmt, splitk_only=splitk_only)
    rows = json.load(open(out_path)) if os.path.exists(out_path) else []
    dev = torch.device("cuda")
    torch.manual_seed(0)
    w = torch.randn(n, k, device=dev, dtype=torch.bfloat16) * 0.02
    bias = torch.randn(n, device=dev, dtype=torch.bfloat16) * 0.1
    qw = quantize_fp4(w, fmt)
    codes, scales, ts, fid = qw_operands(qw)
    wd = dequantize_fp4(qw, torch.float32)
    ms = sorted({v[0] for v in variants}, key=[v[0] for v in variants].index)
    data = {}
    m_deadline = {}
    for i in range(start, len(variants)):
        m, path, cfg, chunk = variants[i]
        name = _variant_name(path, cfg, chunk)
        if m not in m_deadline:
            left = deadline - time.time()
            m_deadline[m] = time.time() + left / (len(ms) - ms.index(m))
        if time.time() > m_deadline[m]:
            print(f"sweep M={m:5d} {name:60s} skipped (time share of this M spent)", flush=True)
            continue
        if m not in data:
            g = torch.Generator(device="cpu").manual_seed(m)
            x = torch.randn(m, k, generator=g, dtype=torch.float32).to(dev, torch.bfloat16)
            data[m] = (x, F.linear(x.float(), wd, bias.float()))
        x, ref = data[m]
        base = next((r["us_graph"] for r in rows if r["M"] == m and r["path"] == "cublas_bf16" and "us_graph" in r),
                    None)
        row = {"M": m, "K": k, "N": n, "fmt": fmt, "variant": name, "path": path, "config": cfg}
        fatal = False
        try:
            if path == "cublas_bf16":
                fn = lambda x=x: F.linear(x, w, bias)
            else:
                run = L._make_runner(path, n, k, fmt, True, config=cfg, chunk_rows=chunk)
                fn = lambda run=run, x=x: run(x, codes, scales, ts, bias)
            # several calls (split-K races are intermittent), the worst error counts; again after timing
            errs = [_rel(fn(), ref) for _ in range(4)]
            row["us_graph"] = _bench_graph(fn, n=10, reps=5)
            errs.append(_rel(fn(), ref))
            row["rel_err"] = max(errs)
            if path == "cublas_bf16":
                base = row["us_graph"]
            row["ratio_vs_cublas"] = base / row["us_graph"] if base and row["us_graph"] > 0 else None
            row["ok"] = row["rel_err"] < OUT_REL_TOL if path != "cublas_bf16" else True
        except Exception as e:  # noqa: BLE001 - reported, not fatal
            row["error"] = f"{type(e).__name__}: {' | '.join(str(e).strip().splitlines()[:2])[:240]}"
            fatal = _is_cuda_fatal(e)
            if not fatal:  # is the context still usable?
                try:
                    torch.cuda.synchronize()
                    torch.ones(1, device=dev).add_(1).item()
                except Exception:  # noqa: BLE001
                    fatal = True
        rows.append(row)
        if "error" in row:
            print(f"sweep M={m:5d} {name:60s} FAILED{' (CUDA context lost: restarting)' if fatal else ''} "
                  f"{row['error']}", flush=True)
        else:
            r = row["ratio_vs_cublas"]
            speed = f"{r or 0:5.2f}x" if row["ok"] else "WRONG"
            print(f"sweep M={m:5d} {name:60s} {row['us_graph']:8.1f} us  {speed:>6s}  err {row['rel_err']:.1e}"
                  f"{'' if row['ok'] else '  WRONG'}", flush=True)
        with open(out_path + ".tmp", "w") as f:
            json.dump(rows, f, indent=1)
        os.replace(out_path + ".tmp", out_path)
        if fatal:
            return i + 1
    return -1


def sweep_variants(out_path: str, budget_s: float = 90.0, ms=SWEEP_MS, splitk_only: bool = False) -> list[dict]:
    """Every candidate kernel variant / launch config at K=N=8192 (mxfp4, bf16, M in SWEEP_MS): GPU time
    from CUDA-graph replays with L2 flushed before each call (``_bench_graph``), each result checked
    against an fp32 matmul of the same dequantized weight (rel. Frobenius error; bf16 rounding ~2e-3).

    Isolated: the variants run in a worker process; a variant that kills the CUDA context (an
    illegal address, a broken capture) is recorded as FAILED and a fresh worker continues with the
    next one, so one bad kernel cannot hide the rest (R4). Stops starting variants after
    ``budget_s``; a table of the best per M and path at the end."""
    import subprocess

    deadline = time.time() + budget_s
    if os.path.exists(out_path):
        os.remove(out_path)
    start, restarts = 0, 0
    while start >= 0 and time.time() < deadline - 5 and restarts < 6:
        cmd = [sys.executable, os.path.abspath(__file__), "--sweep-worker", out_path, "--sweep-start", str(start),
               "--sweep-deadline", f"{deadline:.3f}", "--sweep-ms", ",".join(map(str, ms))]
        if splitk_only:
            cmd.append("--sweep-splitk-only")
        try:
            proc = subprocess.run(cmd, timeout=max(10.0, deadline - time.time() + 30))
        except subprocess.TimeoutExpired:
            print("sweep worker hung past the budget: stopped", flush=True)
            break
        if proc.returncode == 0:
            break
        if proc.returncode != 3:  # died without telling where: skip past the last row written
            done = len(json.load(open(out_path))) if os.path.exists(out_path) else 0
            print(f"sweep worker exited with {proc.returncode}; restarting after variant {done}", flush=True)
            start = max(start + 1, done + 1)
        else:
            start = int(open(out_path + ".next").read())
        restarts += 1
    rows = json.load(open(out_path)) if os.path.exists(out_path) else []
    ms = sorted({r["M"] for r in rows})
    print("\nsweep summary (graph us, L2 flushed; best correct variant per M and path; FAILED variants listed):")
    for m in ms:
        base = next((r["us_graph"] for r in rows if r["M"] == m and r["path"] == "cublas_bf16" and "us_graph" in r), None)
        best = {}
        for r in rows:
            if r["M"] == m and r.get("ok") and r["path"] != "cublas_bf16":
                if r["path"] not in best or r["us_graph"] < best[r["path"]]["us_graph"]:
                    best[r["path"]] = r
        cells = "  ".join(f"{p}={b['us_graph']:.1f}({base / b['us_graph']:.2f}x)" if base else f"{p}={b['us_graph']:.1f}"
                          for p, b in sorted(best.items(), key=lambda kv: kv[1]["us_graph"]))
        print(f"  M={m:5d} cublas={base or float('nan'):.1f} | {cells}")
        if best:
            top = min(best.values(), key=lambda r: r["us_graph"])
            print(f"          fastest: {top['variant']}")
        bad = [r["variant"] for r in rows if r["M"] == m and ("error" in r or (r.get("ok") is False))]
        if bad:
            print(f"          FAILED/WRONG ({len(bad)}): {', '.join(bad)}")
    wrong = [r for r in rows if r.get("ok") is False]
    print(f"  sweep correctness: {len(wrong)} WRONG of {sum('rel_err' in r for r in rows)} checked"
          + (": " + ", ".join(f"M={r['M']} {r['variant']} e={r['rel_err']:.1e}" for r in wrong) if wrong else ""))
    return rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sweep", metavar="JSON", help="time every kernel variant/config at K=N=8192 (M 1, 16, 64, "
                    "1024), write the rows to JSON, then exit")
    ap.add_argument("--sweep-budget", type=float, default=90.0, help="seconds after which the sweep starts no variant")
    ap.add_argument("--sweep-ms", default=",".join(map(str, SWEEP_MS)), help="comma-separated M of the sweep")
    ap.add_argument("--sweep-splitk-only", action="store_true", help="sweep cuBLAS and the SPLIT_K > 1 configs only")
    ap.add_argument("--shapes", default="", help="K:N[,K:N] weight shapes of the benchmark (default: both)")
    ap.add_argument("--sweep-worker", metavar="JSON", help=argparse.SUPPRESS)
    ap.add_argument("--sweep-start", type=int, default=0, help=argparse.SUPPRESS)
    ap.add_argument("--sweep-deadline", type=float, default=0.0, help=argparse.SUPPRESS)
    ap.add_argument("--host", metavar="JSON", help="measure eager host time per call (small layer), write JSON, exit")
    ap.add_argument("--host-stub", action="store_true",
                    help="CPU only: vbhal's Python time per call with the Triton launches stubbed out, then exit")
    ap.add_argument("--quick", action="store_true", help="one shape, M in {1, 16, 256}")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results"))
    ap.add_argument("--variants", action="store_true", help="also time each vbhal path (gemv/mm/dequant)")
    ap.add_argument("--no-graph", action="store_true", help="skip the CUDA-graph (no launch overhead) timings")
    args = ap.parse_args()
    if args.host_stub:
        for name, us in host_overhead("cpu", stub=True).items():
            print(f"host time per call (launch stubbed, CPU): {name:40s} {us:7.1f} us")
        return 0
    if not torch.cuda.is_available():
        print("no CUDA device: this benchmark measures GPU kernels; nothing to do")
        return 0
    if args.sweep_worker:
        sweep_ms = tuple(int(v) for v in args.sweep_ms.split(","))
        nxt = sweep_worker(args.sweep_worker, args.sweep_start, args.sweep_deadline, ms=sweep_ms,
                           splitk_only=args.sweep_splitk_only)
        if nxt < 0:
            return 0
        with open(args.sweep_worker + ".next", "w") as f:
            f.write(str(nxt))
        sys.stdout.flush()
        os._exit(3)  # the CUDA context is poisoned: no clean shutdown
    if args.sweep:
        rows = sweep_variants(args.sweep, budget_s=args.sweep_budget, ms=tuple(int(v) for v in args.sweep_ms.split(",")),
                              splitk_only=args.sweep_splitk_only)
        return 1 if any(r.get("ok") is False for r in rows) else 0
    if args.host:
        res = host_overhead("cuda")
        for name, us in res.items():
            print(f"eager host time per call (1024x1024 layer, GPU idle between calls): {name:40s} {us:7.1f} us")
        with open(args.host, "w") as f:
            json.dump(res, f, indent=1)
        return 0
    import triton

    import vbhal.formats as VF
    from vbhal.backends.cuda import fp4_linear as L
    from vbhal.backends.cuda import fp4_quantize as Q
    from vbhal.backends.cuda.fp4_quantize import dequantize_fp4, quantize_fp4, qw_operands

    dev = torch.device("cuda")
    name = torch.cuda.get_device_name(dev)
    slug = re.sub(r"[^A-Za-z0-9]+", "-", name).strip("-")
    shapes = SHAPES[:1] if args.quick else SHAPES
    if args.shapes:
        shapes = [tuple(int(v) for v in s.split(":")) for s in args.shapes.split(",")]
        # The main file holds both shapes or the first alone (K = N = 8192, as --quick runs it; the repository's
        # main file is that shape's, the other lives in fp4_linear-K4096-N14336-<device>.json): any other set of
        # shapes gets its own file, so that it cannot overwrite the main one.
        if shapes not in (list(SHAPES), list(SHAPES[:1])):
            slug = "-".join(f"K{k}-N{n}" for k, n in shapes) + "-" + slug
    ms = [1, 16, 256] if args.quick else MS
    torch.manual_seed(0)
    out = {"device": name, "torch": torch.__version__, "triton": triton.__version__,
           "python": platform.python_version(), "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
           "method": ("us: triton.testing.do_bench median, L2 flushed before each call (eager: includes Python "
               "launch overhead where it exceeds the flush); us_graph: the same calls replayed from a CUDA graph, "
               "L2 flushed before each, flush time subtracted (GPU time only); bf16 activations"),
           "peers": {}, "linear": [], "quantize": [], "floors": []}

    # copy bandwidth (bytes read + written) for the bytes floor
    buf = torch.empty(1 << 28, dtype=torch.uint8, device=dev)
    buf2 = torch.empty_like(buf)
    t = _bench(lambda: buf2.copy_(buf))
    bw = 2 * buf.numel() / (t * 1e-6)
    out["copy_bandwidth_TBps"] = bw / 1e12
    print(f"device {name}; torch {torch.__version__}; triton {triton.__version__}; copy bandwidth {bw / 1e12:.2f} TB/s")

    try:
        out["peers"]["bitsandbytes"] = import_bnb()
        have_bnb = None
    except Exception as e:  # noqa: BLE001 - reported, not fatal
        have_bnb = f"{type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''}"
        out["peers"]["bitsandbytes"] = f"unavailable: {have_bnb}"
        print("bitsandbytes unavailable:", have_bnb)

    for k, n in shapes:
        w = torch.randn(n, k, device=dev, dtype=torch.bfloat16) * 0.02
        bias = torch.randn(n, device=dev, dtype=torch.bfloat16) * 0.1
        peers = {}
        errs_w = {}
        peers["cublas_bf16"] = lambda x, b, w=w: F.linear(x, w, b)
        errs_w["cublas_bf16"] = 0.0
        try:
            f4, deq4 = make_int4(w)
            peers["torch_int4_g128"] = f4
            errs_w["torch_int4_g128"] = _rel(deq4, w)
        except Exception as e:  # noqa: BLE001 - reported, not fatal
            peers["torch_int4_g128"] = f"unavailable: {type(e).__name__}: {str(e)[:160]}"
        for qt in ("fp4", "nf4"):
            key = f"bnb_{qt}"
            if have_bnb is not None:
                peers[key] = f"unavailable: {have_bnb}"
                continue
            try:
                fb, deqb, _ = make_bnb(w, qt)
                peers[key] = fb
                errs_w[key] = _rel(deqb, w)
            except Exception as e:  # noqa: BLE001 - reported, not fatal
                peers[key] = f"unavailable: {type(e).__name__}: {str(e)[:160]}"
        qws = {}
        for fmt in ("mxfp4", "nvfp4"):
            qw = quantize_fp4(w, fmt)
            qws[fmt] = qw
            deq = dequantize_fp4(qw, torch.float32)
            errs_w[f"vbhal_{fmt}"] = _rel(deq, w)
            peers[f"vbhal_{fmt}"] = lambda x, b, qw=qw: L.fp4_linear(x, qw, b)
            ref_q = VF.quantize(w, fmt)
            out.setdefault("dequantize_bit_exact", {})[f"{fmt} {k}x{n}"] = all(
                torch.equal(dequantize_fp4(ref_q, dt).view(torch.uint8) if dt != torch.float32
                            else dequantize_fp4(ref_q, dt).view(torch.int32),
                            ref_q.dequantize(dt).view(torch.uint8) if dt != torch.float32
                            else ref_q.dequantize(dt).view(torch.int32))
                for dt in (torch.bfloat16, torch.float16, torch.float32))
            if args.variants and fmt == "mxfp4":
                ops = qw_operands(qw)
                for path in ("gemv", "gemv_w32", "gemv_pf", "gemv_mr", "mm_w32", "mm_t", "mm_p", "mm_pt", "dequant",
                             "dequant_pipelined"):
                    peers[f"vbhal_{fmt}_{path}"] = (
                        lambda x, b, ops=ops, path=path: L._linear_2d(x, ops[0], ops[1], ops[2], b, ops[3], n, k, path))
        wbytes = {f: qws[f].nbytes for f in qws}
        for m in ms:
            x = torch.randn(m, k, device=dev, dtype=torch.bfloat16)
            row = {"K": k, "N": n, "M": m, "us": {}, "us_graph": {}, "out_rel_err_vs_same_weight": {},
                   "out_rel_err_vs_bf16": {}}
            y_bf16 = F.linear(x.float(), w.float(), bias.float())
            for pname, fn in peers.items():
                if isinstance(fn, str):
                    row["us"][pname] = fn
                    continue
                if pname.endswith(("_gemv", "_gemv_w32", "_gemv_pf", "_gemv_mr")) and m > 16:
                    continue  # one program column per activation row: only meant for tiny M
                if pname.endswith("_pipelined") and m < 256:
                    continue
                if pname.endswith(("_mm_w32", "_mm_p")) and m > 64:
                    continue
                try:
                    y = fn(x, bias)
                    torch.cuda.synchronize()
                    row["out_rel_err_vs_bf16"][pname] = _rel(y, y_bf16)
                    if pname.startswith("vbhal_"):
                        fmt = pname.split("_")[1]
                        y_ref = F.linear(x.float(), dequantize_fp4(qws[fmt], torch.float32), bias.float())
                        row["out_rel_err_vs_same_weight"][pname] = _rel(y, y_ref)
                    row["us"][pname] = _bench(lambda fn=fn: fn(x, bias))
                    if not args.no_graph:
                        try:
                            n_calls = int(min(20, max(3, 2000.0 / max(row["us"][pname], 1.0))))
                            row["us_graph"][pname] = _bench_graph(lambda fn=fn: fn(x, bias), n=n_calls, reps=5)
                        except Exception as e:  # noqa: BLE001 - reported, not fatal
                            row["us_graph"][pname] = f"not capturable: {type(e).__name__}: {str(e)[:120]}"
                except Exception as e:  # noqa: BLE001 - reported, not fatal
                    row["us"][pname] = f"failed: {type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"
                    traceback.print_exc(limit=3)
            out["linear"].append(row)
            fl = {"K": k, "N": n, "M": m,
                  "bytes_floor_us_mxfp4": (wbytes["mxfp4"] + 2 * m * (k + n)) / bw * 1e6,
                  "bytes_floor_us_nvfp4": (wbytes["nvfp4"] + 2 * m * (k + n)) / bw * 1e6,
                  "bytes_floor_us_bf16": (2 * n * k + 2 * m * (k + n)) / bw * 1e6,
                  "flops_floor_us_bf16_peak": 2 * m * n * k / (BF16_PEAK_TFLOPS_H100 * 1e12) * 1e6}
            out["floors"].append(fl)
            _print_row(row, fl)
            out["auto_path_choices"] = _choices(L)
            _write(out, args.out, slug)  # after every row: a run cut short still leaves its numbers
        out.setdefault("weight_rel_err", {})[f"{k}x{n}"] = errs_w

        # quantize throughput: bytes read (bf16 weight) + written (codes + scales), logical (one pass)
        for fmt, rule in (("mxfp4", "floor"), ("mxfp4", "rceil"), ("nvfp4", "floor")):
            qw = quantize_fp4(w, fmt, scale_rule=rule)
            ref = VF.quantize(w, fmt, scale_rule=rule)
            exact = bool(torch.equal(qw.codes, ref.codes)
                         and torch.equal(qw.scales.view(torch.uint8), ref.scales.view(torch.uint8))
                         and (fmt == "mxfp4" or torch.equal(qw.tensor_scale, ref.tensor_scale)))
            t = _bench(lambda fmt=fmt, rule=rule: quantize_fp4(w, fmt, scale_rule=rule))
            nbytes = w.numel() * 2 + qw.nbytes
            # the kernel(s) alone: the custom op (and, nvfp4, the tensor-scale reduction), no host sync
            fid = ("mxfp4", "nvfp4").index(fmt)
            zero_ts = torch.zeros((), device=dev)

            def _op(fmt=fmt, rule=rule, fid=fid):
                ts = Q.nvfp4_tensor_scale_gpu(w) if fmt == "nvfp4" else zero_ts
                return torch.ops.vbhal.quantize_fp4_cuda(w, fid, rule == "rceil", ts)

            t_op = _bench(_op)
            try:
                t_g = _bench_graph(_op)
            except Exception:  # noqa: BLE001 - reported, not fatal
                t_g = None
            rec = {"K": k, "N": n, "fmt": fmt, "rule": rule, "us": t, "TBps": nbytes / (t * 1e-6) / 1e12,
                   "us_kernels": t_op, "TBps_kernels": nbytes / (t_op * 1e-6) / 1e12,
                   "us_kernels_graph": t_g, "TBps_kernels_graph": nbytes / (t_g * 1e-6) / 1e12 if t_g else None,
                   "bit_exact_vs_vbhal_formats": exact}
            out["quantize"].append(rec)
            print(f"quantize {fmt}/{rule} {n}x{k}: call {t:8.1f} us {rec['TBps']:.2f} TB/s | kernels {t_op:8.1f} us "
                  f"{rec['TBps_kernels']:.2f} TB/s | graph {t_g or float('nan'):8.1f} us "
                  f"{rec['TBps_kernels_graph'] or float('nan'):.2f} TB/s | bit-exact={exact}")
        td = _bench(lambda: dequantize_fp4(qws["mxfp4"], torch.bfloat16))
        out["quantize"].append({"K": k, "N": n, "fmt": "mxfp4", "rule": "dequantize->bf16", "us": td,
                                "TBps": (w.numel() * 2 + qws["mxfp4"].nbytes) / (td * 1e-6) / 1e12})
        print(f"dequantize mxfp4->bf16 {n}x{k}: {td:8.1f} us")
        try:
            t = _bench(lambda: make_int4(w))
            out["quantize"].append({"K": k, "N": n, "fmt": "torch_int4_g128 (torch ops)", "us": t})
        except Exception as e:  # noqa: BLE001 - reported, not fatal
            out["quantize"].append({"K": k, "N": n, "fmt": "torch_int4_g128", "us": f"unavailable: {e!s:.160}"})
        if have_bnb is None:
            import bitsandbytes.functional as bf

            for qt in ("fp4", "nf4"):
                t = _bench(lambda qt=qt: bf.quantize_4bit(w, quant_type=qt, blocksize=64))
                out["quantize"].append({"K": k, "N": n, "fmt": f"bnb_{qt}", "us": t,
                                        "TBps": (w.numel() * 2.5) / (t * 1e-6) / 1e12})
                print(f"quantize bnb {qt}: {t:8.1f} us")
        print("weight rel err:", {a: round(b, 5) for a, b in errs_w.items()})

    _summary(out)
    out["auto_path_choices"] = _choices(L)
    out["path_failures"] = {str(key[:4] + key[-1:]): why for key, why in L._PATH_FAILURES.items()}
    out["tuned_configs"] = {f"{key[0]} M<={key[1]} N={key[2]} K={key[3]} {key[4]}": [cfg, round(ms * 1e3, 1)]
                            for key, (cfg, ms) in L.TUNED_CONFIGS.items() if key[5] == torch.bfloat16}
    print("auto path choices:", out["auto_path_choices"])
    print("tuned configs (us, graph, L2 flushed):", out["tuned_configs"])
    if out["path_failures"]:
        print("paths that failed to compile/run (skipped):", out["path_failures"])
    print("dequantize bit-exact:", out.get("dequantize_bit_exact"))
    print("wrote", _write(out, args.out, slug))
    return 0


def _choices(L):
    """Which path vbhal's automatic choice measured fastest, per (M bucket, N, K, format)."""
    return {f"M<={key[0]} N={key[1]} K={key[2]} {('mxfp4', 'nvfp4')[key[3]]}": p for key, p in L.PATH_CHOICES.items()}


def _write(out, folder, slug):
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, f"fp4_linear-{slug}.json")
    with open(path + ".tmp", "w") as f:
        json.dump(out, f, indent=1)
    os.replace(path + ".tmp", path)
    return path


def _print_row(row, fl):
    us = row["us"]
    base = us.get("cublas_bf16")
    cells = []
    for pname, v in us.items():
        if isinstance(v, str):
            cells.append(f"{pname}=n/a")
            continue
        ratio = f" ({base / v:.2f}x)" if isinstance(base, float) else ""
        err = row["out_rel_err_vs_same_weight"].get(pname)
        errs = f" e={err:.1e}" + (" WRONG" if err > OUT_REL_TOL else "") if err is not None else ""
        g = row.get("us_graph", {}).get(pname)
        gb = row.get("us_graph", {}).get("cublas_bf16")
        gs = f" g={g:.1f}" + (f"({gb / g:.2f}x)" if isinstance(gb, float) and g > 0 else "") if isinstance(g, float) else ""
        cells.append(f"{pname}={v:.1f}{ratio}{gs}{errs}")
    print(f"K={row['K']} N={row['N']} M={row['M']:5d} floor4={fl['bytes_floor_us_mxfp4']:.1f} "
          f"flop={fl['flops_floor_us_bf16_peak']:.1f} | " + "  ".join(cells), flush=True)


TARGETS = {1: 4.0, 16: 3.5, 64: 2.5, 1024: 0.95, 4096: 0.95}


def _summary(out):
    print("\nspeed-up vs cuBLAS bf16 (target in brackets); vbhal faster than int4/bnb at this M?")
    for row in out["linear"]:
        us = row["us"]
        base = us.get("cublas_bf16")
        if not isinstance(base, float):
            continue
        tgt = TARGETS.get(row["M"])
        for fmt in ("mxfp4", "nvfp4"):
            v = us.get(f"vbhal_{fmt}")
            if not isinstance(v, float):
                continue
            err = row["out_rel_err_vs_same_weight"].get(f"vbhal_{fmt}")
            if err is None or err > OUT_REL_TOL:  # a wrong result has no speed-up
                path = out.get("auto_path_choices", {}).get(
                    f"M<={1 << max(0, (row['M'] - 1).bit_length())} N={row['N']} K={row['K']} {fmt}", "?")
                print(f"  K={row['K']:5d} N={row['N']:5d} M={row['M']:5d} {fmt}: WRONG  rel. error "
                      f"{err if err is not None else float('nan'):.1e} > {OUT_REL_TOL:g} (auto path {path}): "
                      f"no speed-up reported")
                row.setdefault("wrong", []).append(fmt)
                continue
            peers = [p for p in ("torch_int4_g128", "bnb_fp4", "bnb_nf4") if isinstance(us.get(p), float)]
            beats = all(v < us[p] for p in peers)
            t = f"[{tgt}]" if tgt else ""
            ug = row.get("us_graph", {})
            gv, gb = ug.get(f"vbhal_{fmt}"), ug.get("cublas_bf16")
            graph = ""
            if isinstance(gv, float) and isinstance(gb, float) and gv > 0:
                gpeers = [p for p in ("torch_int4_g128", "bnb_fp4", "bnb_nf4") if isinstance(ug.get(p), float)]
                graph = f" | graph {gb / gv:5.2f}x beats {','.join(gpeers) or '-'}: {all(gv < ug[p] for p in gpeers)}"
                row.setdefault("ratio_vs_cublas_graph", {})[fmt] = gb / gv
            print(f"  K={row['K']:5d} N={row['N']:5d} M={row['M']:5d} {fmt}: eager {base / v:5.2f}x {t:7s} "
                  + (f"beats {','.join(peers)}: {beats}" if peers else "(no 4-bit peer ran)") + graph)
            row.setdefault("ratio_vs_cublas", {})[fmt] = base / v


if __name__ == "__main__":
    sys.exit(main())
