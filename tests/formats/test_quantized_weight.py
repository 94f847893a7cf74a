"""QuantizedWeight: layout, dequantize, .to(), state-dict round trip, header checks, bad input."""

from __future__ import annotations

import io

import pytest
import torch
from fp4_refs import random_weight

from vbhal.errors import QuantizationError
from vbhal.formats import FORMATS, QuantizedWeight, dequantize, quantize

FMTS = list(FORMATS)


@pytest.mark.parametrize("fmt", FMTS)
def test_layout_and_nbytes(fmt, device):
    qw = quantize(random_weight(10, 70, torch.bfloat16, device=device, seed=40), fmt)
    b = qw.block_size
    kp = -(-70 // b) * b
    assert qw.codes.dtype == torch.uint8 and qw.codes.shape == (10, kp // 2)
    assert qw.scales.shape == (10, kp // b)
    assert qw.scales.dtype == (torch.float8_e8m0fnu if fmt == "mxfp4" else torch.float8_e4m3fn)
    assert qw.shape == (10, 70) and qw.orig_dtype == torch.bfloat16 and qw.padded_k == kp
    assert (qw.tensor_scale is None) == (fmt == "mxfp4")
    ts_bytes = 0 if fmt == "mxfp4" else 4
    assert qw.nbytes == 10 * kp // 2 + 10 * kp // b + ts_bytes
    assert qw.device.type == torch.device(device).type


@pytest.mark.parametrize("fmt", FMTS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_dequantize_dtypes_and_error(fmt, dtype, device):
    w = random_weight(16, 64, seed=41, device=device)
    qw = quantize(w, fmt)
    d32 = qw.dequantize()
    assert d32.dtype == torch.float32
    assert torch.equal(qw.dequantize(dtype), d32.to(dtype))
    assert torch.equal(dequantize(qw), d32)
    rel = (torch.linalg.vector_norm(w - d32) / torch.linalg.vector_norm(w)).item()
    assert 0.0 < rel < 0.2  # FP4: a real but bounded error on Gaussian weights


@pytest.mark.parametrize("fmt", FMTS)
def test_dequantize_writes_every_element_of_out(fmt, device):
    # more rows than one CPU chunk (256K elements) so chunk boundaries are crossed
    w = random_weight(520, 1000, seed=42, device=device)
    qw = quantize(w, fmt)
    out = torch.full((520, 1000), float("nan"), device=device)
    res = qw.dequantize(out=out)
    assert res is out and not torch.isnan(out).any()
    assert torch.equal(out, quantize(w, fmt).dequantize())
    with pytest.raises(QuantizationError, match="out="):
        qw.dequantize(out=torch.empty(3, 3, device=device))


@pytest.mark.parametrize("fmt", FMTS)
def test_chunked_quantize_equals_rowwise(fmt, device):
    """Row chunking is invisible: quantizing rows one at a time gives the same bytes (mxfp4)."""
    w = random_weight(300, 1000, seed=43, device=device)
    qw = quantize(w, fmt)
    if fmt == "mxfp4":
        rows = [quantize(w[i : i + 1], fmt) for i in range(0, 300, 37)]
        for j, i in enumerate(range(0, 300, 37)):
            assert torch.equal(rows[j].codes, qw.codes[i : i + 1])
            assert torch.equal(rows[j].scales.view(torch.uint8), qw.scales[i : i + 1].view(torch.uint8))
    else:  # nvfp4 rows depend on the tensor scale: pass the same one
        r = quantize(w[5:9], fmt, tensor_scale=qw.tensor_scale)
        assert torch.equal(r.codes, qw.codes[5:9])


def test_non_contiguous_input_is_fine(device):
    w = random_weight(64, 96, seed=44, device=device)
    qw_t = quantize(w.t(), "mxfp4")
    qw_c = quantize(w.t().contiguous(), "mxfp4")
    assert torch.equal(qw_t.codes, qw_c.codes)


def test_float64_input_is_rounded_to_float32_first(device):
    w = random_weight(8, 64, torch.float64, seed=45, device=device)
    assert torch.equal(quantize(w, "mxfp4").codes, quantize(w.float(), "mxfp4").codes)
    with pytest.raises(QuantizationError, match="overflows float32"):
        quantize(torch.full((2, 32), 1e300, dtype=torch.float64, device=device), "mxfp4")


@pytest.mark.parametrize("fmt", FMTS)
def test_state_dict_round_trip_identical_bytes(fmt, device):
    qw = quantize(random_weight(12, 50, torch.bfloat16, seed=46, device=device), fmt, name="l")
    buf = io.BytesIO()
    torch.save(qw.state_dict(), buf)
    buf.seek(0)
    sd = torch.load(buf, weights_only=True, map_location=device)
    back = QuantizedWeight.from_state_dict(sd)
    assert back.fmt == qw.fmt and back.shape == qw.shape and back.orig_dtype == torch.bfloat16
    assert back.scale_rule == qw.scale_rule
    assert torch.equal(back.codes, qw.codes)
    assert torch.equal(back.scales.view(torch.uint8), qw.scales.view(torch.uint8))
    if fmt == "nvfp4":
        assert torch.equal(back.tensor_scale, qw.tensor_scale)
    assert torch.equal(back.dequantize(), qw.dequantize())


def _sd(fmt="mxfp4"):
    return quantize(random_weight(8, 64, seed=47), fmt).state_dict()


@pytest.mark.parametrize(
    "mutate, match",
    [
        (lambda sd: sd.update(codes=sd["codes"][:, :-1]), "codes is torch.uint8"),
        (lambda sd: sd.update(codes=sd["codes"].to(torch.int16)), "codes is torch.int16"),
        (lambda sd: sd.update(scales=sd["scales"].view(torch.uint8)), "scales is torch.uint8"),
        (lambda sd: sd.update(scales=sd["scales"][:-1]), "scales is"),
        (lambda sd: sd["header"].update(shape=[8, 96]), "requires torch.uint8 \\(8, 48\\)"),
        (lambda sd: sd["header"].update(shape=[8, 65]), "codes is"),
        (lambda sd: sd["header"].update(fmt="nvfp4", block_size=16), "codes is|scales is"),
        (lambda sd: sd["header"].update(fmt="int4"), "unknown format"),
        (lambda sd: sd["header"].update(version=99), "version 99"),
        (lambda sd: sd["header"].update(block_size=16), "block size 16"),
        (lambda sd: sd["header"].update(orig_dtype="float7"), "orig_dtype"),
        (lambda sd: sd.update(tensor_scale=torch.tensor(1.0)), "no tensor_scale"),
        (lambda sd: sd.update(extra=torch.zeros(1)), "unexpected keys"),
        (lambda sd: sd.pop("header"), "not a QuantizedWeight state dict"),
    ],
)
def test_loading_a_mismatched_payload_is_an_error(mutate, match):
    sd = _sd()
    sd["header"] = dict(sd["header"])
    mutate(sd)
    with pytest.raises(QuantizationError, match=match):
        QuantizedWeight.from_state_dict(sd)


def test_nvfp4_needs_its_tensor_scale():
    sd = _sd("nvfp4")
    sd.pop("tensor_scale")
    with pytest.raises(QuantizationError, match="tensor_scale"):
        QuantizedWeight.from_state_dict(sd)
    sd = _sd("nvfp4")
    sd["tensor_scale"] = torch.tensor([1.0])
    with pytest.raises(QuantizationError, match="0-dim float32"):
        QuantizedWeight.from_state_dict(sd)


@pytest.mark.parametrize("fmt", FMTS)
def test_to_device_keeps_bytes_and_dtypes(fmt, device):
    qw = quantize(random_weight(4, 32, seed=48), fmt)
    moved = qw.to(device)
    assert moved.device.type == torch.device(device).type
    assert moved.codes.dtype == torch.uint8 and moved.scales.dtype == qw.scales.dtype
    assert torch.equal(moved.codes.cpu(), qw.codes)
    assert torch.equal(moved.dequantize().cpu(), qw.dequantize())
    assert "QuantizedWeight(fmt=" in repr(moved)


# ---- bad input -------------------------------------------------------------------------------------
@pytest.mark.parametrize("fmt", FMTS)
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_nan_or_inf_weight_is_refused_naming_the_layer(fmt, bad, device):
    w = random_weight(4, 32, seed=49, device=device)
    w[2, 3] = bad
    with pytest.raises(QuantizationError, match="'blocks.3.mlp.up'.*(NaN|Inf)"):
        quantize(w, fmt, name="blocks.3.mlp.up")
    with pytest.raises(QuantizationError, match="NaN"):
        quantize(w, fmt)


@pytest.mark.parametrize(
    "w, match",
    [
        (torch.zeros(2, 3, 32), "2-D"),
        (torch.zeros(32), "2-D"),
        (torch.zeros(4, 32, dtype=torch.int32), "dtype torch.int32"),
        (torch.zeros(4, 32, dtype=torch.uint8), "dtype torch.uint8"),
        (torch.zeros(4, 32, device="meta"), "meta device"),
        (torch.zeros(0, 32), "nothing to quantize"),
        ([[1.0, 2.0]], "torch.Tensor"),
    ],
)
def test_bad_weights_get_clear_errors(w, match):
    with pytest.raises(QuantizationError, match=match):
        quantize(w, "mxfp4", name="x")


def test_bad_options_get_clear_errors():
    w = random_weight(2, 32, seed=50)
    with pytest.raises(QuantizationError, match="unknown FP4 format"):
        quantize(w, "fp4")
    with pytest.raises(QuantizationError, match="unknown scale rule"):
        quantize(w, "mxfp4", scale_rule="even")
    with pytest.raises(QuantizationError, match="mxfp4 only"):
        quantize(w, "nvfp4", scale_rule="rceil")
    with pytest.raises(QuantizationError, match="nvfp4 only"):
        quantize(w, "mxfp4", tensor_scale=torch.tensor(1.0))
    assert isinstance(QuantizationError("x"), ValueError)


def test_to_a_dtype_and_non_contiguous_payloads_are_refused():
    qw = quantize(random_weight(4, 64, seed=51), "mxfp4")
    with pytest.raises(QuantizationError, match="dequantize\\(dtype\\)"):
        qw.to(torch.bfloat16)
    codes_t = qw.codes.t().contiguous().t()  # same values, column-major
    with pytest.raises(QuantizationError, match="contiguous"):
        QuantizedWeight(codes_t, qw.scales, None, "mxfp4", qw.shape)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device to compare with CPU")
@pytest.mark.parametrize("fmt, rule", [("mxfp4", "floor"), ("mxfp4", "rceil"), ("nvfp4", "floor")])
def test_cuda_bytes_equal_cpu_bytes(fmt, rule):
    """Device-independent codecs: no division takes CUDA's multiply-by-reciprocal scalar path."""
    for seed, (n, k) in enumerate([(512, 4096), (300, 1000), (64, 16384)]):
        w = random_weight(n, k, torch.bfloat16, seed=70 + seed)
        a, b = quantize(w, fmt, scale_rule=rule), quantize(w.cuda(), fmt, scale_rule=rule)
        assert torch.equal(a.codes, b.codes.cpu())
        assert torch.equal(a.scales.view(torch.uint8), b.scales.view(torch.uint8).cpu())
        if fmt == "nvfp4":
            assert torch.equal(a.tensor_scale, b.tensor_scale.cpu())
        assert torch.equal(a.dequantize(torch.bfloat16), b.dequantize(torch.bfloat16).cpu())
