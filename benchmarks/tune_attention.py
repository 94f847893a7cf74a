"""Sweep launch configurations and variants of vbhal's Triton attention kernels on the GPU (bf16).

Each candidate is one (kernel, head dim, causal, (BLOCK_M, BLOCK_N, num_warps, num_stages), variant)
and is timed at every requested length with 16k tokens per batch (B = 16384 / S, 2048 / D heads):
forward candidates by forward TFLOP/s, dK/dV and dQ candidates by forward+backward TFLOP/s with the
other kernels at their defaults. Forward variants: ``pipe`` (the unmasked loop issues the next
q @ k^T before the softmax, VBHAL_ATTN_PIPE=1) and ``tma`` (K/V/Q/O through TMA descriptors,
VBHAL_ATTN_TMA=1). Candidates run in the order listed (most promising first) until ``--budget``
seconds are spent; each costs mostly its compile (a few seconds). One that fails to compile (shared
memory) is reported and skipped. The winners are what ``_GPU_CONFIGS`` / ``PIPE_QK_HEAD_DIMS`` /
``TMA_FWD_HEAD_DIMS`` in ``vbhal/backends/cuda/attention.py`` should hold.

    python benchmarks/tune_attention.py --budget 60 --out tune.json
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

from benchmarks.bench_attention import _flops, _time  # noqa: E402

# (kernel, head dim, causal, (BLOCK_M, BLOCK_N, num_warps, num_stages), variant), most promising first
# within each group; groups interleave so that a budget cut still leaves every kernel a baseline.
# Chosen with a static check (compiled for sm_90a on a CPU with Triton's ptxas, cuobjdump resource
# usage, K/V heads == Q heads): none of the non-baseline candidates spills registers, and the
# 64-row forward / 32x64x4 dK/dV / 64-row dQ ones fit two CTAs per SM (smem and registers). The current
# dK/dV default (64, 128, 8, 3) spills at hd128 (about 250 bytes of stack), which is why it is
# the first thing to beat.
CANDIDATES = [
    ("fwd", 128, True, (128, 128, 8, 3), ""),      # current default (baseline)
    ("dkdv", 128, True, (64, 128, 8, 3), ""),      # current default (baseline; spills)
    ("dq", 128, True, (128, 64, 8, 3), ""),        # current default (baseline)
    ("fwd", 128, True, (128, 64, 8, 3), "pipe"),
    ("dkdv", 128, True, (32, 128, 8, 3), ""),
    ("fwd", 128, True, (64, 64, 4, 3), ""),        # 2 CTAs/SM
    ("dkdv", 128, True, (32, 64, 4, 3), ""),       # 2 CTAs/SM
    ("dq", 128, True, (64, 64, 4, 2), ""),         # 2 CTAs/SM
    ("fwd", 128, True, (128, 64, 8, 3), ""),
    ("fwd", 128, True, (64, 64, 4, 2), "pipe"),    # 2 CTAs/SM
    ("dkdv", 128, True, (32, 64, 8, 3), ""),
    ("dq", 128, True, (64, 32, 4, 3), ""),         # 2 CTAs/SM
    ("fwd", 128, True, (128, 128, 8, 3), "tma"),
    ("fwd", 128, True, (128, 64, 8, 3), "tma+pipe"),
    ("fwd", 64, True, (128, 64, 4, 4), ""),        # current default (baseline)
    ("dkdv", 64, True, (64, 128, 8, 3), ""),       # current default (baseline)
    ("dq", 64, True, (128, 64, 8, 3), ""),         # current default (baseline)
    ("fwd", 64, True, (128, 64, 4, 4), "pipe"),
    ("fwd", 64, True, (64, 128, 4, 3), ""),        # 2 CTAs/SM
    ("dkdv", 64, True, (32, 128, 8, 3), ""),
    ("dq", 64, True, (64, 64, 4, 3), ""),
    ("fwd", 128, True, (128, 64, 8, 4), "pipe"),
    ("dkdv", 128, True, (32, 64, 8, 4), ""),
    ("dq", 128, True, (64, 64, 4, 3), ""),
    ("fwd", 64, True, (128, 128, 8, 3), "pipe"),
    ("fwd", 64, True, (64, 64, 4, 3), ""),
    ("dkdv", 64, True, (32, 64, 4, 3), ""),
    ("fwd", 128, True, (64, 64, 4, 2), ""),
]


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


def _set_env(kernel: str, head_dim: int, cfg, variant: str, base: dict) -> None:
    """Point vbhal's launcher at this candidate (VBHAL_ATTN_CONFIG / _PIPE / _TMA)."""
    name = "fwd_tma" if kernel == "fwd" and "tma" in variant else kernel
    cfgs = {**base, name: cfg}
    os.environ["VBHAL_ATTN_CONFIG"] = ";".join(f"{k}={','.join(map(str, v))}" for k, v in cfgs.items())
    os.environ["VBHAL_ATTN_PIPE"] = "1" if "pipe" in variant else "0"
    os.environ["VBHAL_ATTN_TMA"] = "1" if "tma" in variant else "0"


def _clear_env() -> None:
    for var in ("VBHAL_ATTN_CONFIG", "VBHAL_ATTN_PIPE", "VBHAL_ATTN_TMA", "VBHAL_ATTN_ATOMIC_DQ"):
        os.environ.pop(var, None)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--budget", type=float, default=60, help="no new candidate starts after this many seconds")
    ap.add_argument("--seqs", default="4096,8192,16384")
    ap.add_argument("--head-dims", default="128,64")
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
    from vbhal.backends.cuda import attention as A

    t0 = time.time()
    seqs = [int(x) for x in args.seqs.split(",")]
    dims = {int(x) for x in args.head_dims.split(",")}
    kernels = set(args.kernels.split(","))
    inputs = {}

    def tensors(d, s):
        if (d, s) not in inputs:
            b, h = 16384 // s, 2048 // d
            g = torch.Generator(device="cuda").manual_seed(s + d)
            inputs[(d, s)] = (b, h, [torch.randn(b, h, s, d, device="cuda", dtype=torch.bfloat16, generator=g)
                                     for _ in range(4)])
        return inputs[(d, s)]

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
        row = {"kernel": kernel, "head_dim": d, "causal": causal, "cfg": list(cfg), "variant": variant, "tflops": {}}
        c0 = time.time()
        try:
            for s in seqs:
                b, h, (q, k, v, do) = tensors(d, s)
                if kernel == "fwd":
                    def step():
                        with torch.no_grad():
                            A.flash_attention(q, k, v, causal=causal)
                    mode = "fwd"
                else:
                    leaves = [t.detach().requires_grad_() for t in (q, k, v)]

                    def step(leaves=leaves):
                        A.flash_attention(*leaves, causal=causal).backward(do)
                        for t in leaves:
                            t.grad = None
                    mode = "fwdbwd"
                ms = _time(step, window_ms=3.0, rounds=5)
                row["tflops"][str(s)] = round(_flops(b, h, s, d, causal, mode) / ms / 1e9, 1)
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
    return head + "".join(f" {v:7.1f}" for v in vals) + f" | mean {sum(vals) / len(vals):6.1f}  ({r['seconds']} s)"


def _winners(results, seqs) -> dict:
    """{(kernel, head dim, causal): (mean TFLOP/s over seqs, row)} of the fastest complete candidate."""
    best = {}
    for r in results:
        if r.get("tflops") and len(r["tflops"]) == len(seqs):
            key = (r["kernel"], r["head_dim"], r["causal"])
            mean = sum(r["tflops"].values()) / len(seqs)
            if key not in best or mean > best[key][0]:
                best[key] = (mean, r)
    return best


def print_summary(results, seqs) -> None:
    mode = {"fwd": "fwd TFLOP/s", "dkdv": "fwd+bwd TFLOP/s", "dq": "fwd+bwd TFLOP/s"}
    print("# tune_attention: kernel hd causal  BM,BN,warps,stages  variant | " +
          " ".join(f"S={s // 1024}k" for s in seqs) + " | mean")
    for r in results:
        print(_line(r))
    for (kernel, d, causal), (mean, r) in sorted(_winners(results, seqs).items()):
        print(f"BEST {kernel} hd{d} {'causal' if causal else 'full'}: {tuple(r['cfg'])} {r['variant'] or '-'} "
              f"mean {mean:.1f} {mode[kernel]}")
    print("BEST env: " + " ".join(f"{k}={v}" for k, v in best_env(results, seqs).items()))


def best_env(results, seqs) -> dict:
    """Environment that makes vbhal's launcher use the winners (VBHAL_ATTN_CONFIG keys per head dim
    and causality, VBHAL_ATTN_PIPE / VBHAL_ATTN_TMA as lists of head dims); what to pin in the code."""
    cfg, pipe, tma = [], [], []
    for (kernel, d, causal), (_, r) in sorted(_winners(results, seqs).items()):
        name = "fwd_tma" if kernel == "fwd" and "tma" in r["variant"] else kernel
        cfg.append(f"{name}@{d}@{int(causal)}={','.join(map(str, r['cfg']))}")
        if kernel == "fwd":
            (pipe if "pipe" in r["variant"] else []).append(str(d))
            (tma if "tma" in r["variant"] else []).append(str(d))
    env = {"VBHAL_ATTN_CONFIG": ";".join(cfg)}
    if pipe:
        env["VBHAL_ATTN_PIPE"] = ",".join(pipe)
    if tma:
        env["VBHAL_ATTN_TMA"] = ",".join(tma)
    return env


if __name__ == "__main__":
    raise SystemExit(main())
