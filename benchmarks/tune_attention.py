"""Sweep launch configurations and variants of vbhal's Triton attention kernels on the GPU (bf16).

Each candidate is one (kernel, head dim, causal, (BLOCK_M, BLOCK_N, num_warps, num_stages), variant)
and is timed at every requested length on exactly the benchmark's shapes and inputs
(``bench_attention.measure_interleaved``: B = 16384 / S, 2048 / D heads, same seeds), *interleaved
window by window with SDPA's default* on the same inputs: forward candidates by forward TFLOP/s,
dK/dV and dQ candidates by forward+backward TFLOP/s with the other kernels at their defaults.
Candidates are ranked by their ratio to SDPA's default measured in the same windows, which does not
depend on the GPU's clock state: the sweep runs between compiles (an idle, cool GPU boosts higher)
while the benchmark runs a minute of back-to-back kernels, which is why round 4's sweep read
416/474/500 TFLOP/s for the forward the benchmark then measured at 381/417/456 on the same shapes.

Variants, joined by "+": ``pipe`` (the unmasked loop issues the next q @ k^T before the softmax,
VBHAL_ATTN_PIPE=1), ``tma`` (TMA descriptors, VBHAL_ATTN_TMA=1), ``l2=N`` (grid sections of N MiB
of L2 for the candidate's kernel, VBHAL_ATTN_L2_MB=kernel:N; 0 = no sections, the plain heads-fastest order).
Candidates run in the order listed (most informative first) until ``--budget`` seconds are spent;
each costs mostly its compile (an ``l2=`` variant of a compiled config costs no compile). One that
fails to compile (shared memory) is reported and skipped. The winners are printed as the
environment that reproduces them ("BEST env:"), per-length keys (``fwd@128@1@4096=...``) where the
best config at one length beats the overall winner there by more than ``PER_S_GAIN``: what
``_GPU_CONFIGS`` / ``L2_SECTION_MB`` / ``PIPE_QK_HEAD_DIMS`` / ``TMA_FWD_HEAD_DIMS`` in
``vbhal/backends/cuda/attention.py`` should hold.

    python benchmarks/tune_attention.py --budget 40 --out tune.json
    python benchmarks/tune_attention.py --static     # no GPU: smem / registers / spills per candidate
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


# (kernel, head dim, causal, (BLOCK_M, BLOCK_N, num_warps, num_stages), variant), most informative
# first; groups interleave so that a budget cut still leaves every kernel its baseline. Round 4 found
# fwd 128x64x8x3, dK/dV 32x64x4x3, dQ 128x64x8x3 (now the defaults); this round measures the L2
# section order against the plain one (l2=0) and the neighbourhood of each default, hd128 causal.
CANDIDATES = [
    ("fwd", 128, True, (128, 64, 8, 3), ""),          # default (L2 sections of 32 MiB)
    ("fwd", 128, True, (128, 64, 8, 3), "l2=0"),      # round-4 order (no sections)
    ("dkdv", 128, True, (32, 64, 4, 3), ""),          # default
    ("dkdv", 128, True, (32, 64, 4, 3), "l2=0"),
    ("dq", 128, True, (128, 64, 8, 3), ""),           # default
    ("dq", 128, True, (128, 64, 8, 3), "l2=0"),
    ("fwd", 128, True, (128, 64, 8, 3), "l2=16"),
    ("fwd", 128, True, (64, 64, 4, 3), ""),           # 2 CTAs/SM: more resident programs at S=4k
    ("dkdv", 128, True, (32, 64, 4, 2), ""),
    ("dq", 128, True, (128, 64, 8, 2), ""),
    ("fwd", 128, True, (128, 128, 8, 3), ""),
    ("dkdv", 128, True, (32, 64, 4, 4), ""),
    ("dq", 128, True, (64, 64, 4, 3), ""),            # 2 CTAs/SM
    ("fwd", 128, True, (128, 64, 8, 4), ""),
    ("dkdv", 128, True, (64, 64, 8, 3), ""),
    ("fwd", 128, True, (128, 64, 8, 3), "l2=8"),
    ("dkdv", 128, True, (32, 128, 8, 3), ""),
    ("fwd", 128, True, (128, 64, 8, 3), "tma"),
    ("dq", 128, True, (128, 32, 8, 3), ""),
    ("fwd", 128, True, (128, 64, 8, 2), ""),
    ("dkdv", 128, True, (32, 64, 4, 3), "l2=16"),
    ("fwd", 128, True, (128, 64, 8, 3), "pipe"),
    ("fwd", 128, True, (128, 64, 8, 3), "l2=64"),
    ("dq", 128, True, (128, 64, 8, 3), "l2=16"),
]
#: A per-length config key is emitted only where that length's best beats the overall winner by this much.
PER_S_GAIN = 0.02


def static_check(kernel: str, head_dim: int, causal: bool, cfg, variant: str = "") -> dict:
    """Compile one candidate for sm_90a without a GPU and read its resource use (no timing).

    Uses Triton's own toolchain (``triton.compile`` with a ``GPUTarget``, then ``cuobjdump
    --dump-resource-usage`` on the cubin): shared memory, registers per thread and stack bytes
    (> 0 means register spills). Integer arguments get the divisibility-by-16 specialisation the
    launcher gives them at real sizes, and GROUP = 1 (no GQA), so the numbers match what the GPU
    compiles for the benchmark shapes.
    """
    import re
    import subprocess
    import tempfile

    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from vbhal.backends.cuda import attention as A

    bm, bn, warps, stages = cfg
    tensors = {"fwd": "Q K V O", "dkdv": "Q K V DO DK DV DQ", "dq": "Q K V DO DQ"}[kernel].split()
    sig = {n: "*bf16" for n in tensors}
    sig.update({"LSE": "*fp32", "DELTA": "*fp32", "CU": "*i32"} if kernel != "fwd" else {"LSE": "*fp32", "CU": "*i32"})
    for t in tensors:
        sig.update({f"stride_{t.lower()}{x}": "i32" for x in ("b", "h", "n" if t in ("K", "V", "DK", "DV") else "m")})
    sig.update({"stride_lb": "i32", "stride_lh": "i32", "H_KV" if kernel == "dkdv" else "H": "i32", "GROUP": "constexpr",
                "SEQ_Q": "i32", "SEQ_K": "i32", "qk_scale": "fp32"})
    if kernel != "fwd":
        sig["sm_scale"] = "fp32"
    sig.update({"N_BH": "i32", "N_BLOCKS": "i32", "SECTION": "i32"})
    const = dict(GROUP=1, HEAD_DIM=head_dim, BLOCK_M=bm, BLOCK_N=bn, CAUSAL=causal, VARLEN=False)
    if kernel == "fwd":
        const.update(EVEN=True, TMA=False, PIPE="pipe" in variant)
    if kernel == "dkdv":
        const["ATOMIC_DQ"] = False
    sig.update({k: "constexpr" for k in const})
    names = list(sig)
    attrs = {(i,): [["tt.divisibility", 16]] for i, n in enumerate(names) if sig[n] in ("i32", "*bf16", "*fp32", "*i32")}
    fn = {"fwd": A._fwd_kernel, "dkdv": A._bwd_dkdv_kernel, "dq": A._bwd_dq_kernel}[kernel]
    compiled = triton.compile(ASTSource(fn, sig, const, attrs), target=GPUTarget("cuda", 90, 32),
                              options={"num_warps": warps, "num_stages": stages})
    with tempfile.NamedTemporaryFile("wb", suffix=".cubin") as f:
        f.write(compiled.asm["cubin"])
        f.flush()
        tool = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
        usage = subprocess.run([str(tool), "--dump-resource-usage", f.name], capture_output=True, text=True,
                               check=False).stdout
    regs, stack = re.search(r"REG:(\d+)", usage), re.search(r"STACK:(\d+)", usage)
    return {"smem": compiled.metadata.shared, "regs": int(regs.group(1)) if regs else None,
            "stack": int(stack.group(1)) if stack else None}


def _variant(variant: str) -> dict:
    """'pipe+tma+l2=16' -> {'pipe': True, 'tma': True, 'l2': '16'}."""
    parts = set(filter(None, variant.split("+")))
    l2 = next((p.split("=", 1)[1] for p in parts if p.startswith("l2=")), None)
    return {"pipe": "pipe" in parts, "tma": "tma" in parts, "l2": l2}


def _set_env(kernel: str, head_dim: int, cfg, variant: str, base: dict) -> None:
    """Point vbhal's launcher at this candidate (VBHAL_ATTN_CONFIG / _PIPE / _TMA / _L2_MB)."""
    v = _variant(variant)
    name = "fwd_tma" if kernel == "fwd" and v["tma"] else kernel
    cfgs = {**base, name: cfg}
    os.environ["VBHAL_ATTN_CONFIG"] = ";".join(f"{k}={','.join(map(str, c))}" for k, c in cfgs.items())
    os.environ["VBHAL_ATTN_PIPE"] = "1" if v["pipe"] else "0"
    os.environ["VBHAL_ATTN_TMA"] = "1" if v["tma"] else "0"
    if v["l2"] is not None:  # this kernel only: the others keep their default sections
        os.environ["VBHAL_ATTN_L2_MB"] = f"{kernel}:{v['l2']}"


def _clear_env() -> None:
    for var in ("VBHAL_ATTN_CONFIG", "VBHAL_ATTN_PIPE", "VBHAL_ATTN_TMA", "VBHAL_ATTN_ATOMIC_DQ", "VBHAL_ATTN_L2_MB"):
        os.environ.pop(var, None)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--budget", type=float, default=60, help="no new candidate starts after this many seconds")
    ap.add_argument("--seqs", default="4096,8192,16384")
    ap.add_argument("--head-dims", default="128")
    ap.add_argument("--kernels", default="fwd,dkdv,dq")
    ap.add_argument("--out", default="tune_attention.json")
    ap.add_argument("--static", action="store_true",
                    help="no GPU: compile every candidate for sm_90a and print smem / registers / spill stack")
    args = ap.parse_args(argv)
    if args.static:
        for kernel, d, causal, cfg, variant in CANDIDATES:
            if "tma" in variant:
                continue
            try:
                got = static_check(kernel, d, causal, cfg, variant)
            except Exception as e:
                got = f"{type(e).__name__}: {str(e)[:120]}"
            print(f"{kernel:>5} hd{d:<3} {','.join(map(str, cfg)):>13} {variant or '-':>5} {got}", flush=True)
        return 0
    if not torch.cuda.is_available():
        print("tune_attention: no CUDA device")
        return 0
    from benchmarks.bench_attention import TOKENS, WIDTH, measure_interleaved
    from vbhal.backends.cuda import attention as A

    t0 = time.time()
    seqs = [int(x) for x in args.seqs.split(",")]
    dims = {int(x) for x in args.head_dims.split(",")}
    kernels = set(args.kernels.split(","))
    results = []
    _clear_env()
    for kernel, d, causal, cfg, variant in CANDIDATES:
        if kernel not in kernels or d not in dims:
            continue
        if time.time() - t0 > args.budget:
            results.append({"kernel": kernel, "head_dim": d, "causal": causal, "cfg": list(cfg), "variant": variant,
                            "skipped": "budget"})
            continue
        _clear_env()  # defaults of the other kernels, not the previous candidate's override
        base = {name: A._config(name, d, causal) for name in ("fwd", "dkdv", "dq")}
        _set_env(kernel, d, cfg, variant, base)
        row = {"kernel": kernel, "head_dim": d, "causal": causal, "cfg": list(cfg), "variant": variant,
               "tflops": {}, "ref_tflops": {}, "ratio": {}}
        mode = "fwd" if kernel == "fwd" else "fwdbwd"
        c0 = time.time()
        try:
            for s in seqs:
                # exactly the benchmark's shape and inputs; SDPA's default timed in the same windows
                b, h = max(1, TOKENS // s), WIDTH // d
                got = measure_interleaved(["cand", "sdpa_default"], b, h, h, s, d, causal, mode, window_ms=3.0,
                                          rounds=5, fns={"cand": lambda q, k, v, c: A.flash_attention(q, k, v, causal=c)})
                for p in ("cand", "sdpa_default"):
                    if isinstance(got[p], Exception):
                        raise got[p]
                row["tflops"][str(s)] = round(got["cand"][1], 1)
                row["ref_tflops"][str(s)] = round(got["sdpa_default"][1], 1)
                row["ratio"][str(s)] = round(got["cand"][1] / got["sdpa_default"][1], 4)
        except Exception as e:  # a candidate that does not compile (shared memory) is a result
            row["error"] = f"{type(e).__name__}: {(str(e).splitlines() or [''])[0][:140]}"
        row["seconds"] = round(time.time() - c0, 1)
        results.append(row)
        print(_line(row), flush=True)
        Path(args.out).write_text(json.dumps(results, indent=1))
    _clear_env()
    Path(args.out).write_text(json.dumps(results, indent=1))
    print_summary(results, seqs)
    return 0


def _line(r) -> str:
    head = f"{r['kernel']:>5} hd{r['head_dim']:<3} {'causal' if r['causal'] else 'full':6} " \
           f"{','.join(map(str, r['cfg'])):>13} {r['variant'] or '-':>8} |"
    if "skipped" in r:
        return head + " skipped (budget)"
    if "error" in r:
        return head + " " + r["error"]
    vals = list(r["tflops"].values())
    ratios = list(r.get("ratio", {}).values())
    return (head + "".join(f" {v:6.1f}" for v in vals) + " |" + "".join(f" {x:5.3f}" for x in ratios)
            + f" | mean {sum(vals) / len(vals):6.1f} {sum(ratios) / max(1, len(ratios)):5.3f}  ({r['seconds']} s)")


def _score(r, seqs=None) -> float:
    """Mean ratio to SDPA's default in the same windows (clock-independent); TFLOP/s for old results."""
    vals = r.get("ratio") or r["tflops"]
    keys = [str(s) for s in seqs] if seqs else list(vals)
    return sum(vals[k] for k in keys) / len(keys)


def _winners(results, seqs) -> dict:
    """{(kernel, head dim, causal): (mean score over seqs, row)} of the best complete candidate."""
    best = {}
    for r in results:
        if r.get("tflops") and len(r["tflops"]) == len(seqs):
            key = (r["kernel"], r["head_dim"], r["causal"])
            score = _score(r, seqs)
            if key not in best or score > best[key][0]:
                best[key] = (score, r)
    return best


def _per_seq(results, seqs, winners) -> dict:
    """{(kernel, hd, causal, S): row} where another config (same variant) beats the winner at S by PER_S_GAIN."""
    out = {}
    for key, (_, w) in winners.items():
        for s in map(str, seqs):
            same = [r for r in results if r.get("tflops") and len(r["tflops"]) == len(seqs)
                    and (r["kernel"], r["head_dim"], r["causal"]) == key and r["variant"] == w["variant"]]
            top = max(same, key=lambda r: (r.get("ratio") or r["tflops"])[s])
            metric = "ratio" if top.get("ratio") else "tflops"
            if top is not w and top[metric][s] > w[metric][s] * (1 + PER_S_GAIN):
                out[(*key, int(s))] = top
    return out


def print_summary(results, seqs) -> None:
    mode = {"fwd": "fwd", "dkdv": "fwd+bwd", "dq": "fwd+bwd"}
    print("# tune_attention: kernel hd causal  BM,BN,warps,stages  variant | TFLOP/s " +
          " ".join(f"S={s // 1024}k" for s in seqs) + " | x SDPA default (same windows) | mean")
    for r in results:
        print(_line(r))
    winners = _winners(results, seqs)
    for (kernel, d, causal), (score, r) in sorted(winners.items()):
        print(f"BEST {kernel} hd{d} {'causal' if causal else 'full'}: {tuple(r['cfg'])} {r['variant'] or '-'} "
              f"{mode[kernel]} " + " ".join(f"S={s}:{r['tflops'][str(s)]:.0f}" for s in seqs)
              + f" mean x{score:.3f} of SDPA default")
    for (kernel, d, causal, s), r in sorted(_per_seq(results, seqs, winners).items()):
        print(f"BEST {kernel} hd{d} {'causal' if causal else 'full'} S={s}: {tuple(r['cfg'])} "
              f"{r['tflops'][str(s)]:.0f} TFLOP/s x{(r.get('ratio') or {}).get(str(s), 0):.3f}")
    print("BEST env: " + " ".join(f"{k}={v}" for k, v in best_env(results, seqs).items()))


def best_env(results, seqs) -> dict:
    """Environment that makes vbhal's launcher use the winners (VBHAL_ATTN_CONFIG keys per head dim,
    causality and, where it pays, length bucket; VBHAL_ATTN_PIPE / _TMA as lists of head dims;
    VBHAL_ATTN_L2_MB per kernel where a winner's differs from the default); what to pin in the code."""
    winners = _winners(results, seqs)
    cfg, pipe, tma, l2 = [], [], [], []
    for (kernel, d, causal), (_, r) in sorted(winners.items()):
        v = _variant(r["variant"])
        name = "fwd_tma" if kernel == "fwd" and v["tma"] else kernel
        cfg.append(f"{name}@{d}@{int(causal)}={','.join(map(str, r['cfg']))}")
        if kernel == "fwd":
            (pipe if v["pipe"] else []).append(str(d))
            (tma if v["tma"] else []).append(str(d))
        if v["l2"] is not None:
            l2.append(f"{kernel}:{v['l2']}")
    for (kernel, d, causal, s), r in sorted(_per_seq(results, seqs, winners).items()):
        name = "fwd_tma" if kernel == "fwd" and _variant(r["variant"])["tma"] else kernel
        cfg.append(f"{name}@{d}@{int(causal)}@{s}={','.join(map(str, r['cfg']))}")
    env = {"VBHAL_ATTN_CONFIG": ";".join(cfg)}
    if pipe:
        env["VBHAL_ATTN_PIPE"] = ",".join(pipe)
    if tma:
        env["VBHAL_ATTN_TMA"] = ",".join(tma)
    if l2:
        env["VBHAL_ATTN_L2_MB"] = ",".join(l2)
    return env

if __name__ == "__main__":
    raise SystemExit(main())
