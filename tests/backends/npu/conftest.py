"""Fixtures of the NPU contract tests: a stand-in ``torch_npu`` module and ``torch.npu`` namespace.

These tests verify the CALLS vbhal makes to torch_npu (arguments, layouts, mask polarity, fallbacks)
against the documented signatures, with the stand-in computing a CPU reference. They say nothing about
the numbers of a real Ascend NPU, where nothing here has run.
"""

from __future__ import annotations

import sys

import pytest
import torch

from . import fake_torch_npu


@pytest.fixture
def fake_npu(monkeypatch):
    """Install the stand-in; yields a namespace with ``module``, ``calls`` and ``set_chip(name)``."""
    from vbhal.backends.npu import _runtime

    mod = fake_torch_npu.make_module()
    ns = fake_torch_npu.make_torch_npu_namespace()
    monkeypatch.setitem(sys.modules, "torch_npu", mod)
    monkeypatch.setattr(torch, "npu", ns, raising=False)
    fake_torch_npu.reset()
    _runtime.reset()

    class Handle:
        module = mod
        calls = fake_torch_npu.CALLS

        @staticmethod
        def set_chip(name: str) -> None:
            ns.device_name = name
            _runtime.reset()

        @staticmethod
        def calls_of(op: str) -> list[dict]:
            return [kw for name, kw in fake_torch_npu.CALLS if name == op]

    yield Handle
    fake_torch_npu.reset()
    _runtime.reset()
