"""Session 6: where the packed nvfp4 decode differs from the codec on the GPU (prints the mismatches)."""
import torch
import triton
import triton.language as tl

from vbhal.backends.cuda import fp4_kernels as _K
from vbhal.formats.e2m1 import decode_e2m1


@triton.jit
def probe(w_ptr, s_ptr, out_ptr, sc_ptr, IS_NV: tl.constexpr, WPB: tl.constexpr, BN: tl.constexpr, NBK: tl.constexpr):
    r = tl.arange(0, BN)
    w = tl.load(w_ptr + r[:, None, None] * (NBK * WPB) + tl.arange(0, NBK)[None, :, None] * WPB
                + tl.arange(0, WPB)[None, None, :])
    sb = tl.load(s_ptr + r[:, None] * NBK + tl.arange(0, NBK)[None, :])
    t = _K._e2m1_packed_tile(w, sb, tl.bfloat16, IS_NV, True, BN, NBK * WPB * 8)
    tl.store(out_ptr + r[:, None] * (NBK * WPB * 8) + tl.arange(0, NBK * WPB * 8)[None, :], t)
    tl.store(sc_ptr + r[:, None] * NBK + tl.arange(0, NBK)[None, :], _K._scale_bf16(sb, IS_NV))


nbk, block = 256, 16
g = torch.Generator().manual_seed(6)
codes = torch.randint(0, 256, (16, nbk * block // 2), dtype=torch.uint8, generator=g)
sbytes = torch.arange(nbk, dtype=torch.int64)
sbytes = torch.where((sbytes & 0x7F) == 0x7F, 0, sbytes)
scales = sbytes.to(torch.uint8).repeat(16, 1)
out = torch.empty(16, nbk * block, dtype=torch.bfloat16, device="cuda")
sc_out = torch.empty(16, nbk, dtype=torch.bfloat16, device="cuda")
probe[(1,)](codes.cuda().view(torch.int32), scales.cuda(), out, sc_out, True, 2, 16, nbk)
nib = torch.stack([codes.to(torch.int64) & 0xF, codes.to(torch.int64) >> 4], 2).reshape(16, -1)
vals = decode_e2m1(nib.to(torch.uint8), torch.float64)
sc = scales.view(torch.float8_e4m3fn).to(torch.float64)
print("scale bf16 mismatches:", int((sc_out.cpu().double() != sc).sum()),
      [(j, float(sc_out[0, j]), float(sc[0, j])) for j in (sc_out[0].cpu().double() != sc[0]).nonzero().flatten()[:8].tolist()])
ref = (vals.reshape(16, nbk, block) * sc[:, :, None]).reshape(16, -1).to(torch.bfloat16)
got = out.cpu()
bad = got.view(torch.int16) != ref.view(torch.int16)
print("tile mismatches:", int(bad.sum()), "of", bad.numel())
for i, j in bad.nonzero()[:20].tolist():
    print(i, j, "code", int(nib[i, j]), "scale byte", int(scales[i, j // block]), "got", float(got[i, j]),
          hex(int(got.view(torch.int16)[i, j]) & 0xFFFF), "ref", float(ref[i, j]), hex(int(ref.view(torch.int16)[i, j]) & 0xFFFF))
