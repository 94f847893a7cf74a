"""HostPool: power-of-two chunks, first-fit reuse, pinned fallback reported."""

from __future__ import annotations

import warnings

import pytest
import torch

from vbhal.errors import TierError
from vbhal.tiers import HostPool, TierWarning


def test_alloc_free_reuse_and_alignment():
    pool = HostPool(pin=False, chunk_bytes=1 << 16)
    a = pool.alloc((100,), torch.float32)
    b = pool.alloc((7, 3), torch.bfloat16)
    assert a.tensor.shape == (100,) and b.tensor.shape == (7, 3) and b.tensor.dtype == torch.bfloat16
    assert a.offset % 512 == 0 and b.offset % 512 == 0 and a.offset != b.offset
    a.tensor.fill_(1.0)
    b.tensor.fill_(2.0)
    assert a.tensor.sum() == 100  # no overlap
    pool.free(a)
    c = pool.alloc((50,), torch.float32)
    assert c.offset == a.offset  # first fit reuses the freed run
    pool.free(b)
    pool.free(c)
    assert pool.used_bytes == 0 and pool.reserved_bytes == 1 << 16
    assert pool._chunks[0].free == [(0, 1 << 16)]  # runs merged back into one


def test_big_request_gets_its_own_power_of_two_chunk():
    pool = HostPool(pin=False, chunk_bytes=1 << 12)
    blk = pool.alloc(5000, torch.uint8)
    assert pool.reserved_bytes == 8192  # next power of two, never a hidden rounding
    assert blk.tensor.numel() == 5000


def test_limit_is_a_clear_error():
    pool = HostPool(pin=False, chunk_bytes=1 << 12, limit_bytes=1 << 12)
    pool.alloc(4000, torch.uint8)
    with pytest.raises(TierError, match="limit"):
        pool.alloc(4000, torch.uint8)


def test_chunk_size_must_be_power_of_two():
    with pytest.raises(TierError, match="power of two"):
        HostPool(pin=False, chunk_bytes=3000)


def test_pinning_failure_falls_back_to_pageable_and_says_so():
    def refuse(n):
        raise RuntimeError("cudaHostAlloc failed: out of memory (simulated)")

    pool = HostPool(pin=True, chunk_bytes=1 << 12, pin_fn=refuse)
    with pytest.warns(TierWarning, match="pageable"):
        blk = pool.alloc(100, torch.float32)
    assert not blk.pinned and pool.pinned_bytes == 0 and pool.pageable_bytes == 1 << 12
    assert "simulated" in pool.fallback_reason and "pinning failed" in pool.describe()
    blk.tensor.fill_(3.0)
    assert blk.tensor.sum() == 300
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        pool.alloc(2000, torch.float32)  # no second warning, no second pin attempt


def test_pinned_bytes_counted_exactly():
    calls = []

    def fake_pin(n):
        calls.append(n)
        return torch.empty(n, dtype=torch.uint8)  # stands in for page-locked memory on CPU-only torch

    pool = HostPool(pin=True, chunk_bytes=1 << 12, pin_fn=fake_pin)
    pool.alloc(100, torch.float32)
    pool.alloc(3000, torch.uint8)
    assert calls == [4096] and pool.pinned_bytes == 4096  # 400 + 3000 (aligned) share one chunk


@pytest.mark.skipif(not torch.cuda.is_available(), reason="real pinned memory needs an accelerator")
def test_real_pinned_chunk():
    pool = HostPool(pin=True, chunk_bytes=1 << 20)
    blk = pool.alloc(1000, torch.float32)
    assert blk.pinned and blk.tensor.is_pinned()
