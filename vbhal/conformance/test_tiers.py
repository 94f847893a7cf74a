"""Tier round trips on the device under test: device -> host -> disk -> device keeps every byte."""

from __future__ import annotations

import pytest
import torch

from vbhal.tiers import TierStack

DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.int8, torch.uint8]


@pytest.fixture
def stack(vbhal_device, tmp_path):
    s = TierStack.for_device(vbhal_device.device, device_bytes=8 << 20, host_bytes=8 << 20, disk_bytes=64 << 20,
                             spill_root=tmp_path)
    yield s
    s.close()


def _tensor(dtype, n, seed):
    g = torch.Generator().manual_seed(seed)
    if dtype.is_floating_point:
        return torch.randn(n, generator=g).to(dtype)
    return torch.randint(-128 if dtype == torch.int8 else 0, 128 if dtype == torch.int8 else 256, (n,),
                         generator=g, dtype=dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d)[6:])
def test_round_trip_through_every_level(stack, vbhal_device, record, dtype):
    original = _tensor(dtype, 4099, seed=DTYPES.index(dtype)).reshape(1, 4099)
    stack.register("t", original.to(vbhal_device.device), level=0)
    levels = [stack.level_of("t")]
    for target in range(1, len(stack.tiers)):
        stack.demote("t", target)
        levels.append(stack.level_of("t"))
    back = stack.access("t")
    levels.append(stack.level_of("t"))
    same = back.device.type == vbhal_device.device.type and torch.equal(
        back.cpu().view(torch.uint8), original.view(torch.uint8))
    ok = same and levels == list(range(len(stack.tiers))) + [0]
    record("tiers", f"{str(dtype)[6:]} 0->1->2->0 bytes identical", "identical" if same else "DIFFER",
           "identical", ok)
    assert ok, levels


def test_lru_demotion_under_budget_keeps_everything(stack, vbhal_device, record):
    n = (2 << 20) // 4  # 2 MiB each: 8 of them overflow the 8 MiB device and host budgets
    tensors = {i: _tensor(torch.float32, n, seed=100 + i) for i in range(8)}
    for i, t in tensors.items():
        stack.register(i, t.to(vbhal_device.device))
    for i in range(8):
        stack.access(i)
    lost = [i for i, t in tensors.items() if not torch.equal(stack.access(i).cpu(), t)]
    used0 = stack.used_bytes(0)
    ok = not lost and used0 <= 8 << 20
    record("tiers", "LRU under an 8 MiB device budget, 16 MiB of tensors", f"{len(lost)} lost, level 0 "
           f"{used0 >> 20} MiB", "0 lost", ok)
    assert ok
