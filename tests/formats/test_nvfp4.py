"""NVFP4: bit-exact with torchao 0.18's nvfp4_quantize / NVFP4Tensor (two-level scaling)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from fp4_refs import random_weight, torchao_mx

from vbhal.formats import quantize
from vbhal.formats.e2m1 import decode_e2m1, unpack_fp4
from vbhal.formats.nvfp4 import E4M3_MAX, NVFP4_MIN_TENSOR_SCALE


def _torchao(w: torch.Tensor):
    _, _, nv = torchao_mx()
    wp = F.pad(w.cpu(), (0, -w.shape[1] % 16)).contiguous()
    pts = nv.per_tensor_amax_to_scale(wp.abs().max())
    t = nv.NVFP4Tensor.to_nvfp4(wp, per_tensor_scale=pts)
    return t, pts


def _assert_bit_exact(w: torch.Tensor, device: str):
    qw = quantize(w.to(device), "nvfp4")
    t, pts = _torchao(w)
    assert torch.equal(qw.tensor_scale.cpu(), pts.to(torch.float32)), "tensor scale differs from torchao"
    assert torch.equal(qw.scales.view(torch.uint8).cpu(), t.scale.view(torch.uint8)), "E4M3 scales differ"
    assert torch.equal(qw.codes.cpu(), t.qdata.view(torch.uint8)), "packed FP4 bytes differ"
    k = w.shape[1]
    assert torch.equal(qw.dequantize().cpu(), t.dequantize(torch.float32)[:, :k]), "decode differs"
    return qw


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_bit_exact_with_torchao_random(dtype, device):
    _assert_bit_exact(random_weight(48, 256, dtype, seed=21), device)


@pytest.mark.parametrize("scale", [2.0**-100, 2.0**-60, 1e-8, 1.0, 1e8, 2.0**100, 2.0**124])
def test_bit_exact_with_torchao_tiny_and_huge_magnitudes(scale, device):
    w = random_weight(8, 64, seed=22, spread=False) * scale
    assert torch.isfinite(w).all()
    _assert_bit_exact(w, device)


def test_exact_ties_saturation_zero_blocks_and_small_blocks(device):
    w = random_weight(6, 64, seed=23)
    # the tensor max (600 > any random entry) and E2M1 midpoints times the same factor: with two float32
    # scale steps in between they land within an ulp of the midpoints, where rounding must agree
    w[0, :16] = torch.tensor([6.0, 0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0] * 2) * 100.0
    w[1, 16:32] = 0.0  # zero block -> smallest block scale, codes 0
    w[2, :16] = 1e-9  # block far below the tensor max -> block scale clamps at 2^-6
    w[3, :16] = -w[3, :16].abs()  # all negative
    qw = _assert_bit_exact(w, device)
    deq = qw.dequantize().cpu()
    assert (deq[1, 16:32] == 0).all()
    assert qw.scales[0, 0].float().item() == E4M3_MAX  # the block holding the tensor max


@pytest.mark.parametrize("k", [1, 5, 17, 40])
def test_k_not_a_multiple_of_the_block_is_zero_padded(k, device):
    w = random_weight(7, k, seed=24 + k)
    qw = _assert_bit_exact(w, device)
    kp = -(-k // 16) * 16
    assert qw.codes.shape == (7, kp // 2) and qw.scales.shape == (7, kp // 16)
    assert (unpack_fp4(qw.codes.cpu())[:, k:] == 0).all()
    assert qw.dequantize().shape == (7, k)


def test_decode_is_code_times_tensor_scale_times_block_scale(device):
    w = random_weight(5, 48, seed=25)
    qw = quantize(w.to(device), "nvfp4")
    vals = decode_e2m1(unpack_fp4(qw.codes)).reshape(5, 3, 16)
    ref = vals * (qw.tensor_scale * qw.scales.float()).unsqueeze(-1)
    assert torch.equal(qw.dequantize(), ref.reshape(5, 48))


def test_all_zero_tensor_and_subnormal_tensor_stay_finite(device):
    """torchao's reciprocal overflows here (NaN codes); our tensor-scale floor keeps it exact."""
    z = torch.zeros(3, 32, device=device)
    qz = quantize(z, "nvfp4")
    assert qz.tensor_scale.item() == NVFP4_MIN_TENSOR_SCALE
    assert (qz.dequantize() == 0).all() and (qz.codes == 0).all()
    tiny = random_weight(3, 32, seed=26, spread=False) * 1e-40  # float32 subnormals
    qt = quantize(tiny.to(device), "nvfp4")
    deq = qt.dequantize()
    assert torch.isfinite(deq).all()
    # error bounded by half the largest E2M1 step (1.0) times the block scale
    step = (qt.tensor_scale * qt.scales.float()).repeat_interleave(16, dim=1)
    assert ((deq - tiny.to(device)).abs() <= step * 1.0 + 1e-45).all()


def test_calibrated_tensor_scale_is_used(device):
    w = random_weight(4, 32, seed=27).to(device)
    ts = torch.tensor(0.5, device=device)
    qw = quantize(w, "nvfp4", tensor_scale=ts)
    assert qw.tensor_scale.item() == 0.5
    _, _, nv = torchao_mx()
    s, d = nv.nvfp4_quantize(w.cpu(), 16, ts.cpu())
    assert torch.equal(qw.scales.view(torch.uint8).cpu(), s.view(torch.uint8))
    assert torch.equal(qw.codes.cpu(), d.view(torch.uint8))


def test_exact_ties_with_unit_scales_round_to_even(device):
    # tensor max 2688 = 448 * 6 -> tensor scale exactly 1; a block with max 6 -> block scale exactly 1,
    # reciprocal exactly 1: the E2M1 midpoints reach the rounding step unchanged.
    w = torch.zeros(2, 16)
    w[0, 0] = 2688.0
    w[1] = torch.tensor([6.0, 0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, -0.25, -0.75, -1.25, -1.75, -2.5, -3.5, -5.0, -6.0])
    qw = _assert_bit_exact(w, device)
    assert qw.tensor_scale.item() == 1.0 and qw.scales[1, 0].float().item() == 1.0
    codes = unpack_fp4(qw.codes.cpu())[1].tolist()
    assert codes == [7, 0, 2, 2, 4, 4, 6, 6, 8, 10, 10, 12, 12, 14, 14, 15]
