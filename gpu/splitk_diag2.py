"""Split-K M=1024 failure, part 2: is the workspace already wrong after the split kernel (atomics), or does the
finalize kernel go wrong? The workspace is copied out (after a device sync) before the finalize runs."""
import torch

import vbhal.formats as VF
from vbhal.backends.cuda import fp4_linear as L

g = torch.Generator(device="cuda").manual_seed(1)
n, k = 4096 + 48, 4096 + 32
w = torch.randn(n, k, device="cuda", generator=g) * 0.02
qw = L.quantize_fp4(w.to(torch.bfloat16), "mxfp4")
wd = VF.dequantize(qw, torch.float32)
codes, scales, ts, fid = L.qw_operands(qw)
orig = L._finalize
seen = {}


def spy(ws, bias, y):
    torch.cuda.synchronize()
    m, nn = y.shape
    seen["ws"] = ws[: m * nn].view(m, nn).clone()
    seen["nonzero_tail"] = int((ws[m * nn:] != 0).sum())
    orig(ws, bias, y)
    torch.cuda.synchronize()
    seen["ws_after"] = int((ws[: m * nn] != 0).sum())


def torch_finalize(ws, bias, y):
    m, nn = y.shape
    y.copy_(ws[: m * nn].view(m, nn))
    ws[: m * nn].zero_()


for m in (512, 1024, 2048):
    x = torch.randn(m, k, device="cuda", generator=g).to(torch.bfloat16)
    ref = x.float() @ wd.t()
    cfg = {"BLOCK_M": 16, "BLOCK_N": 64, "NBK": 4, "GROUP_M": 8, "SPLIT_K": 4, "num_warps": 4, "num_stages": 4}
    L._finalize = spy
    y = L._linear_2d(x, codes, scales, ts, None, fid, n, k, "mm_t", config=cfg)
    e_ws = float((seen["ws"] - ref).norm() / ref.norm())
    e_y = float((y.float() - ref).norm() / ref.norm())
    print(f"M={m}: workspace before finalize rel err {e_ws:.5f}; y rel err {e_y:.5f}; ws nonzero beyond m*n "
          f"{seen['nonzero_tail']}; ws nonzero after finalize {seen['ws_after']}", flush=True)
    L._finalize = torch_finalize
    y2 = L._linear_2d(x, codes, scales, ts, None, fid, n, k, "mm_t", config=cfg)
    print(f"M={m}: with a torch finalize (copy + zero_) y rel err {float((y2.float() - ref).norm() / ref.norm()):.5f}",
          flush=True)
    L._finalize = orig
    torch.cuda.synchronize()
    y3 = L._linear_2d(x, codes, scales, ts, None, fid, n, k, "mm_t", config=cfg)
    torch.cuda.synchronize()
    print(f"M={m}: plain again (after syncs) y rel err {float((y3.float() - ref).norm() / ref.norm()):.5f}", flush=True)
