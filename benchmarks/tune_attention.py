"""Sweep launch configurations of vbhal's Triton attention kernels on the GPU (bf16).

For each head dim and causality it times the forward with every forward candidate, then
forward+backward with every dK/dV candidate (dQ fixed), then with every dQ candidate (dK/dV fixed at
its winner), at B*S = 16k tokens, S = 8k. The winners are what ``_GPU_CONFIGS`` in
``vbhal/backends/cuda/attention.py`` should hold. Candidates that fail to compile (shared memory)
are reported and skipped.

    python benchmarks/tune_attention.py --budget 90 --out tune.json
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

# (BLOCK_M, BLOCK_N, num_warps, num_stages)
CANDIDATES = {
    ("fwd", 128): [(128, 64, 8, 3), (128, 128, 8, 3), (128, 64, 8, 4), (128, 64, 4, 3), (128, 128, 8, 2),
                   (64, 64, 4, 3), (128, 32, 4, 4)],
    ("fwd", 64): [(128, 64, 4, 3), (128, 128, 8, 3), (128, 64, 4, 4), (128, 64, 8, 3), (128, 128, 4, 3),
                  (64, 64, 4, 4)],
    ("dkdv", 128): [(64, 128, 8, 3), (32, 128, 4, 3), (64, 128, 8, 2), (64, 64, 4, 3), (32, 64, 4, 4),
                    (128, 128, 8, 2)],
    ("dkdv", 64): [(64, 128, 8, 3), (32, 128, 4, 3), (64, 128, 4, 3), (64, 64, 4, 4), (128, 128, 8, 3)],
    ("dq", 128): [(128, 64, 8, 3), (64, 64, 4, 3), (128, 32, 4, 3), (64, 128, 8, 2), (128, 128, 8, 2)],
    ("dq", 64): [(128, 64, 8, 3), (64, 64, 4, 3), (128, 32, 4, 3), (128, 128, 8, 3), (64, 128, 4, 3)],
    # forward through TMA descriptors (VBHAL_ATTN_TMA=1)
    ("fwd_tma", 128): [(128, 64, 8, 3), (128, 128, 8, 3), (128, 64, 8, 4), (128, 64, 4, 3), (128, 128, 8, 2)],
    ("fwd_tma", 64): [(128, 64, 4, 3), (128, 128, 8, 3), (128, 64, 4, 4), (128, 64, 8, 3), (128, 128, 4, 3)],
    # dK/dV kernel that also accumulates dQ with fp32 atomics (no dQ kernel): VBHAL_ATTN_ATOMIC_DQ=1
    ("dkdv_atomic", 128): [(64, 128, 8, 3), (32, 128, 4, 3), (64, 64, 4, 3), (64, 128, 8, 2), (128, 128, 8, 2)],
    ("dkdv_atomic", 64): [(64, 128, 8, 3), (32, 128, 4, 3), (64, 64, 4, 3), (128, 128, 8, 3), (64, 128, 4, 3)],
}


def _env(cfg: dict) -> None:
    os.environ["VBHAL_ATTN_CONFIG"] = ";".join(f"{k}={','.join(map(str, v))}" for k, v in cfg.items())


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--budget", type=float, default=120)
    ap.add_argument("--seq", type=int, default=8192)
    ap.add_argument("--head-dims", default="128,64")
    ap.add_argument("--out", default="tune_attention.json")
    ap.add_argument("--max-per-kernel", type=int, default=99, help="first N candidates of each kernel only")
    ap.add_argument("--kernels", default="fwd,fwd_tma,dkdv,dq,dkdv_atomic")
    ap.add_argument("--causal", default="1,0")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("tune_attention: no CUDA device")
        return 0
    from vbhal.backends.cuda import attention as A

    t0 = time.time()
    results = []
    s = args.seq
    for d in map(int, args.head_dims.split(",")):
        for causal in (c == "1" for c in args.causal.split(",")):
            b, h = 16384 // s, 2048 // d
            q, k, v = (torch.randn(b, h, s, d, device="cuda", dtype=torch.bfloat16, requires_grad=True)
                       for _ in range(3))
            do = torch.randn_like(q)
            names = tuple(args.kernels.split(","))
            best = {name: A._GPU_CONFIGS[(name, d)] for name in ("fwd", "fwd_tma", "dkdv", "dq", "dkdv_atomic")}
            for name in names:
                os.environ["VBHAL_ATTN_ATOMIC_DQ"] = "1" if name == "dkdv_atomic" else "0"
                os.environ["VBHAL_ATTN_TMA"] = "1" if name == "fwd_tma" else "0"
                scores = []
                for cand in CANDIDATES[(name, d)][: args.max_per_kernel]:
                    if time.time() - t0 > args.budget:
                        break
                    _env({**best, name: cand})
                    try:
                        if name in ("fwd", "fwd_tma"):
                            with torch.no_grad():
                                ms = _time(lambda: A.flash_attention(q, k, v, causal=causal))
                            tf = _flops(b, h, s, d, causal, "fwd") / ms / 1e9
                        else:
                            def step():
                                A.flash_attention(q, k, v, causal=causal).backward(do)
                                q.grad = k.grad = v.grad = None
                            ms = _time(step)
                            tf = _flops(b, h, s, d, causal, "fwdbwd") / ms / 1e9
                        scores.append((tf, cand))
                        results.append({"kernel": name, "head_dim": d, "causal": causal, "seq": s, "cfg": cand,
                                        "ms": ms, "tflops": tf})
                    except Exception as e:
                        err = f"{type(e).__name__}: {str(e).splitlines()[0][:120] if str(e) else ''}"
                        print(f"hd{d} causal={causal} {name} {cand}: {err}", flush=True)
                        results.append({"kernel": name, "head_dim": d, "causal": causal, "cfg": cand, "error": err})
                if scores:
                    best[name] = max(scores)[1]
                    print(f"hd{d} causal={causal} {name}: " + "  ".join(f"{c}={t:.0f}" for t, c in sorted(scores, reverse=True)),
                          flush=True)
            results.append({"best": {k2: list(v2) for k2, v2 in best.items()}, "head_dim": d, "causal": causal})
            print(f"BEST hd{d} causal={causal}: {best}", flush=True)
            Path(args.out).write_text(json.dumps(results, indent=1))
    os.environ.pop("VBHAL_ATTN_CONFIG", None)
    os.environ.pop("VBHAL_ATTN_ATOMIC_DQ", None)
    os.environ.pop("VBHAL_ATTN_TMA", None)
    Path(args.out).write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
