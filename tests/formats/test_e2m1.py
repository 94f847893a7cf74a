"""E2M1 element codec: values, round-to-nearest-even, saturation, signed zero, packing layout."""

from __future__ import annotations

import pytest
import torch
from fp4_refs import E2M1, e2m1_ref_code, torch_bf16_to_fp4x2, torchao_mx

from vbhal.formats.e2m1 import (
    E2M1_BOUNDARIES,
    decode_e2m1,
    decode_packed_fp4,
    encode_e2m1,
    pack_fp4,
    unpack_fp4,
)


def test_decode_table_is_the_spec_table(device):
    codes = torch.arange(16, dtype=torch.uint8, device=device)
    vals = decode_e2m1(codes).cpu().tolist()
    assert vals[:8] == list(E2M1)
    assert vals[8:] == [-v for v in E2M1]
    assert all(torch.signbit(decode_e2m1(codes)[8:].cpu()))  # code 8 is -0.0


def test_every_code_round_trips(device):
    codes = torch.arange(16, dtype=torch.uint8, device=device)
    assert torch.equal(encode_e2m1(decode_e2m1(codes)), codes)


def test_ties_go_to_even_code(device):
    # midpoints between neighbours -> the code whose mantissa bit is 0
    x = torch.tensor([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0], device=device)
    expect = [0, 2, 2, 4, 4, 6, 6]
    assert encode_e2m1(x).cpu().tolist() == expect
    assert encode_e2m1(-x).cpu().tolist() == [c | 8 for c in expect]
    # one float32 ulp either side of each midpoint goes to the nearer code
    up = torch.nextafter(x, torch.full_like(x, 10.0))
    down = torch.nextafter(x, torch.zeros_like(x))
    assert encode_e2m1(up).cpu().tolist() == [1, 2, 3, 4, 5, 6, 7]
    assert encode_e2m1(down).cpu().tolist() == [0, 1, 2, 3, 4, 5, 6]


def test_saturates_to_six(device):
    x = torch.tensor([6.0, 7.0, 1e6, 3.0e38, -9.0], device=device)
    assert encode_e2m1(x).cpu().tolist() == [7, 7, 7, 7, 15]


def test_sign_of_zero_and_tiny_values_is_kept(device):
    x = torch.tensor([0.0, -0.0, 1e-45, -1e-45, -0.2], device=device)
    assert encode_e2m1(x).cpu().tolist() == [0, 8, 0, 8, 8]


def test_matches_float64_reference_on_dense_grid(device):
    # every float32 in [-8, 8] on a fine grid plus the ulp neighbours of each boundary
    grid = torch.linspace(-8, 8, 20001, dtype=torch.float32)
    b = torch.tensor(E2M1_BOUNDARIES, dtype=torch.float32)
    near = torch.cat([b, torch.nextafter(b, b + 1), torch.nextafter(b, b - 1)])
    x = torch.cat([grid, near, -near])
    got = encode_e2m1(x.to(device)).cpu().tolist()
    ref = [e2m1_ref_code(v) for v in x.tolist()]
    assert got == ref


def test_bit_exact_with_torchao_on_random_float32_bit_patterns(device):
    kernels, _, _ = torchao_mx()
    g = torch.Generator().manual_seed(1)
    bits = torch.randint(-(2**31), 2**31 - 1, (200_000,), generator=g, dtype=torch.int64).to(torch.int32)
    x = bits.view(torch.float32)
    x = x[torch.isfinite(x)]
    # and values around the E2M1 range, where the rounding decisions are
    x = torch.cat([x, torch.randn(200_000, generator=g) * 3, torch.rand(50_000, generator=g) * 1e-38])
    assert torch.equal(encode_e2m1(x.to(device)).cpu(), kernels.f32_to_f4_unpacked(x))


def test_encode_rejects_non_float32():
    with pytest.raises(TypeError, match="float32"):
        encode_e2m1(torch.zeros(4, dtype=torch.bfloat16))


def test_pack_puts_element_2i_in_the_low_nibble(device):
    codes = torch.tensor([[1, 2, 3, 15]], dtype=torch.uint8, device=device)
    packed = pack_fp4(codes)
    assert packed.cpu().tolist() == [[0x21, 0xF3]]
    assert torch.equal(unpack_fp4(packed), codes)
    assert decode_packed_fp4(packed).cpu().tolist() == [[0.5, 1.0, 1.5, -6.0]]


def test_pack_unpack_round_trip_random(device):
    g = torch.Generator().manual_seed(2)
    codes = torch.randint(0, 16, (7, 64), generator=g, dtype=torch.uint8).to(device)
    packed = pack_fp4(codes)
    assert packed.shape == (7, 32)
    assert torch.equal(unpack_fp4(packed), codes)
    assert torch.equal(decode_packed_fp4(packed), decode_e2m1(codes))
    with pytest.raises(ValueError, match="even"):
        pack_fp4(codes[:, :3])


def test_packed_bytes_match_torch_float4_e2m1fn_x2():
    """torch's own bf16 -> float4_e2m1fn_x2 helper (its test utilities) gives the same bytes."""
    _bfloat16_to_float4_e2m1fn_x2 = torch_bf16_to_fp4x2()
    g = torch.Generator().manual_seed(3)
    x = (torch.randn(16, 64, generator=g) * 3).to(torch.bfloat16)
    theirs = _bfloat16_to_float4_e2m1fn_x2(x)
    assert theirs.dtype == torch.float4_e2m1fn_x2
    ours = pack_fp4(encode_e2m1(x.float()))
    assert torch.equal(ours, theirs.view(torch.uint8))
    # our bytes are valid float4_e2m1fn_x2 storage: a zero-copy view, one element per byte
    assert ours.view(torch.float4_e2m1fn_x2).shape == ours.shape


def test_float4_e2m1fn_x2_conversion_if_torch_supports_it():
    codes = torch.arange(16, dtype=torch.uint8)
    packed = pack_fp4(codes)
    try:
        # float4_e2m1fn_x2 -> float is not implemented on CPU in torch 2.13 ("copy_kernel")
        vals = packed.view(torch.float4_e2m1fn_x2).to(torch.float32)
    except (RuntimeError, NotImplementedError) as e:
        pytest.skip(f"torch {torch.__version__} cannot convert float4_e2m1fn_x2 here: {e}")
    assert torch.equal(vals.flatten(), decode_e2m1(codes)), "torch decodes float4_e2m1fn_x2 differently"
