"""The CUDA backend: NVIDIA GPUs through ``torch.cuda``; kernels in Triton (imported lazily).

Probing asks the driver, not the package list: ``torch.cuda.is_available()`` and the device properties.
Kernels come from ``fp4_linear.py`` (fused FP4 dequantize-matmul, GPU quantize) and ``attention_dispatch.py``
(flash attention kernel + the SDPA dispatcher); while a kernel module cannot be imported (no triton, say)
the CPU backend's plain-torch kernels serve on the GPU and ``vbhal info`` says so.

Native FP4 matrix units exist from compute capability 10.0 (Blackwell): the probe reports them as the
``fp4_native`` capability.
"""

from __future__ import annotations

import importlib.util

import torch

from vbhal import _sysinfo
from vbhal.backends import KernelTable
from vbhal.hookspecs import PRIORITY_CUDA, DeviceInfo, TierSpec, hookimpl

#: Device memory the tier stack leaves to the CUDA context, cuBLAS workspaces and fragmentation.
DEVICE_RESERVE_BYTES = 1 << 30
HOST_TIER_FRACTION = 0.8
FP4_NATIVE_MAJOR = 10

_TABLE = KernelTable(
    "cuda",
    {
        "quantize_fp4": "vbhal.backends.cuda.fp4_linear",
        "dequantize_fp4": "vbhal.backends.cuda.fp4_linear",
        "fp4_linear": "vbhal.backends.cuda.fp4_linear",
        "attention": "vbhal.backends.cuda.attention_dispatch",
    },
    {
        "quantize_fp4": "Triton quantize (bit-exact with vbhal.formats)",
        "dequantize_fp4": "Triton dequantize",
        "fp4_linear": "Triton fused FP4 dequantize-matmul (split-K GEMV for small M, tiled GEMM for large M)",
        "attention": "dispatcher: vbhal Triton flash attention or SDPA (cuDNN/flash/mem-efficient) by measured table",
    },
)


class CUDABackend:
    name = "cuda"
    table = _TABLE

    @hookimpl
    def vbhal_probe(self, registry) -> None:
        if not torch.cuda.is_available():
            why = "torch was built without CUDA" if torch.version.cuda is None else "the CUDA driver reports no GPU"
            registry.absent("cuda", why)
            return
        has_triton = importlib.util.find_spec("triton") is not None
        for i in range(torch.cuda.device_count()):
            p = torch.cuda.get_device_properties(i)
            registry.add(
                DeviceInfo(
                    name=f"cuda:{i}",
                    kind="cuda",
                    backend=self.name,
                    index=i,
                    description=f"{p.name} (sm_{p.major}{p.minor}, {p.multi_processor_count} SMs)",
                    total_memory=p.total_memory,
                    priority=PRIORITY_CUDA,
                    capabilities={
                        "compute_capability": (p.major, p.minor),
                        "bf16": p.major >= 8,
                        "fp4_native": p.major >= FP4_NATIVE_MAJOR,
                        "triton": has_triton,
                        "pinned_memory": True,
                        "multiprocessors": p.multi_processor_count,
                    },
                    torch_device=torch.device("cuda", i),
                )
            )

    @hookimpl
    def vbhal_get_kernel(self, name: str, device: DeviceInfo):
        return self.table.kernel(name) if device.kind == "cuda" else None

    @hookimpl
    def vbhal_memory_tiers(self, device: DeviceInfo, registry) -> None:
        if device.kind != "cuda":
            return
        dev = device.device
        free, _total = torch.cuda.mem_get_info(dev)
        registry.add(TierSpec(f"{device.name}-memory", 0, dev, max(0, free - DEVICE_RESERVE_BYTES), self.name,
                              kind="device",
                              stream_factory=lambda: torch.cuda.Stream(dev),
                              event_factory=lambda: torch.cuda.Event()))
        registry.add(TierSpec("host-pinned", 1, torch.device("cpu"),
                              int(_sysinfo.host_memory_available() * HOST_TIER_FRACTION), self.name, kind="host",
                              pinned=True,
                              stream_factory=lambda: torch.cuda.Stream(dev),
                              event_factory=lambda: torch.cuda.Event(),
                              note="page-locked; counted against host RAM and the cgroup limit"))
        # A second GPU's memory, reached over NVLink/PCIe peer copies, sits between device and host.
        for j in range(torch.cuda.device_count()):
            if j != dev.index and torch.cuda.can_device_access_peer(dev.index or 0, j):
                pfree, _ = torch.cuda.mem_get_info(j)
                registry.add(TierSpec(f"cuda:{j}-peer", 1, torch.device("cuda", j),
                                      max(0, pfree - DEVICE_RESERVE_BYTES), self.name, kind="peer",
                                      stream_factory=lambda: torch.cuda.Stream(dev),
                                      event_factory=lambda: torch.cuda.Event()))
                break


plugin = CUDABackend()
