"""Run the NPU conformance checks (vbhal/conformance/test_npu.py) on CPU against the stand-in torch_npu.

This only shows that the checks themselves run and pass when the op behaves as documented: the suite
is meant for a real Ascend chip (``vbhal conformance --device npu --report npu.md``).
"""

from __future__ import annotations

import types

import pytest
import torch

from vbhal.backends.npu import attention as npa
from vbhal.backends.npu import fp4 as nfp4
from vbhal.conformance import test_npu as conf

KERNELS = {**npa.KERNELS, **nfp4.KERNELS}


def _device(chip="A2"):
    return types.SimpleNamespace(kind="npu", device=torch.device("cpu"), capabilities={"chip": chip})


@pytest.fixture
def recorded():
    rows = []
    yield rows, lambda kernel, check, measured, tol, passed: rows.append((kernel, check, measured, tol, passed))
    assert rows and all(r[4] for r in rows), rows


def kernel(name):
    return KERNELS[name]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_carrier_check(fake_npu, recorded, dtype):
    conf.test_npu_int8_carrier_is_exact_on_the_chip(_device(), recorded[1], dtype)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_fp4_linear_check(fake_npu, recorded, dtype):
    conf.test_npu_fp4_linear_path_and_accuracy(_device(), kernel, recorded[1], dtype, 17)
    assert "path=carrier" in recorded[0][0][1]
    assert len(fake_npu.calls_of("npu_weight_quant_batchmatmul")) == 1


@pytest.mark.parametrize("case", [c for c in conf.ATTN_TRAPS if c[4] < 1000], ids=lambda c: c[0])
def test_attention_trap_checks(fake_npu, recorded, case):
    conf.test_npu_attention_traps(_device(), kernel, recorded[1], case)
    assert len(fake_npu.calls_of("npu_fusion_attention")) == 2  # fp16 and bf16, both through the op


def test_fully_masked_and_packed_and_report(fake_npu, recorded, monkeypatch):
    monkeypatch.setattr(conf, "PACKED_LENGTHS", [1, 30, 7, 64, 3])  # small on CPU
    conf.test_npu_fully_masked_row_takes_the_reference(_device(), kernel, recorded[1])
    conf.test_npu_packed_many_documents(_device(), kernel, recorded[1], True)
    conf.test_npu_zz_fallbacks_of_this_run(_device(), recorded[1])
    assert any("every key" in r[1] for r in recorded[0])


def test_native_check_on_950(fake_npu, recorded):
    fake_npu.set_chip("Ascend950PR")
    conf.test_npu_native_fp4_on_950(_device("950"), kernel, recorded[1])
    assert fake_npu.calls_of("npu_weight_quant_batchmatmul")[0]["weight_dtype"] is not None


def test_checks_skip_on_other_devices():
    with pytest.raises(pytest.skip.Exception):
        conf.npu_device.__wrapped__(types.SimpleNamespace(kind="cuda"))
