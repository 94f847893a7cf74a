"""What the NPU kernels share: the torch_npu module, the chip of a device, and fallback bookkeeping.

Nothing here imports torch_npu at import time: the kernel modules are imported by the kernel table on
machines without an NPU (and by the CPU tests, which put a stand-in ``torch_npu`` in ``sys.modules``).

Fallbacks are never silent: every time a kernel hands a call to the reference path instead of a
torch_npu op it calls :func:`record_fallback`, which counts the reason (``FALLBACKS``, shown by
:func:`fallback_report`) and logs a warning the first time each reason is seen.
"""

from __future__ import annotations

import collections
import importlib
import logging

import torch

__all__ = ["FALLBACKS", "chip_of", "fallback_report", "record_fallback", "reset", "torch_npu"]

log = logging.getLogger("vbhal.npu")

#: (kernel name, reason) -> number of calls that took the reference path for that reason.
FALLBACKS: collections.Counter = collections.Counter()
_warned: set[tuple[str, str]] = set()
_chips: dict[int, str] = {}


def torch_npu():
    """The imported ``torch_npu`` module (already imported by the probe when an NPU device was chosen)."""
    return importlib.import_module("torch_npu")


def chip_of(device: torch.device) -> str:
    """Chip family ("A2", "A3", "950", "310P" or "unknown") of the NPU that holds ``device``.

    Read once per device index from ``torch.npu.get_device_name`` with the backend's own prefix table
    (``vbhal.backends.npu.chip_family``), so that the probe and the kernels agree on what a chip is.
    """
    from vbhal.backends.npu import chip_family

    npu = getattr(torch, "npu", None)
    if npu is None:
        return "unknown"
    index = device.index if device.index is not None else int(npu.current_device())
    chip = _chips.get(index)
    if chip is None:
        try:
            chip = chip_family(str(npu.get_device_name(index)))
        except (RuntimeError, OSError, AssertionError) as e:  # runtime not started / bad index
            log.warning("vbhal npu: cannot read the chip name of npu:%s (%s); using reference kernels", index, e)
            chip = "unknown"
        _chips[index] = chip
    return chip


def record_fallback(kernel: str, reason: str) -> None:
    """Count a call that takes the reference path instead of a torch_npu op; warn once per reason."""
    key = (kernel, reason)
    FALLBACKS[key] += 1
    if key not in _warned:
        _warned.add(key)
        log.warning("vbhal npu %s: using the reference (plain torch) path: %s", kernel, reason)


def fallback_report() -> list[str]:
    """One line per fallback reason with its call count, for ``vbhal info`` and the conformance report."""
    return [f"{kernel}: {count} call(s) on the reference path: {reason}"
            for (kernel, reason), count in sorted(FALLBACKS.items())]


def reset() -> None:
    """Forget counted fallbacks, issued warnings and cached chip names (tests; a new device set-up)."""
    FALLBACKS.clear()
    _warned.clear()
    _chips.clear()
