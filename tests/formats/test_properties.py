"""Property tests (hypothesis): round trips are fixed points, decoding is monotone, errors are bounded."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("hypothesis", reason="the property tests need hypothesis (the test extra)")
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from vbhal.errors import QuantizationError
from vbhal.formats import quantize
from vbhal.formats.mx import RCEIL_DECODE_OVERFLOW, e8m0_to_float32

SETTINGS = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])

finite32 = st.floats(width=32, allow_nan=False, allow_infinity=False)
# magnitudes spread over float32's range, including subnormals, exact zeros and E2M1 midpoints
element = st.one_of(
    finite32,
    st.floats(min_value=-8, max_value=8, width=32),
    st.sampled_from([0.0, -0.0, 0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, 6.0, 7.0, -5.0, 1e-45, 2.0**-126]),
)


@st.composite
def weights(draw, max_k=80):
    n = draw(st.integers(1, 3))
    k = draw(st.integers(1, max_k))
    vals = draw(st.lists(element, min_size=n * k, max_size=n * k))
    scale = draw(st.sampled_from([1.0, 2.0**-60, 2.0**40]))
    w = torch.tensor(vals, dtype=torch.float32).reshape(n, k)
    w2 = w * scale
    return w2 if torch.isfinite(w2).all() else w


@SETTINGS
@given(w=weights(), rule=st.sampled_from(["floor", "rceil"]))
def test_mxfp4_round_trip_is_a_fixed_point(w, rule):
    if _rceil_overflows(w, rule):
        return
    d = quantize(w, "mxfp4", scale_rule=rule).dequantize()
    assert torch.isfinite(d).all()
    d2 = quantize(d, "mxfp4", scale_rule=rule).dequantize()
    assert torch.equal(d2, d)


@SETTINGS
@given(w=weights())
def test_nvfp4_round_trip_with_the_same_tensor_scale_is_a_fixed_point(w):
    q = quantize(w, "nvfp4")
    d = q.dequantize()
    assert torch.isfinite(d).all()
    d2 = quantize(d, "nvfp4", tensor_scale=q.tensor_scale).dequantize()
    assert torch.equal(d2, d)


def _rceil_overflows(w: torch.Tensor, rule: str) -> bool:
    return rule == "rceil" and float(w.abs().max()) >= RCEIL_DECODE_OVERFLOW


def _blocks(t: torch.Tensor, b: int) -> torch.Tensor:
    k = t.shape[1]
    return torch.nn.functional.pad(t, (0, -k % b)).reshape(t.shape[0], -1, b)


@SETTINGS
@given(w=weights(), fmt=st.sampled_from(["mxfp4", "nvfp4"]), rule=st.sampled_from(["floor", "rceil"]))
def test_decoding_is_monotone_within_a_block(w, fmt, rule):
    if fmt == "nvfp4":
        rule = "floor"
    if _rceil_overflows(w, rule):
        return
    q = quantize(w, fmt, scale_rule=rule)
    b = q.block_size
    wb, db = _blocks(w, b), _blocks(q.dequantize(), b)
    order = torch.argsort(wb, dim=-1, stable=True)
    sorted_d = torch.gather(db, -1, order)
    assert (sorted_d[..., 1:] >= sorted_d[..., :-1]).all()


@SETTINGS
@given(w=weights(), rule=st.sampled_from(["floor", "rceil"]))
def test_mxfp4_error_is_bounded_by_the_block_scale(w, rule):
    """|V - deq| <= 2X for FLOOR (1X rounding + up to 2X clipping of |V|/X < 8), 1X for RCEIL."""
    if _rceil_overflows(w, rule):
        with pytest.raises(QuantizationError, match="beyond float32"):
            quantize(w, "mxfp4", scale_rule=rule)
        return
    q = quantize(w, "mxfp4", scale_rule=rule)
    x = e8m0_to_float32(q.scales).double().unsqueeze(-1)
    err = (_blocks(w, 32).double() - _blocks(q.dequantize(), 32).double()).abs()
    bound = 2.0 if rule == "floor" else 1.0
    assert (err <= bound * x).all()
