"""Modules that ``vbhal.optimize`` swaps in. Exports are lazy so importing one module never imports the rest."""

_EXPORTS = {
    "FP4Linear": "vbhal.nn.fp4_linear",
    "swap_linears": "vbhal.nn.fp4_linear",
}


def __getattr__(name):
    mod = _EXPORTS.get(name)
    if mod is None:
        raise AttributeError(f"module 'vbhal.nn' has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(mod), name)


__all__ = list(_EXPORTS)
