"""Attention bound (diagnostic, not product code): the Triton tutorial's fused attention on exactly the shapes of
benchmarks/bench_attention.py (head dim 128, causal, bf16, 16 heads, B = 16384 / S, S = 4096 / 8192 / 16384),
forward and forward+backward, timed in the same run and the same way as vbhal's Triton kernel
(``flash_attention``, as bench_attention calls it -- not the dispatcher), SDPA cuDNN and SDPA flash.

What it answers: how far Triton itself gets on this GPU with the upstream reference kernel, i.e. whether the
gap of vbhal's kernel to cuDNN is a gap of our kernel or of Triton (3.6 on the GPU).

The tutorial kernel. Triton's ``python/tutorials/06-fused-attention.py`` as of the triton 3.4/3.5 releases
(forward through host ``TensorDescriptor``s on Hopper, ``tl.make_tensor_descriptor`` elsewhere; backward with
plain pointers), adapted to bf16 and trimmed (9 forward autotune configs instead of 18). It is loaded at run
time from ``$TUTORIAL_ATTN``, else ``output/triton_tutorial_attn.py`` (git-ignored), else
``gpu/_triton_tutorial_attn.py``; it is NOT committed with vbhal (third-party code: Triton's MIT-licensed
tutorial; provenance and the list of changes are in that file's header). Without it the run still times and
checks vbhal / cuDNN / flash and says that the tutorial was not found. The tutorial is called with
``warp_specialize=False``: its own benchmark enables warp specialization on Hopper only for non-causal
forward, and the host-descriptor path it takes then is its Hopper default. Its backward has one fixed config
(BLOCK_M1/N1/M2/N2 = 32/128/128/32, 4 warps, 5 stages), as upstream.

Timing and FLOPs: ``bench_attention.measure_interleaved`` (CUDA events around windows of back-to-back calls,
providers round-robin in a shuffled order, median of 7 windows) and its ``_flops`` (forward 4*B*H*S*S*D,
halved when causal; forward+backward 3.5x), so the numbers compare with benchmarks/results/attention-*.json.
GPU check (first, at S = 4096): output and dQ/dK/dV of the tutorial and of vbhal against SDPA's default
backend on the same inputs, relative error (norm) < 2e-2, PASS/FAIL.

Output: a table on stdout, JSON to ``$RES/attn_bound.json`` and
``benchmarks/results/attn_bound-<device name, spaces as dashes>.json`` (saved after each shape).

    RES=/tmp/bounds python3 gpu/attn_bound.py                  # GPU (about 1-2 min, compile included)
    TRITON_INTERPRET=1 python3 gpu/attn_bound.py --smoke       # CPU: tiny shapes, fp16, correctness only

--smoke runs the tutorial kernel (when its file is present) and vbhal's kernel under the interpreter at
B=1, H=2, S=128, D=64 in float16 (the interpreter's tl.dot on bf16 is broken) against float32 SDPA (math).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

TOKENS = 16384
HEADS = 16
HEAD_DIM = 128
SEQS = (4096, 8192, 16384)
PROVIDERS = ("tutorial", "vbhal", "sdpa_cudnn", "sdpa_flash")
TOL = 2e-2
#: the GPU run's device and dtype (module constants so a CPU dry run can patch them)
DEVICE = "cuda"
DTYPE = torch.bfloat16


def tutorial_paths() -> list[Path]:
    env = os.environ.get("TUTORIAL_ATTN")
    return ([Path(env)] if env else []) + [ROOT / "output" / "triton_tutorial_attn.py",
                                            ROOT / "gpu" / "_triton_tutorial_attn.py"]


def load_tutorial():
    """(module, path) of the vendored tutorial, or (None, reason)."""
    for p in tutorial_paths():
        if p.is_file():
            spec = importlib.util.spec_from_file_location("triton_tutorial_attn", p)
            mod = importlib.util.module_from_spec(spec)
            try:
                spec.loader.exec_module(mod)
            except Exception as e:  # noqa: BLE001 - reported
                return None, f"{p}: import failed: {type(e).__name__}: {str(e)[:200]}"
            return mod, str(p)
    return None, "not found (looked at: " + ", ".join(map(str, tutorial_paths())) + ")"


def tutorial_fn(mod):
    """fn(q, k, v, causal) for bench_attention.measure_interleaved: softmax scale 1/sqrt(D) like SDPA."""
    return lambda q, k, v, causal: mod.attention(q, k, v, causal, 1.0 / math.sqrt(q.shape[-1]), False)


def rel_err(a, b) -> float:
    a, b = a.float(), b.float()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def compare(fn, ref_fn, q, k, v, do, causal=True) -> dict:
    """Relative errors of fn's output and q/k/v gradients against ref_fn's on the same inputs."""
    outs = {}
    for name, f in (("test", fn), ("ref", ref_fn)):
        qq, kk, vv = (t.detach().clone().requires_grad_(True) for t in (q, k, v))
        o = f(qq, kk, vv, causal)
        o.backward(do)
        outs[name] = (o.detach(), qq.grad, kk.grad, vv.grad)
    return {n: rel_err(a, b) for n, a, b in zip(("out", "dq", "dk", "dv"), outs["test"], outs["ref"])}


# ---------------------------------------------------------------------------------------------------
# GPU run
# ---------------------------------------------------------------------------------------------------
def gpu_main(args) -> int:
    import bench_attention as BA
    import triton

    t0 = time.time()
    device = torch.cuda.get_device_name(0)
    mod, where = load_tutorial()
    providers = [p for p in PROVIDERS if p != "tutorial" or mod is not None]
    fns = {"tutorial": tutorial_fn(mod)} if mod is not None else {}
    out = {"meta": {"device": device, "torch": torch.__version__, "triton": triton.__version__, "dtype": "bfloat16",
                    "head_dim": HEAD_DIM, "heads": HEADS, "tokens_per_batch": TOKENS, "causal": True,
                    "tutorial": where, "tutorial_warp_specialize": False,
                    "flops": "fwd 4*B*H*S*S*D (x0.5 causal); fwdbwd 3.5x fwd (bench_attention._flops)",
                    "timing": "bench_attention.measure_interleaved (median of 7 windows, round-robin)"},
           "checks": {}, "rows": [], "skipped": []}
    paths = [Path(os.environ.get("RES", "/tmp")) / "attn_bound.json",
             ROOT / "benchmarks" / "results" / f"attn_bound-{device.replace(' ', '-')}.json"]

    def save():
        for p in paths:
            p.parent.mkdir(parents=True, exist_ok=True)
            p.write_text(json.dumps(out, indent=1))

    # correctness first (this also compiles / autotunes everything at S = 4096)
    s = SEQS[0]
    b = TOKENS // s
    gen = torch.Generator(device=DEVICE).manual_seed(1)
    q, k, v, do = (torch.randn(b, HEADS, s, HEAD_DIM, device=DEVICE, dtype=DTYPE, generator=gen)
                   for _ in range(4))
    ref = BA._strict_sdpa("sdpa_default")
    for name, fn in (("tutorial", fns.get("tutorial")), ("vbhal", BA._fn("vbhal"))):
        if fn is None:
            out["checks"][f"{name} vs SDPA default"] = {"result": "SKIPPED", "why": where}
            continue
        t1 = time.time()
        try:
            errs = compare(fn, ref, q, k, v, do)
            res = "PASS" if max(errs.values()) < TOL else "FAIL"
            out["checks"][f"{name} vs SDPA default"] = {"result": res, **errs, "seconds": round(time.time() - t1, 1)}
        except Exception as e:  # noqa: BLE001 - reported
            out["checks"][f"{name} vs SDPA default"] = {"result": "ERROR", "error": f"{type(e).__name__}: {str(e)[:300]}"}
            if name == "tutorial":
                providers.remove("tutorial")
    del q, k, v, do
    torch.cuda.empty_cache()
    save()

    for s in SEQS:
        b = TOKENS // s
        for mode in ("fwd", "fwdbwd"):
            if time.time() - t0 > args.budget:
                out["skipped"].append(f"S={s} {mode}")
                continue
            got = BA.measure_interleaved(providers, b, HEADS, HEADS, s, HEAD_DIM, True, mode, fns=fns,
                                         seed=len(out["rows"]))
            for p in providers:
                row = {"provider": p, "seq": s, "batch": b, "hq": HEADS, "head_dim": HEAD_DIM, "causal": True,
                       "mode": mode}
                r = got[p]
                if isinstance(r, Exception):
                    row["error"] = f"{type(r).__name__}: {(str(r).splitlines() or [''])[0][:200]}"
                else:
                    row["ms"], row["tflops"] = r
                out["rows"].append(row)
            torch.cuda.empty_cache()
            save()
    if mod is not None:
        tuned = getattr(mod._attn_fwd, "cache", {})
        out["meta"]["tutorial_fwd_autotune"] = {str(kk): str(cfg) for kk, cfg in tuned.items()}
    out["meta"]["seconds"] = round(time.time() - t0, 1)
    save()
    print_table(out)
    print(f"wrote {', '.join(map(str, paths))}")
    return 0


def print_table(out) -> None:
    m = out["meta"]
    print(f"# attention bound, {m['device']}, torch {m['torch']}, triton {m['triton']}, bf16, hd{m['head_dim']} causal, "
          f"{m['heads']} heads, B*S={m['tokens_per_batch']}, TFLOP/s")
    print(f"# tutorial: {m['tutorial']}")
    rows = out["rows"]
    provs = [p for p in PROVIDERS if any(r["provider"] == p for r in rows)]
    print(f"{'S':>6} {'mode':>6} | " + " ".join(f"{p:>10}" for p in provs) + " | tut/cudnn vbhal/cudnn vbhal/tut")
    keys = []
    for r in rows:
        if (r["seq"], r["mode"]) not in keys:
            keys.append((r["seq"], r["mode"]))
    for key in keys:
        got = {r["provider"]: r for r in rows if (r["seq"], r["mode"]) == key}

        def ratio(a, b, got=got):
            ra, rb = got.get(a, {}), got.get(b, {})
            return f"{ra['tflops'] / rb['tflops']:9.2f}" if "tflops" in ra and "tflops" in rb else f"{'-':>9}"

        cells = [f"{got[p]['tflops']:10.1f}" if "tflops" in got.get(p, {}) else f"{'err' if p in got else '-':>10}"
                 for p in provs]
        print(f"{key[0]:>6} {key[1]:>6} | " + " ".join(cells) + f" | {ratio('tutorial', 'sdpa_cudnn')} "
              f"{ratio('vbhal', 'sdpa_cudnn'):>11} {ratio('vbhal', 'tutorial'):>9}")
    for r in rows:
        if "error" in r:
            print(f"  error {r['provider']} S={r['seq']} {r['mode']}: {r['error']}")
    for name, c in out["checks"].items():
        extra = " ".join(f"{kk}={c[kk]:.1e}" for kk in ("out", "dq", "dk", "dv") if kk in c)
        print(f"check {name} (rel err < {TOL}): {c['result']} {extra} {c.get('error', c.get('why', ''))}")
    if out.get("skipped"):
        print(f"skipped (time budget): {', '.join(out['skipped'])}")
    for kk, cfg in m.get("tutorial_fwd_autotune", {}).items():
        print(f"tutorial fwd autotune {kk}: {cfg}")
    print(f"total {m.get('seconds', '?')} s")


# ---------------------------------------------------------------------------------------------------
# CPU smoke
# ---------------------------------------------------------------------------------------------------
def smoke() -> int:
    if os.environ.get("TRITON_INTERPRET", "0") in ("", "0"):
        print("--smoke needs TRITON_INTERPRET=1 (set before python starts)")
        return 2
    import bench_attention as BA
    import torch.nn.functional as F

    from vbhal.backends.cuda.attention import flash_attention

    torch.manual_seed(0)
    b, h, s, d = 1, 2, 128, 64
    q, k, v, do = (torch.randn(b, h, s, d, dtype=torch.float16) for _ in range(4))
    ref = lambda q_, k_, v_, causal: F.scaled_dot_product_attention(
        q_.float(), k_.float(), v_.float(), is_causal=causal)
    mod, where = load_tutorial()
    print(f"tutorial: {where}")
    ok = True
    res = {"mode": "smoke (CPU interpreter, fp16, B=1 H=2 S=128 D=64, no timing)", "tutorial": where, "checks": {}}
    fns = [("vbhal flash_attention", lambda q_, k_, v_, causal: flash_attention(q_, k_, v_, causal=causal))]
    if mod is not None:
        fns.insert(0, ("tutorial", tutorial_fn(mod)))
    else:
        print("tutorial kernel NOT checked (file not found): vbhal's side only")
    for name, fn in fns:
        errs = compare(fn, ref, q, k, v, do)
        good = max(errs.values()) < TOL
        ok &= good
        res["checks"][name] = errs
        print(f"{name:24s} causal fwd+bwd vs float32 SDPA: " + " ".join(f"{kk}={e:.1e}" for kk, e in errs.items())
              + f" {'PASS' if good else 'FAIL'}")
    f = BA._flops(4, 16, 4096, 128, True, "fwdbwd")
    print(f"bench_attention._flops(B=4, H=16, S=4096, D=128, causal, fwdbwd) = {f / 1e12:.2f} TFLOP per call")
    res["ok"] = bool(ok)
    p = Path(os.environ.get("RES", "/tmp")) / "attn_bound-smoke.json"
    p.write_text(json.dumps(res, indent=1))
    print(f"smoke {'PASS' if ok else 'FAIL'} (wrote {p})")
    return 0 if ok else 1


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--smoke", action="store_true", help="CPU interpreter check at tiny sizes (TRITON_INTERPRET=1)")
    ap.add_argument("--budget", type=float, default=170.0, help="seconds after which remaining shapes are skipped")
    args = ap.parse_args(argv)
    if args.smoke:
        return smoke()
    if not torch.cuda.is_available():
        print("attn_bound: no CUDA device (use --smoke under TRITON_INTERPRET=1 on CPU)")
        return 2
    return gpu_main(args)


if __name__ == "__main__":
    raise SystemExit(main())
