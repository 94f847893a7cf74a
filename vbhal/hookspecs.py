"""The vbhal hardware-abstraction contract: the one page a backend author reads.

A backend is a pluggy plug-in: any object (a class instance or a module) whose methods carry
``@vbhal.hookimpl`` and are named like the specifications below. Built-in backends live in
``vbhal/backends/{cuda,npu,cpu}``; third-party ones register under the entry-point group ``vbhal``::

    # pyproject.toml of your package
    [project.entry-points.vbhal]
    mydevice = "vbhal_mydevice:plugin"

Three families of hooks, deliberately few:

* **device probe** — :func:`vbhal_probe`: report the devices you can drive (or why there are none).
* **kernels** — :func:`vbhal_get_kernel`: return an implementation of a named kernel for a device, or ``None``.
  Kernel names and their reference semantics (``quantize_fp4``, ``dequantize_fp4``, ``fp4_linear``,
  ``attention``) are listed in :data:`KERNEL_NAMES`. The CPU backend answers every name for every device
  (``trylast``), so a new backend can start with zero kernels and grow.
* **memory tiers** — :func:`vbhal_memory_tiers`: the tiers you can provide for a device (device memory,
  pinned host memory, disk), with capacity and asynchronous copy primitives.

Rules every implementation follows:

* A probe never raises, never takes long, and imports heavy optional dependencies (triton, torch_npu)
  lazily inside the function. Probe hardware, not installed packages: "package installed" is not
  "device present". When there is no device, call ``registry.absent(kind, reason)`` so ``vbhal info``
  can say why. (vbhal also guards every call: a probe that raises is skipped and reported.)
* Kernels are resolved once, when ``optimize`` runs, and bound into modules; the hot path never calls
  pluggy. A kernel must match its reference (``vbhal/formats`` for the FP4 codecs, bit for bit; plain
  torch for matmul and attention, within a tolerance per dtype), gradients included — the conformance
  suite (``vbhal conformance --device X``) checks exactly that.
* Device identities are typed: :class:`DeviceInfo` (and ``torch.device``), never bare ints.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Protocol

import pluggy
import torch

PROJECT_NAME = "vbhal"
hookspec = pluggy.HookspecMarker(PROJECT_NAME)
hookimpl = pluggy.HookimplMarker(PROJECT_NAME)

#: Kernel names of the contract, with their reference semantics.
KERNEL_NAMES: dict[str, str] = {
    "quantize_fp4": "quantize_fp4(w[N, K], fmt, *, scale_rule='floor') -> QuantizedWeight; bit-exact with "
    "vbhal.formats.quantize",
    "dequantize_fp4": "dequantize_fp4(qw, dtype=float32) -> Tensor[N, K]; bit-exact with QuantizedWeight.dequantize",
    "fp4_linear": "fp4_linear(x[..., K], qw, bias) -> Tensor[..., N] = F.linear(x, dequantize_fp4(qw, x.dtype), bias);"
    " differentiable in x and bias",
    "attention": "attention(q, k, v, *, causal=False, scale=None, attn_mask=None, cu_seqlens=None, max_seqlen=None)"
    " = F.scaled_dot_product_attention(..., enable_gqa=True); (B,H,S,D) or packed (T,H,D) with cu_seqlens",
}

#: Priorities used to pick a device when none is asked for (higher wins).
PRIORITY_CUDA = 100
PRIORITY_NPU = 90
PRIORITY_PLUGIN_DEFAULT = 50
PRIORITY_CPU = 0


@dataclass(frozen=True)
class DeviceInfo:
    """One device a backend can drive.

    ``name`` is what a user passes as ``device=`` (``"cuda:0"``, ``"npu:1"``, ``"cpu"``, ``"mydev:0"``);
    ``kind`` is the part before the colon. ``torch_device`` is the device tensors are placed on (for a
    plug-in whose device torch does not know, the device where it keeps tensors, e.g. ``cpu``).
    """

    name: str
    kind: str
    backend: str
    index: int = 0
    description: str = ""
    total_memory: int | None = None
    priority: int = PRIORITY_PLUGIN_DEFAULT
    capabilities: dict[str, Any] = field(default_factory=dict, hash=False, compare=False)
    torch_device: torch.device | None = field(default=None, hash=False, compare=False)

    @property
    def device(self) -> torch.device:
        return self.torch_device if self.torch_device is not None else torch.device(self.name)


class DeviceRegistry(Protocol):
    """What :func:`vbhal_probe` receives."""

    def add(self, device: DeviceInfo) -> None:
        """Report a device you can drive."""

    def absent(self, kind: str, reason: str) -> None:
        """Report that there is no device of `kind`, and why (shown by ``vbhal info``)."""


@dataclass(frozen=True)
class Kernel:
    """A kernel implementation as a backend returns it from :func:`vbhal_get_kernel`."""

    name: str
    fn: Callable[..., Any]
    backend: str
    #: One line for ``vbhal info`` and the optimize report ("triton fused dequant-matmul", "torch SDPA").
    description: str = ""

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.fn(*args, **kwargs)


@dataclass(frozen=True)
class TierSpec:
    """A memory tier a backend can provide for a device.

    ``level``: 0 device memory, 1 host memory, 2 disk. ``capacity_bytes`` is what the tier may use
    (after the backend's own reserve). ``pinned`` says host memory is page-locked (fast async copies).
    ``stream_factory``/``event_factory`` make the copy stream and events for asynchronous copies
    (``None`` where copies are synchronous, as on CPU).
    """

    name: str
    level: int
    device: torch.device
    capacity_bytes: int
    backend: str
    kind: str = "device"  # "device" | "host" | "disk"
    pinned: bool = False
    bandwidth_bytes_per_s: float | None = None
    stream_factory: Callable[[], Any] | None = field(default=None, compare=False)
    event_factory: Callable[[], Any] | None = field(default=None, compare=False)
    note: str = ""


class TierRegistry(Protocol):
    def add(self, tier: TierSpec) -> None:
        """Contribute a tier."""


# ----------------------------------------------------------------------------------------------- specifications
@hookspec
def vbhal_probe(registry: DeviceRegistry) -> None:
    """Report the devices this backend can drive.

    Called once per process, on first use (never at ``import vbhal``). Call ``registry.add(DeviceInfo(...))``
    for each device, or ``registry.absent(kind, reason)`` when there is none ("torch_npu not installed",
    "CUDA driver found no GPU"). Must not raise and must not take long; import optional dependencies inside.
    """


@hookspec(firstresult=True)
def vbhal_get_kernel(name: str, device: DeviceInfo) -> Kernel | None:
    """Return an implementation of kernel `name` for `device`, or ``None`` to let the next backend answer.

    `name` is one of :data:`KERNEL_NAMES` (new names may appear: return ``None`` for names you do not know).
    The first non-``None`` answer wins; the CPU backend answers last for every device with the plain-torch
    reference. Return ``None`` for devices that are not yours. Called once per kernel when ``optimize``
    runs; the returned callable is bound into modules and called on the hot path without pluggy.
    """


@hookspec
def vbhal_memory_tiers(device: DeviceInfo, registry: TierRegistry) -> None:
    """Contribute the memory tiers this backend provides for `device` (``registry.add(TierSpec(...))``).

    The device's own memory is level 0 and comes from the device's backend; host and disk tiers may come
    from any backend (the CPU backend provides a RAM tier and a disk tier for every device).
    """
