"""The probe contract: what a backend reports about its device, and that probing is safe and quick."""

from __future__ import annotations

import time

import torch

from vbhal import hal
from vbhal.hookspecs import DeviceInfo


def test_device_is_reported_with_typed_identity(vbhal_device, record):
    d = vbhal_device
    ok = isinstance(d, DeviceInfo) and d.name.split(":")[0] == d.kind and isinstance(d.device, torch.device)
    record("probe", "typed DeviceInfo (name, kind, torch device)", d.name, "-", ok)
    assert ok, d
    assert d.total_memory is None or d.total_memory > 0
    assert isinstance(d.priority, int)


def test_probe_recorded_no_failure_for_this_backend(vbhal_device, record):
    failures = [f for f in hal.get_hal().failures if f.name == vbhal_device.backend]
    record("probe", "no probe/kernel/tier failure", len(failures), 0, not failures)
    assert not failures, failures


def test_probe_again_is_quick_and_stable(vbhal_device, record):
    h = hal.build_hal()
    t0 = time.perf_counter()
    h.probe()
    took = time.perf_counter() - t0
    names = [d.name for d in h.devices]
    ok = vbhal_device.name in names and took < 5.0
    record("probe", "re-probe finds the device, < 5 s", f"{took:.3f} s", "5 s", ok)
    assert ok, (names, took)


def test_tensors_live_on_the_device(vbhal_device, record):
    x = torch.randn(16, 16, device=vbhal_device.device)
    y = (x @ x).cpu()
    ref = x.cpu().double() @ x.cpu().double()
    err = float((y.double() - ref).norm() / ref.norm())
    record("probe", "device computes a matmul", err, 2e-3, err < 2e-3)
    assert err < 2e-3


def test_memory_tiers_are_ordered_and_sized(vbhal_device, record):
    tiers = hal.get_hal().get_tiers(vbhal_device)
    levels = [t.level for t in tiers]
    ok = bool(tiers) and levels == sorted(levels) and all(t.capacity_bytes >= 0 for t in tiers)
    record("tiers", "tiers reported, ordered by level", ", ".join(t.name for t in tiers), "-", ok)
    assert ok, tiers
