"""The Ascend NPU backend, through ``torch_npu`` (imported lazily, under guard).

Nothing here has run on Ascend hardware: it is written against torch_npu 2.13's documented API and its
dispatch is tested on CPU against a stand-in module. ``vbhal conformance --device npu`` is how an Ascend
user checks it on real chips.

Probe order (see shared/NPU.md): ``find_spec("torch_npu")`` -> guarded import (ImportError, OSError,
RuntimeError: e.g. ``libhccl.so: cannot open shared object file`` without the CANN toolkit) ->
``torch.npu.is_available()`` and ``device_count() > 0``. A failed ``import torch_npu`` sets
``TORCH_DEVICE_BACKEND_AUTOLOAD=0`` in the environment; we restore the previous value so child processes
are not changed behind the user's back. We never use ``torch_npu.contrib.transfer_to_npu``.
"""

from __future__ import annotations

import importlib
import importlib.util
import os

import torch

from vbhal import _sysinfo
from vbhal.backends import KernelTable
from vbhal.hookspecs import PRIORITY_NPU, DeviceInfo, TierSpec, hookimpl

DEVICE_RESERVE_BYTES = 1 << 30
HOST_TIER_FRACTION = 0.8
#: Chip families by the prefix of torch.npu.get_device_name().
CHIP_FAMILIES = (("Ascend910_93", "A3"), ("Ascend910B", "A2"), ("Ascend950", "950"), ("Ascend310P", "310P"))
_AUTOLOAD_VAR = "TORCH_DEVICE_BACKEND_AUTOLOAD"

_TABLE = KernelTable(
    "npu",
    {
        "quantize_fp4": "vbhal.backends.npu.fp4",
        "dequantize_fp4": "vbhal.backends.npu.fp4",
        "fp4_linear": "vbhal.backends.npu.fp4",
        "attention": "vbhal.backends.npu.attention",
    },
    {
        "quantize_fp4": "reference codec (vbhal.formats) in torch ops on the NPU",
        "dequantize_fp4": "reference codec (vbhal.formats) in torch ops on the NPU",
        "fp4_linear": "npu_weight_quant_batchmatmul on exact int8 carriers, else dequantize-then-matmul",
        "attention": "torch_npu.npu_fusion_attention",
    },
)


def import_torch_npu():
    """Import torch_npu, or return (None, reason). Never raises."""
    if importlib.util.find_spec("torch_npu") is None:
        return None, "torch_npu is not installed (pip install 'vbhal[npu]' on a machine with the Ascend CANN toolkit)"
    before = os.environ.get(_AUTOLOAD_VAR)
    try:
        return importlib.import_module("torch_npu"), ""
    except (ImportError, OSError, RuntimeError) as e:
        if before is None:
            os.environ.pop(_AUTOLOAD_VAR, None)
        else:
            os.environ[_AUTOLOAD_VAR] = before
        hint = ""
        if "libhccl" in str(e) or "libascend" in str(e) or "CANN" in str(e):
            hint = (" — torch-npu is installed but the Ascend runtime (CANN toolkit) is not; install CANN, or"
                    " uninstall torch-npu on machines without an NPU (with torch-npu installed and no runtime,"
                    " `import torch` itself needs TORCH_DEVICE_BACKEND_AUTOLOAD=0)")
        return None, f"import torch_npu failed: {type(e).__name__}: {e}{hint}"


def chip_family(name: str) -> str:
    for prefix, family in CHIP_FAMILIES:
        if name.startswith(prefix):
            return family
    return "unknown"


class NPUBackend:
    name = "npu"
    table = _TABLE

    @hookimpl
    def vbhal_probe(self, registry) -> None:
        torch_npu, reason = import_torch_npu()
        if torch_npu is None:
            registry.absent("npu", reason)
            return
        npu = getattr(torch, "npu", None)
        try:
            count = npu.device_count() if npu is not None and npu.is_available() else 0
        except (RuntimeError, OSError) as e:
            registry.absent("npu", f"torch.npu.is_available() failed: {e}")
            return
        if count == 0:
            registry.absent("npu", "torch_npu imported but reports no NPU device")
            return
        for i in range(count):
            name = str(npu.get_device_name(i))
            try:
                _free, total = npu.mem_get_info(i)
            except (RuntimeError, OSError, AttributeError):
                total = None
            family = chip_family(name)
            registry.add(
                DeviceInfo(
                    name=f"npu:{i}", kind="npu", backend=self.name, index=i,
                    description=f"{name} ({family})", total_memory=total, priority=PRIORITY_NPU,
                    capabilities={"chip": family, "bf16": family != "310P", "fp4_native": family == "950",
                                  "pinned_memory": True},
                    torch_device=torch.device("npu", i),
                )
            )

    @hookimpl
    def vbhal_get_kernel(self, name: str, device: DeviceInfo):
        return self.table.kernel(name) if device.kind == "npu" else None

    @hookimpl
    def vbhal_memory_tiers(self, device: DeviceInfo, registry) -> None:
        if device.kind != "npu":
            return
        npu = torch.npu  # type: ignore[attr-defined]  # present once the probe imported torch_npu
        dev = device.device
        free, _ = npu.mem_get_info(dev.index)
        registry.add(TierSpec(f"{device.name}-memory", 0, dev, max(0, free - DEVICE_RESERVE_BYTES), self.name,
                              kind="device", stream_factory=lambda: npu.Stream(dev),
                              event_factory=lambda: npu.Event()))
        registry.add(TierSpec("host-pinned", 1, torch.device("cpu"),
                              int(_sysinfo.host_memory_available() * HOST_TIER_FRACTION), self.name, kind="host",
                              pinned=True, stream_factory=lambda: npu.Stream(dev), event_factory=lambda: npu.Event()))


plugin = NPUBackend()
