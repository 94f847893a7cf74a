"""FP4 codecs at real sizes: correctness on this device, then speed beside the peers.

1. Correctness (bf16 weights of real layer sizes): quantize on this device == quantize on CPU, byte for
   byte (mxfp4 FLOOR, mxfp4 RCEIL, nvfp4); == torchao 0.18's reference quantizer run on CPU when
   torchao is importable (and, for information, torchao run on this device); dequantize identical across devices; the reference fp4_linear in bf16 against
   float32 math; FP4Linear forward/backward against the float64 formula on a slice.
2. Speed, one device, one run: quantize (ours vs torchao ``to_mx`` / ``NVFP4Tensor.to_nvfp4``),
   dequantize (ours vs torchao), and a linear layer: dense bf16 ``F.linear`` (the baseline), torchao's
   emulated path (dequantize + bf16 matmul) and ours (reference fp4_linear: dequantize + fp32 matmul).

Prints compact tables and writes benchmarks/results/formats-<device>.json (and --out if given).

    python benchmarks/bench_formats.py                 # GPU if there is one, else small CPU sizes
    python benchmarks/bench_formats.py --device cpu --small
"""

# ruff: noqa: B023  (every lambda is timed at once, inside the loop iteration that made it)
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
import warnings

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from vbhal.formats import quantize
from vbhal.formats.reference import fp4_linear_reference

CASES = [("mxfp4", "floor"), ("mxfp4", "rceil"), ("nvfp4", "floor")]


def _torchao():
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            import torchao
            from torchao.prototype.mx_formats import mx_tensor, nvfp4_tensor
        return torchao.__version__, mx_tensor, nvfp4_tensor
    except Exception as e:  # noqa: BLE001
        return f"unavailable: {type(e).__name__}: {e}", None, None


def _sync(dev):
    if dev.type == "cuda":
        torch.cuda.synchronize()


def _time(fn, dev, reps=5, warmup=2):
    for _ in range(warmup):
        fn()
    _sync(dev)
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        _sync(dev)
        times.append(time.perf_counter() - t)
    times.sort()
    return times[len(times) // 2]


def _ao_quant(ao, w, fmt, rule):
    """torchao's quantizer on w zero-padded to the block (torchao needs K % block == 0)."""
    _, mx, nv = ao
    w = F.pad(w, (0, -w.shape[1] % (32 if fmt == "mxfp4" else 16))).contiguous()
    if fmt == "mxfp4":
        mode = getattr(mx.ScaleCalculationMode, rule.upper())
        s, d = mx.to_mx(w, torch.float4_e2m1fn_x2, 32, mode)
        return s.view(torch.uint8), d.view(torch.uint8), None
    pts = nv.per_tensor_amax_to_scale(w.abs().max())
    t = nv.NVFP4Tensor.to_nvfp4(w, per_tensor_scale=pts)
    return t.scale.view(torch.uint8), t.qdata.view(torch.uint8), t


def _ao_deviation_blocks(w, rule):
    """Blocks where torchao departs from the spec/hardware (documented in vbhal/formats/mx.py)."""
    w = F.pad(w.float(), (0, -w.shape[1] % 32))
    amax = w.reshape(w.shape[0], -1, 32).abs().amax(-1)
    if rule == "floor":
        return amax < 2.0**-124
    d = amax / 6.0
    bits = d.view(torch.int32)
    e = (bits >> 23) & 0xFF
    exact = torch.where(e > 0, e + ((bits & 0x7FFFFF) != 0).int(), (d > 2.0**-127).int())
    theirs = (torch.ceil(torch.log2(d)).clamp(-127, 127) + 127).int()
    return (d <= 2.0**-126) | (theirs != exact)


def _same_as_torchao(ao, q, w, fmt, rule):
    """q's bytes == torchao's on w (w's device); mxfp4 skips torchao's documented deviation blocks."""
    s_ref, c_ref, _ = _ao_quant(ao, w, fmt, rule)
    s_ref, c_ref = s_ref.to(q.device), c_ref.to(q.device)
    n = q.shape[0]
    if fmt == "mxfp4":
        ok = ~_ao_deviation_blocks(w, rule).to(q.device)
        nb = ok.shape[1]
        same = bool(torch.equal(q.scales.view(torch.uint8)[ok], s_ref[ok])
                    and torch.equal(q.codes.reshape(n, nb, 16)[ok], c_ref.reshape(n, nb, 16)[ok]))
        dev_blocks = int((~ok).sum())
        return same if dev_blocks == 0 else f"{same} ({dev_blocks} deviation blocks skipped)"
    return bool(torch.equal(q.scales.view(torch.uint8), s_ref) and torch.equal(q.codes, c_ref))


def check(dev, shapes, ao, seed=0):
    rows = []
    g = torch.Generator().manual_seed(seed)
    for n, k in shapes:
        w_cpu = (torch.randn(n, k, generator=g) * torch.exp2(torch.randint(-4, 5, (n, 1), generator=g))).to(
            torch.bfloat16)
        w = w_cpu.to(dev)
        for fmt, rule in CASES:
            q = quantize(w, fmt, scale_rule=rule)
            qc = quantize(w_cpu, fmt, scale_rule=rule)
            same_cpu = torch.equal(q.codes.cpu(), qc.codes) and torch.equal(
                q.scales.view(torch.uint8).cpu(), qc.scales.view(torch.uint8))
            deq = q.dequantize(torch.bfloat16)
            same_deq = torch.equal(deq.cpu(), qc.dequantize(torch.bfloat16))
            # torchao's quantizer on CPU is the reference (on CUDA it divides by Python scalars through
            # PyTorch's multiply-by-reciprocal fast path, so its CUDA bytes may differ from its CPU bytes).
            ao_cpu = ao_dev = "n/a"
            if ao[1] is not None:
                ao_cpu = _same_as_torchao(ao, q, w_cpu, fmt, rule)
                if dev.type != "cpu":
                    ao_dev = _same_as_torchao(ao, q, w, fmt, rule)
            rel = float((w.float() - deq.float()).norm() / w.float().norm())
            rows.append({"shape": [n, k], "fmt": fmt, "rule": rule, "device_eq_cpu": bool(same_cpu),
                         "dequant_eq_cpu": bool(same_deq), "eq_torchao_cpu": ao_cpu, "eq_torchao_same_device": ao_dev,
                         "rel_err": round(rel, 5)})
    # fp4_linear in bf16 against float32 math (TF32 off), and FP4Linear's gradients on a slice in float64
    torch.backends.cuda.matmul.allow_tf32 = False
    n, k = shapes[0]
    w = torch.randn(n, k, generator=g).to(dev, torch.bfloat16)
    q = quantize(w, "nvfp4")
    x = torch.randn(4, 256, k, generator=g).to(dev, torch.bfloat16)
    y = fp4_linear_reference(x, q, None)
    y32 = x.float() @ q.dequantize().t()
    lin_err = float((y.float() - y32).norm() / y32.norm())

    from vbhal.nn import FP4Linear

    lin = torch.nn.Linear(k, 512, bias=True).to(dev, torch.bfloat16)
    m = FP4Linear.from_linear(lin, "mxfp4")
    xs = torch.randn(8, k, generator=g).to(dev, torch.bfloat16).requires_grad_()
    out = m(xs)
    go = torch.randn_like(out)
    out.backward(go)
    w64 = m.dequantized_weight().double()
    ref = xs.detach().double() @ w64.t() + m.bias.detach().double()
    fwd_err = float((out.detach().double() - ref).norm() / ref.norm())
    gx_ref = go.double() @ w64
    bwd_err = float((xs.grad.double() - gx_ref).norm() / gx_ref.norm())
    gb_err = float((m.bias.grad.double() - go.double().sum(0)).norm() / go.double().sum(0).norm())
    extra = {"fp4_linear_bf16_vs_fp32_rel": lin_err, "fp4linear_fwd_rel": fwd_err, "fp4linear_grad_x_rel": bwd_err,
             "fp4linear_grad_bias_rel": gb_err}
    return rows, extra


def bench(dev, n, k, m_tokens, ao, reps):
    g = torch.Generator().manual_seed(1)
    w = torch.randn(n, k, generator=g).to(dev, torch.bfloat16)
    x = torch.randn(m_tokens, k, generator=g).to(dev, torch.bfloat16)
    out = []

    def add(op, impl, fn, note=""):
        try:
            t = _time(fn, dev, reps=reps)
            out.append({"op": op, "impl": impl, "ms": round(t * 1e3, 3), "note": note})
        except Exception as e:  # noqa: BLE001 - a peer failing is a result, not a crash
            out.append({"op": op, "impl": impl, "ms": None, "note": f"{type(e).__name__}: {str(e)[:80]}"})

    for fmt, rule in CASES:
        add(f"quantize {fmt}/{rule}", "vbhal", lambda: quantize(w, fmt, scale_rule=rule))
        if ao[1] is not None:
            add(f"quantize {fmt}/{rule}", "torchao", lambda: _ao_quant(ao, w, fmt, rule))
    for fmt in ("mxfp4", "nvfp4"):
        q = quantize(w, fmt)
        add(f"dequantize {fmt} -> bf16", "vbhal", lambda: q.dequantize(torch.bfloat16))
        if ao[1] is not None:
            if fmt == "mxfp4":
                s, d, _ = _ao_quant(ao, w, fmt, "floor")
                mx = ao[1]
                add(f"dequantize {fmt} -> bf16", "torchao",
                    lambda: mx.to_dtype(d, s.view(torch.float8_e8m0fnu), torch.float4_e2m1fn_x2, 32, torch.bfloat16))
            else:
                _, _, t = _ao_quant(ao, w, fmt, "floor")
                add(f"dequantize {fmt} -> bf16", "torchao", lambda: t.dequantize(torch.bfloat16))
    add(f"linear x({m_tokens},{k}) W({n},{k})", "torch bf16 F.linear", lambda: F.linear(x, w), "dense baseline")
    for fmt in ("mxfp4", "nvfp4"):
        q = quantize(w, fmt)
        add(f"linear x({m_tokens},{k}) W({n},{k})", f"vbhal reference {fmt}", lambda: fp4_linear_reference(x, q),
            "dequant fp32 + fp32 matmul")
        if ao[1] is not None and fmt == "nvfp4":
            _, _, t = _ao_quant(ao, w, fmt, "floor")
            add(f"linear x({m_tokens},{k}) W({n},{k})", "torchao emulated nvfp4",
                lambda: F.linear(x, t.dequantize(torch.bfloat16)), "dequant bf16 + bf16 matmul")
    return out


def _table(rows, cols):
    widths = [max(len(c), *(len(str(r.get(c))) for r in rows)) for c in cols]
    lines = ["  ".join(c.ljust(w) for c, w in zip(cols, widths)), "  ".join("-" * w for w in widths)]
    lines += ["  ".join(str(r.get(c)).ljust(w) for c, w in zip(cols, widths)) for r in rows]
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--small", action="store_true", help="small sizes (CPU smoke run)")
    ap.add_argument("--out", default=None, help="also write the JSON here")
    ap.add_argument("--reps", type=int, default=5)
    args = ap.parse_args(argv)
    dev = torch.device(args.device)
    small = args.small or dev.type == "cpu"
    ao = _torchao()
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else platform.processor() or "cpu"
    print(f"device: {name}; torch {torch.__version__}; torchao {ao[0]}")

    shapes = [(256, 512), (128, 1000)] if small else [(4096, 4096), (11008, 4096), (1000, 4000)]
    t0 = time.perf_counter()
    rows, extra = check(dev, shapes, ao)
    print(f"\n== correctness (bf16 weights, {time.perf_counter() - t0:.1f} s) ==")
    print(_table(rows, ["shape", "fmt", "rule", "device_eq_cpu", "dequant_eq_cpu", "eq_torchao_cpu",
                        "eq_torchao_same_device", "rel_err"]))
    print("  ".join(f"{k}={v:.3g}" for k, v in extra.items()))

    n, k, m = (512, 1024, 64) if small else (8192, 8192, 4096)
    t0 = time.perf_counter()
    perf = bench(dev, n, k, m, ao, args.reps)
    print(f"\n== speed (median of {args.reps}, {time.perf_counter() - t0:.1f} s) ==")
    print(_table(perf, ["op", "impl", "ms", "note"]))

    ok = all(r["device_eq_cpu"] and r["dequant_eq_cpu"] and not str(r["eq_torchao_cpu"]).startswith("False")
             for r in rows)
    ok = ok and extra["fp4_linear_bf16_vs_fp32_rel"] < 1e-2 and extra["fp4linear_fwd_rel"] < 1e-2 \
        and extra["fp4linear_grad_x_rel"] < 1e-2 and extra["fp4linear_grad_bias_rel"] < 1e-2
    result = {"device": name, "device_type": dev.type, "torch": torch.__version__, "torchao": ao[0],
              "correctness": rows, "checks": extra, "all_correct": ok, "speed": perf,
              "speed_shape": {"N": n, "K": k, "M": m}}
    here = os.path.dirname(os.path.abspath(__file__))
    os.makedirs(os.path.join(here, "results"), exist_ok=True)
    tag = "".join(c if c.isalnum() else "-" for c in (name if dev.type == "cuda" else "cpu")).strip("-").lower()
    paths = [os.path.join(here, "results", f"formats-{tag}.json")] + ([args.out] if args.out else [])
    for p in paths:
        with open(p, "w") as f:
            json.dump(result, f, indent=1)
    print(f"\nall correct: {ok}; wrote {', '.join(paths)}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
