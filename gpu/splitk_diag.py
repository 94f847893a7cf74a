"""Diagnose the mm_t split-K failure at M=1024 (test_gpu_linear_paths[t16], N=4144 K=4128): which knob makes it wrong,
where the wrong elements are, and whether it repeats."""
import itertools

import torch

import vbhal.formats as VF
from vbhal.backends.cuda import fp4_linear as L

g = torch.Generator(device="cuda").manual_seed(1)
n, k = 4096 + 48, 4096 + 32
w = torch.randn(n, k, device="cuda", generator=g) * 0.02
qw = L.quantize_fp4(w.to(torch.bfloat16), "mxfp4")
wd = VF.dequantize(qw, torch.float32)
codes, scales, ts, fid = L.qw_operands(qw)
for m, split, stages, bn, path in itertools.chain(
        [(1024, s, 4, 64, "mm_t") for s in (1, 2, 4)],
        [(1024, 4, 3, 64, "mm_t"), (1024, 4, 4, 128, "mm_t"), (512, 4, 4, 64, "mm_t"), (768, 4, 4, 64, "mm_t"),
         (1024, 4, 4, 64, "mm_w32"), (2048, 4, 4, 64, "mm_t")]):
    x = torch.randn(m, k, device="cuda", generator=g).to(torch.bfloat16)
    cfg = {"BLOCK_M": 16, "BLOCK_N": bn, "NBK": 4, "GROUP_M": 8, "SPLIT_K": split, "num_warps": 4, "num_stages": stages}
    ref = x.float() @ wd.t()
    errs, where = [], None
    for rep in range(2):
        y = L._linear_2d(x, codes, scales, ts, None, fid, n, k, path, config=cfg)
        e = (y.float() - ref)
        errs.append(round(float(e.norm() / ref.norm()), 5))
        bad = (e.abs() > 0.05 * ref.abs().amax()).nonzero()
        if len(bad) and where is None:
            r, c = bad[:, 0], bad[:, 1]
            where = (f"{len(bad)} bad; m {r.min().item()}..{r.max().item()} ({r.unique().numel()} rows); "
                     f"n {c.min().item()}..{c.max().item()} ({c.unique().numel()} cols); m-tiles {sorted((r // 16).unique().tolist())[:12]}; "
                     f"n-tiles {sorted((c // bn).unique().tolist())[:12]}")
    print(f"{path} M={m} split={split} stages={stages} BN={bn}: rel err {errs}  {where or ''}", flush=True)
