"""Fixtures for the FP4 format tests (helpers live in fp4_refs.py)."""

from __future__ import annotations

import pytest
from fp4_refs import DEVICES


@pytest.fixture(params=DEVICES)
def device(request) -> str:
    return request.param
