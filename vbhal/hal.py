"""The HAL runtime: the pluggy plug-in manager, device probing and selection, kernel and tier resolution.

Nothing here runs at ``import vbhal``: the manager is built, and devices probed, on first use
(:func:`get_hal`). Each third-party entry point and each probe runs under its own guard: a plug-in that
fails is skipped and recorded (``vbhal info`` shows why), unless strict loading is on
(``VBHAL_STRICT_PLUGINS=1``, for CI), which turns the failure into :class:`~vbhal.errors.PluginError`.
"""

from __future__ import annotations

import importlib.metadata
import os
import threading
import traceback
from dataclasses import dataclass, field
from typing import Any

import pluggy
import torch

from vbhal import hookspecs
from vbhal.config import env_flag
from vbhal.errors import DeviceNotFoundError, KernelError, PluginError
from vbhal.hookspecs import DeviceInfo, Kernel, TierSpec

ENTRY_POINT_GROUP = "vbhal"
_BUILTIN_BACKENDS = ("vbhal.backends.cuda", "vbhal.backends.npu", "vbhal.backends.cpu")


@dataclass
class PluginFailure:
    name: str
    stage: str  # "load" | "probe" | "kernel" | "tiers"
    error: str


@dataclass
class Selection:
    """The device that was chosen and why."""

    device: DeviceInfo
    reason: str  # "argument", "environment variable VBHAL_DEVICE", "probe order (highest priority)"


@dataclass
class HAL:
    """The plug-in manager and what probing found. Use :func:`get_hal` rather than building one."""

    pm: pluggy.PluginManager
    devices: list[DeviceInfo] = field(default_factory=list)
    absent: list[tuple[str, str, str]] = field(default_factory=list)  # (backend, kind, reason)
    failures: list[PluginFailure] = field(default_factory=list)
    loaded: list[tuple[str, str]] = field(default_factory=list)  # (plugin name, origin)
    strict: bool = False
    _kernel_cache: dict[tuple[str, str], Kernel] = field(default_factory=dict)

    # ------------------------------------------------------------------------------------------ probing
    def probe(self) -> None:
        self.devices.clear()
        self.absent.clear()
        for impl in reversed(self.pm.hook.vbhal_probe.get_hookimpls()):
            registry = _Registry(impl.plugin_name, self)
            try:
                impl.function(registry=registry)
            except Exception as e:  # a probe must never take vbhal down
                self._fail(impl.plugin_name, "probe", e)
        seen: set[str] = set()
        unique = []
        for d in sorted(self.devices, key=lambda d: (-d.priority, d.kind, d.index)):
            if d.name not in seen:
                seen.add(d.name)
                unique.append(d)
        self.devices[:] = unique

    def _fail(self, name: str, stage: str, exc: BaseException) -> None:
        msg = f"{type(exc).__name__}: {exc}"
        self.failures.append(PluginFailure(name, stage, msg))
        if self.strict:
            raise PluginError(
                f"plug-in {name!r} failed during {stage}: {msg}\n"
                f"(strict plug-in loading is on through VBHAL_STRICT_PLUGINS; unset it to skip the plug-in)\n"
                + "".join(traceback.format_exception(exc))
            ) from exc

    # ------------------------------------------------------------------------------------------ selection
    def select(self, device: str | torch.device | DeviceInfo | None = None) -> Selection:
        """Pick a device: `device` argument, else ``VBHAL_DEVICE``, else the highest-priority device found."""
        if isinstance(device, DeviceInfo):
            return Selection(device, "argument")
        if device is not None:
            return Selection(self.find(str(device), "argument"), "argument")
        env = os.environ.get("VBHAL_DEVICE", "").strip()
        if env and env.lower() != "auto":
            return Selection(self.find(env, "environment variable VBHAL_DEVICE"), "environment variable VBHAL_DEVICE")
        if not self.devices:
            raise DeviceNotFoundError("no backend reported any device (not even the CPU): " + self._found_text())
        best = self.devices[0]
        return Selection(best, f"probe order (highest priority found: {best.kind}, priority {best.priority})")

    def find(self, name: str, source: str = "argument") -> DeviceInfo:
        """The device called `name` ("cuda" means the first CUDA device, "cuda:1" the second)."""
        want = name.strip().lower()
        for d in self.devices:
            if d.name.lower() == want:
                return d
        if ":" not in want:
            for d in self.devices:
                if d.kind.lower() == want:
                    return d
        elif want.endswith(":0"):
            for d in self.devices:
                if d.name.lower() == want[:-2] and d.index == 0:
                    return d
        raise DeviceNotFoundError(
            f"device {name!r} ({source}) was not found. {self._found_text()} "
            f"Pass one of the devices found, or unset VBHAL_DEVICE to pick automatically."
        )

    def _found_text(self) -> str:
        found = ", ".join(f"{d.name} ({d.backend})" for d in self.devices) or "none"
        why = "; ".join(f"{kind}: {reason}" for _, kind, reason in self.absent)
        return f"Devices found: {found}." + (f" Not available: {why}." if why else "")

    # ------------------------------------------------------------------------------------------ kernels
    def get_kernel(self, name: str, device: DeviceInfo) -> Kernel:
        """The implementation of kernel `name` for `device`: the first backend that answers wins.

        Each backend's answer is guarded: a backend that raises is recorded and the next one answers
        (reported by ``vbhal info`` and the optimize report as a fallback, never silent).
        """
        key = (name, device.name)
        if key in self._kernel_cache:
            return self._kernel_cache[key]
        for impl in reversed(self.pm.hook.vbhal_get_kernel.get_hookimpls()):
            try:
                kernel = impl.function(name=name, device=device)
            except Exception as e:
                self._fail(impl.plugin_name, "kernel", e)
                continue
            if kernel is not None:
                if not isinstance(kernel, Kernel):
                    kernel = Kernel(name, kernel, impl.plugin_name)
                self._kernel_cache[key] = kernel
                return kernel
        reasons = []
        for plugin_name, plugin in self.pm.list_name_plugin():
            why = getattr(getattr(plugin, "table", None), "unavailable", {}).get(name)
            if why:
                reasons.append(f"{plugin_name}: {why}")
        raise KernelError(f"no backend provides kernel {name!r} for {device.name}"
                          + (f" ({'; '.join(reasons)})" if reasons else "")
                          + f"; known kernels: {', '.join(hookspecs.KERNEL_NAMES)}")

    # ------------------------------------------------------------------------------------------ tiers
    def get_tiers(self, device: DeviceInfo) -> list[TierSpec]:
        tiers: list[TierSpec] = []
        for impl in reversed(self.pm.hook.vbhal_memory_tiers.get_hookimpls()):
            reg = _TierRegistry()
            try:
                impl.function(device=device, registry=reg)
            except Exception as e:
                self._fail(impl.plugin_name, "tiers", e)
                continue
            tiers.extend(reg.tiers)
        # One tier per (level, kind): the first contributed (the device's own backend answers first) wins.
        chosen: dict[tuple[int, str], TierSpec] = {}
        for t in tiers:
            chosen.setdefault((t.level, t.kind), t)
        return sorted(chosen.values(), key=lambda t: t.level)


class _Registry:
    def __init__(self, backend: str, hal: HAL) -> None:
        self.backend = backend
        self.hal = hal

    def add(self, device: DeviceInfo) -> None:
        if not isinstance(device, DeviceInfo):
            raise TypeError(f"registry.add expects a DeviceInfo, got {type(device).__name__}")
        self.hal.devices.append(device)

    def absent(self, kind: str, reason: str) -> None:
        self.hal.absent.append((self.backend, kind, reason))


class _TierRegistry:
    def __init__(self) -> None:
        self.tiers: list[TierSpec] = []

    def add(self, tier: TierSpec) -> None:
        if not isinstance(tier, TierSpec):
            raise TypeError(f"registry.add expects a TierSpec, got {type(tier).__name__}")
        self.tiers.append(tier)


def build_hal(*, autoload: bool | None = None, strict: bool | None = None, extra_plugins: tuple[Any, ...] = ()) -> HAL:
    """Build a plug-in manager with the built-in backends, entry-point plug-ins and `extra_plugins`, then probe."""
    import importlib

    if autoload is None:
        autoload = not env_flag(("VBHAL_DISABLE_PLUGIN_AUTOLOAD",))
    if strict is None:
        strict = env_flag(("VBHAL_STRICT_PLUGINS",))
    pm = pluggy.PluginManager(hookspecs.PROJECT_NAME)
    pm.add_hookspecs(hookspecs)
    hal = HAL(pm=pm, strict=strict)
    for modname in _BUILTIN_BACKENDS:
        module = importlib.import_module(modname)
        pm.register(module.plugin, name=module.plugin.name)
        hal.loaded.append((module.plugin.name, "built-in"))
    if autoload:
        for ep in _entry_points():
            if pm.has_plugin(ep.name) or pm.is_blocked(ep.name):
                continue
            try:
                plugin = ep.load()
                pm.register(plugin, name=ep.name)
            except Exception as e:  # pluggy's own loader does not guard: we do, per entry point
                hal._fail(ep.name, "load", e)
                continue
            dist = getattr(ep, "dist", None)
            origin = f"entry point {ep.value}" + (f" ({dist.name} {dist.version})" if dist else "")
            hal.loaded.append((ep.name, origin))
    for plugin in extra_plugins:
        name = getattr(plugin, "name", None) or repr(plugin)
        pm.register(plugin, name=name)
        hal.loaded.append((name, "registered in code"))
    hal.probe()
    return hal


def _entry_points() -> list[importlib.metadata.EntryPoint]:
    return sorted(importlib.metadata.entry_points(group=ENTRY_POINT_GROUP), key=lambda ep: ep.name)


_lock = threading.Lock()
_hal: HAL | None = None


def get_hal() -> HAL:
    """The process-wide HAL, built (and devices probed) on first call."""
    global _hal
    with _lock:
        if _hal is None:
            _hal = build_hal()
        return _hal


def reset() -> None:
    """Forget the process-wide HAL (tests, or after installing a plug-in): the next use probes again."""
    global _hal
    with _lock:
        _hal = None


def register_plugin(plugin: Any, name: str | None = None) -> None:
    """Register a backend object in code (no entry point needed) and probe again."""
    hal = get_hal()
    hal.pm.register(plugin, name=name or getattr(plugin, "name", None))
    hal.loaded.append((name or getattr(plugin, "name", repr(plugin)), "registered in code"))
    hal._kernel_cache.clear()
    hal.probe()


def select_device(device: str | torch.device | DeviceInfo | None = None) -> Selection:
    return get_hal().select(device)


def get_kernel(name: str, device: str | DeviceInfo | None = None) -> Kernel:
    hal = get_hal()
    info = device if isinstance(device, DeviceInfo) else hal.select(device).device
    return hal.get_kernel(name, info)


def get_tiers(device: str | DeviceInfo | None = None) -> list[TierSpec]:
    hal = get_hal()
    info = device if isinstance(device, DeviceInfo) else hal.select(device).device
    return hal.get_tiers(info)


def detect() -> list[DeviceInfo]:
    """The devices every backend found, highest priority first."""
    return list(get_hal().devices)
