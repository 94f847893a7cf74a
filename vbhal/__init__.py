"""vbhal — Blackwell-class features (FP4 weights, flash attention, a GPU -> host -> disk memory hierarchy)
on the accelerator you have, behind one call::

    import vbhal
    model = vbhal.optimize(model)                  # auto-detects CUDA / Ascend NPU / CPU / plug-in devices
    model = vbhal.optimize(model, mode="memory", device="cuda:1")
    vbhal.print_stats(model)

``import vbhal`` initialises no device and imports no vendor package: everything below is loaded on
first use.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

# public name -> module that defines it
_EXPORTS = {
    "optimize": "vbhal.optimize",
    "stats": "vbhal.optimize",
    "print_stats": "vbhal.optimize",
    "enable": "vbhal._autopatch",
    "disable": "vbhal._autopatch",
    "is_enabled": "vbhal._autopatch",
    "get_config": "vbhal._autopatch",
    "autopatch": "vbhal._autopatch",
    "detect": "vbhal.hal",
    "select_device": "vbhal.hal",
    "get_kernel": "vbhal.hal",
    "register_plugin": "vbhal.hal",
    "OptimizeConfig": "vbhal.config",
    "hookimpl": "vbhal.hookspecs",
    "DeviceInfo": "vbhal.hookspecs",
    "Kernel": "vbhal.hookspecs",
    "TierSpec": "vbhal.hookspecs",
    "estimate": "vbhal.estimate",
    "plan": "vbhal.estimate",
}

__all__ = sorted(_EXPORTS) + ["__version__"]

if TYPE_CHECKING:  # pragma: no cover
    from vbhal._autopatch import autopatch, disable, enable, get_config, is_enabled
    from vbhal.config import OptimizeConfig
    from vbhal.estimate import estimate, plan
    from vbhal.hal import detect, get_kernel, register_plugin, select_device
    from vbhal.hookspecs import DeviceInfo, Kernel, TierSpec, hookimpl
    from vbhal.optimize import optimize, print_stats, stats


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'vbhal' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    if name == "optimize" and not callable(value):  # pragma: no cover - defensive
        raise AttributeError(name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return __all__


# `optimize` and `estimate` are both modules and the functions users call. Importing the functions here binds
# the package attributes to the functions for good (a later `import vbhal.optimize` finds the module in
# sys.modules and does not rebind the attribute). These imports load torch and pluggy only: no device is
# touched and no vendor package is imported.
from vbhal.optimize import optimize, print_stats, stats  # noqa: E402

from vbhal.estimate import estimate, plan  # noqa: E402


def _enable_from_environment() -> None:
    """VBHAL_ENABLE=1 (or the legacy ENABLE_VIRTUAL_BLACKWELL=1) turns global enabling on at import."""
    from vbhal.config import env_enabled

    if env_enabled():
        from vbhal._autopatch import enable

        enable()


_enable_from_environment()
