"""MXFP4 (OCP MX v1.0): bit-exact with torchao 0.18's to_mx (FLOOR, RCEIL) and with the spec in float64."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from fp4_refs import (
    e2m1_ref_code,
    mx_floor_ref_scale_code,
    mx_rceil_ref_scale_code,
    random_weight,
    torchao_mx,
)

from vbhal.formats import quantize
from vbhal.formats.e2m1 import unpack_fp4
from vbhal.formats.mx import e8m0_to_float32

RULES = ["floor", "rceil"]


def _torchao(w: torch.Tensor, rule: str):
    """torchao's (scale codes uint8 (N, nb), packed codes uint8 (N, K/2)) for a K-padded copy of w."""
    _, mx_tensor, _ = torchao_mx()
    k = w.shape[1]
    wp = F.pad(w, (0, -k % 32)).contiguous()
    mode = getattr(mx_tensor.ScaleCalculationMode, rule.upper())
    s, d = mx_tensor.to_mx(wp.cpu(), torch.float4_e2m1fn_x2, 32, mode)
    return s.view(torch.uint8), d.view(torch.uint8)


def _torchao_deviates(w: torch.Tensor, rule: str) -> torch.Tensor:
    """Blocks (N, nb) where torchao departs from the spec/hardware rule (see vbhal/formats/mx.py).

    FLOOR: block max < 2^-124 (scale code 0: torchao divides by 2^-126, stores 2^-127).
    RCEIL: d = amax/6 <= 2^-126 (torchao's reciprocal 1.0 for code 0), or float32 log2 rounding
    making torchao's ceil(log2(d)) differ from the exact round-up.
    """
    wp = F.pad(w.float().cpu(), (0, -w.shape[1] % 32))
    amax = wp.reshape(wp.shape[0], -1, 32).abs().amax(-1)
    if rule == "floor":
        return amax < 2.0**-124
    d = amax / 6.0
    exact = torch.tensor([mx_rceil_ref_scale_code(v) for v in d.flatten().tolist()]).reshape(d.shape)
    theirs = (torch.ceil(torch.log2(d)).clamp(-127, 127) + 127).to(torch.int64)
    return (d <= 2.0**-126) | (theirs != exact)


def _assert_bit_exact(w: torch.Tensor, rule: str, device: str):
    qw = quantize(w.to(device), "mxfp4", scale_rule=rule)
    s_ref, c_ref = _torchao(w, rule)
    dev = _torchao_deviates(w, rule)
    s, c = qw.scales.view(torch.uint8).cpu(), qw.codes.cpu()
    ok = ~dev
    assert torch.equal(s[ok], s_ref[ok]), "E8M0 scale bytes differ from torchao"
    c_blocks, cref_blocks = c.reshape(*dev.shape, 16), c_ref.reshape(*dev.shape, 16)
    assert torch.equal(c_blocks[ok], cref_blocks[ok]), "packed FP4 bytes differ from torchao"
    return qw, dev


@pytest.mark.parametrize("rule", RULES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_bit_exact_with_torchao_random(rule, dtype, device):
    w = random_weight(48, 256, dtype, seed=11)
    _, dev = _assert_bit_exact(w, rule, device)
    assert not dev.any()  # ordinary weights: no block in a deviation region


@pytest.mark.parametrize("rule", RULES)
def test_bit_exact_with_torchao_tiny_and_huge_magnitudes(rule, device):
    # rows from 2^-120 to 2^120 (and float32's top), every block a random normal sample
    exps = torch.tensor([-120, -100, -60, -20, 0, 20, 60, 100, 120, 124])
    w = random_weight(len(exps), 128, seed=12, spread=False) * torch.exp2(exps.double()).unsqueeze(1).float()
    # near float32 max (below the RCEIL decode-overflow limit, tested on its own)
    w[-1, :32] = torch.finfo(torch.float32).max * 0.85 * torch.linspace(-1, 1, 32)
    assert torch.isfinite(w).all()
    _assert_bit_exact(w, rule, device)


@pytest.mark.parametrize("rule", RULES)
def test_exact_ties_saturation_and_e2m1_subnormals(rule, device):
    # Block max 4.0 -> scale 1 for both rules (FLOOR: 2^(2-2); RCEIL: ceil(log2(4/6)) = 0).
    ties = [0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, 0.5]  # 0.5 is the E2M1 subnormal code 1
    row = torch.tensor((ties + [-t for t in ties]) * 2, dtype=torch.float32)
    row[0] = 4.0
    # FLOOR saturation: block max 7.5 -> X = 2^(floor(log2 7.5) - 2) = 1, 7.5 and 6.9 clip to 6
    sat = torch.linspace(-7.5, 7.5, 32)
    # values whose quotient V/X is a float32 subnormal (block max 2^100 next to 2^-60)
    sub = torch.full((32,), 2.0**-60)
    sub[0] = 2.0**100
    w = torch.stack([row, sat, sub])
    qw, _ = _assert_bit_exact(w, rule, device)
    codes = unpack_fp4(qw.codes.cpu())
    if rule == "floor":
        assert qw.scales.view(torch.uint8)[0, 0].item() == 127
        assert codes[0, 1:8].tolist() == [2, 2, 4, 4, 6, 6, 1]  # 0.75..5.0 ties to even; 0.5 exact
        assert codes[1, 0].item() == 15 and codes[1, 31].item() == 7  # -7.5 -> -6, 7.5 -> 6
    assert (codes[2, 1:] == 0).all()  # 2^-160 after scaling rounds to +0


@pytest.mark.parametrize("rule", RULES)
def test_all_zero_blocks(rule, device):
    w = random_weight(4, 96, seed=13)
    w[1] = 0.0
    w[2, 32:64] = 0.0
    w[3, :32] = -0.0
    qw, _ = _assert_bit_exact(w, rule, device)
    assert (qw.scales.view(torch.uint8)[1] == 0).all()  # smallest E8M0 scale, 2^-127
    deq = qw.dequantize().cpu()
    assert (deq[1] == 0).all() and (deq[2, 32:64] == 0).all() and (deq[3, :32] == 0).all()


@pytest.mark.parametrize("rule", RULES)
@pytest.mark.parametrize("k", [1, 17, 33, 100])
def test_k_not_a_multiple_of_the_block_is_zero_padded(rule, k, device):
    w = random_weight(5, k, seed=14 + k)
    qw, _ = _assert_bit_exact(w, rule, device)
    kp = -(-k // 32) * 32
    assert qw.codes.shape == (5, kp // 2) and qw.scales.shape == (5, kp // 32)
    assert (unpack_fp4(qw.codes.cpu())[:, k:] == 0).all()
    deq = qw.dequantize()
    assert deq.shape == (5, k)
    # the padded result is the unpadded prefix of quantizing the zero-padded matrix
    full = quantize(F.pad(w, (0, kp - k)).to(device), "mxfp4", scale_rule=rule)
    assert torch.equal(full.codes, qw.codes) and torch.equal(full.dequantize()[:, :k], deq)


@pytest.mark.parametrize("rule", RULES)
def test_matches_float64_spec_reference_including_tiny_blocks(rule, device):
    """Scale codes and element codes against the spec computed in float64, where torchao deviates too."""
    exps = [-149, -140, -130, -126, -124, -110, -10, 0, 10, 120]
    rows = []
    for i, e in enumerate(exps):
        r = random_weight(1, 64, seed=30 + i, spread=False).double() * 2.0**e
        rows.append(r.float())
    w = torch.cat(rows)
    w[0, 0] = 2.0**-149  # the smallest float32 subnormal
    qw = quantize(w.to(device), "mxfp4", scale_rule=rule)
    s = qw.scales.view(torch.uint8).cpu()
    codes = unpack_fp4(qw.codes.cpu())
    for i in range(w.shape[0]):
        for b in range(2):
            blk = w[i, 32 * b : 32 * b + 32].double().tolist()
            amax = max(abs(v) for v in blk)
            if rule == "floor":
                sc = mx_floor_ref_scale_code(amax)
            else:
                d = float(torch.tensor(amax, dtype=torch.float32) / 6.0)
                sc = mx_rceil_ref_scale_code(d)
            assert s[i, b].item() == sc, (i, b, amax)
            x = 2.0 ** (sc - 127)
            ref = [e2m1_ref_code(v / x) for v in blk]  # V / X exact in float64
            assert codes[i, 32 * b : 32 * b + 32].tolist() == ref, (i, b)
    # and the decode is code * 2^(scale - 127), exactly
    deq = qw.dequantize().cpu().double()
    assert torch.isfinite(deq).all()


def test_tiny_block_decodes_correctly_where_torchao_is_off_by_two():
    """FLOOR, block max 1.5 * 2^-126: X = 2^-127 (clamped); we divide by 2^-127 so V ~ deq."""
    w = torch.zeros(1, 32)
    w[0, 0] = 1.5 * 2.0**-126
    w[0, 1] = 2.0**-127
    qw = quantize(w, "mxfp4")
    assert qw.scales.view(torch.uint8)[0, 0].item() == 0
    deq = qw.dequantize()
    assert deq[0, 0].item() == 1.5 * 2.0**-126 and deq[0, 1].item() == 2.0**-127


def test_rceil_round_up_is_exact_above_two_to_the_four():
    """d = 2^100 * (1 + 2^-23): the hardware rounds up to 2^101; float32 log2 would give 100."""
    d = 2.0**100 * (1 + 2.0**-23)
    w = torch.zeros(1, 32)
    w[0, 0] = float(torch.tensor(d * 6.0, dtype=torch.float32))
    qw = quantize(w, "mxfp4", scale_rule="rceil")
    amax = w.abs().max()
    dd = float(amax / 6.0)
    assert qw.scales.view(torch.uint8)[0, 0].item() == mx_rceil_ref_scale_code(dd)
    assert 2.0 ** (qw.scales.view(torch.uint8)[0, 0].item() - 127) >= dd


def test_rceil_never_saturates_and_floor_may():
    w = torch.zeros(1, 32)
    w[0, 0] = 7.0  # FLOOR: X = 1, 7 clips to 6; RCEIL: X = 2, 7/2 = 3.5 -> 4 (tie to even) = 8
    assert quantize(w, "mxfp4").dequantize()[0, 0].item() == 6.0
    assert quantize(w, "mxfp4", scale_rule="rceil").dequantize()[0, 0].item() == 8.0


def test_e8m0_decode_is_exact_for_every_code(device):
    codes = torch.arange(256, dtype=torch.uint8, device=device)
    vals = e8m0_to_float32(codes).cpu().double()
    assert math.isnan(vals[255].item())
    assert vals[:255].tolist() == [2.0 ** (c - 127) for c in range(255)]


@pytest.mark.parametrize("rule", RULES)
def test_dequantize_matches_torchao_to_dtype(rule):
    _, mx_tensor, _ = torchao_mx()
    w = random_weight(16, 128, torch.bfloat16, seed=15)
    qw = quantize(w, "mxfp4", scale_rule=rule)
    s_ref, c_ref = _torchao(w, rule)
    for dt in (torch.float32, torch.bfloat16):
        ref = mx_tensor.to_dtype(c_ref, s_ref.view(torch.float8_e8m0fnu), torch.float4_e2m1fn_x2, 32, dt)
        assert torch.equal(qw.dequantize(dt), ref)


def test_rceil_refuses_weights_that_would_decode_to_inf():
    from vbhal.errors import QuantizationError
    from vbhal.formats.mx import RCEIL_DECODE_OVERFLOW

    w = torch.zeros(1, 32)
    w[0, 0] = RCEIL_DECODE_OVERFLOW  # X = 2^126, 3.5 ties up to 4 -> 2^128 = inf in float32
    with pytest.raises(QuantizationError, match="beyond float32"):
        quantize(w, "mxfp4", scale_rule="rceil")
    ok = quantize(w, "mxfp4")  # FLOOR: X = 2^125, saturates to 6 * 2^125, finite
    assert torch.isfinite(ok.dequantize()).all()
    w[0, 0] = float(torch.nextafter(torch.tensor(RCEIL_DECODE_OVERFLOW), torch.tensor(0.0)))
    assert torch.isfinite(quantize(w, "mxfp4", scale_rule="rceil").dequantize()).all()
