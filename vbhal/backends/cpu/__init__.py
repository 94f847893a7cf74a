"""The CPU backend: plain-torch reference kernels (the "emulated" path), a RAM tier and a disk tier.

It answers every kernel name for every device, last (``trylast``): the reference that every other
backend is checked against, and the fallback while a backend grows its own kernels. Plain torch runs
on any device, so for a CUDA or NPU device these kernels run on that device, just not fused.
"""

from __future__ import annotations

import platform

import psutil
import torch

from vbhal import _sysinfo
from vbhal.backends import KernelTable
from vbhal.hookspecs import PRIORITY_CPU, DeviceInfo, TierSpec, hookimpl

#: Share of available RAM the CPU tiers may use; the rest is left to the process and the OS.
HOST_TIER_FRACTION = 0.8
#: Share of free disk the disk tier may use.
DISK_TIER_FRACTION = 0.9

_TABLE = KernelTable(
    "cpu",
    {
        "quantize_fp4": "vbhal.backends.cpu.fp4",
        "dequantize_fp4": "vbhal.backends.cpu.fp4",
        "fp4_linear": "vbhal.backends.cpu.fp4",
        "attention": "vbhal.backends.cpu.attention",
    },
    {
        "quantize_fp4": "plain torch reference codec (vbhal.formats)",
        "dequantize_fp4": "plain torch reference codec (vbhal.formats)",
        "fp4_linear": "dequantize then matmul (plain torch)",
        "attention": "torch SDPA; blocked O(S) memory for long sequences",
    },
)


class CPUBackend:
    name = "cpu"
    table = _TABLE

    @hookimpl
    def vbhal_probe(self, registry) -> None:
        cores = psutil.cpu_count(logical=False) or psutil.cpu_count() or 1
        registry.add(
            DeviceInfo(
                name="cpu",
                kind="cpu",
                backend=self.name,
                description=f"{platform.processor() or platform.machine()} ({cores} cores, torch threads "
                f"{torch.get_num_threads()})",
                total_memory=_sysinfo.host_memory_total(),
                priority=PRIORITY_CPU,
                capabilities={"bf16": True, "fp4_native": False, "pinned_memory": False},
                torch_device=torch.device("cpu"),
            )
        )

    @hookimpl(trylast=True)
    def vbhal_get_kernel(self, name: str, device: DeviceInfo):
        return self.table.kernel(name)  # every device: plain torch runs anywhere

    @hookimpl(trylast=True)
    def vbhal_memory_tiers(self, device: DeviceInfo, registry) -> None:
        ram = int(_sysinfo.host_memory_available() * HOST_TIER_FRACTION)
        if device.kind == "cpu":
            # On CPU the device *is* host memory: level 0 is a RAM budget, then disk.
            registry.add(TierSpec("cpu-ram", 0, torch.device("cpu"), ram, self.name, kind="device"))
        else:
            # Pageable host memory: the accelerator's backend offers a pinned tier that takes precedence.
            registry.add(TierSpec("host-pageable", 1, torch.device("cpu"), ram, self.name, kind="host",
                                  note="pageable (not pinned): copies are synchronous"))
        disk = int(_sysinfo.disk_free() * DISK_TIER_FRACTION)
        registry.add(TierSpec("disk", 2, torch.device("cpu"), disk, self.name, kind="disk",
                              note=f"spill files under {_sysinfo.spill_root()}"))


plugin = CPUBackend()
