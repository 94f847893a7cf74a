"""Built-in backends: one pluggy plug-in per device family (cuda, npu, cpu). See vbhal/hookspecs.py.

Each backend keeps its kernels in files beside its ``__init__`` that expose ``KERNELS = {name: callable}``;
:class:`KernelTable` imports them lazily, once, and remembers why a table could not be loaded so that
``vbhal info`` can show the fallback (never silent).
"""

from __future__ import annotations

import importlib
from typing import Callable

from vbhal.hookspecs import Kernel


class KernelTable:
    """Lazily imported ``KERNELS`` dicts of a backend's kernel modules."""

    def __init__(self, backend: str, modules: dict[str, str], descriptions: dict[str, str] | None = None) -> None:
        self.backend = backend
        self.modules = modules  # kernel name -> module path
        self.descriptions = descriptions or {}
        self.unavailable: dict[str, str] = {}  # kernel name -> reason
        self._cache: dict[str, Callable | None] = {}

    def lookup(self, name: str) -> Callable | None:
        if name in self._cache:
            return self._cache[name]
        fn = None
        modname = self.modules.get(name)
        if modname is not None:
            try:
                module = importlib.import_module(modname)
                fn = getattr(module, "KERNELS", {}).get(name)
                if fn is None:
                    self.unavailable[name] = f"{modname} has no KERNELS[{name!r}]"
            except ImportError as e:  # missing optional dependency (triton, torch_npu) or module
                self.unavailable[name] = f"{type(e).__name__}: {e}"
        self._cache[name] = fn
        return fn

    def kernel(self, name: str) -> Kernel | None:
        """The backend's :class:`Kernel` for `name`, or None (the next backend answers)."""
        fn = self.lookup(name)
        return None if fn is None else Kernel(name, fn, self.backend, self.descriptions.get(name, ""))
