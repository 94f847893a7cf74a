"""Session 7: one planned FP4 linear call (K = N = 8192, bf16, with bias) under Nsight Compute, to see what
bounds the kernels at small M: occupancy, issue activity and warp stall reasons. argv: fmt M. The plan is made
(and its configs tuned) before the profiled region; ncu runs with --profile-from-start off."""
import sys

import torch

from vbhal.backends.cuda import fp4_linear as L
from vbhal.backends.cuda.fp4_quantize import quantize_fp4, qw_operands

fmt, m = sys.argv[1], int(sys.argv[2])
torch.manual_seed(0)
n = k = 8192
w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * 0.02
bias = torch.randn(n, device="cuda", dtype=torch.bfloat16)
codes, scales, ts, fid = qw_operands(quantize_fp4(w, fmt))
x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
for _ in range(3):
    L._forward_2d(x, codes, scales, ts, bias, fid, n, k)
torch.cuda.synchronize()
print("plan:", {str(kk): getattr(v, "__name__", str(v))[:200] for kk, v in L._PLANS.items()}, flush=True)
torch.cuda.cudart().cudaProfilerStart()
L._forward_2d(x, codes, scales, ts, bias, fid, n, k)
torch.cuda.synchronize()
torch.cuda.cudart().cudaProfilerStop()
