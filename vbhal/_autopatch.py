"""Global enabling: optimize models automatically when they are built or loaded.

* HuggingFace: ``PreTrainedModel.from_pretrained`` (optimize the loaded model, after its weights are in) and
  ``PreTrainedModel.post_init`` (a model built from a config: optimize at the end of the outermost
  construction; nested ``PreTrainedModel``s built inside it are left to the outer one). Both are public
  methods; the originals are restored by :func:`disable`.
* Any class registered with :func:`autopatch` (or listed in the config's ``autopatch``): its ``__init__`` is
  wrapped so that the outermost construction ends with ``optimize(self)``.

Everything is undone by :func:`disable`; patching twice patches once.
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import logging
import threading
from typing import Any

import torch.nn as nn

from vbhal.config import OptimizeConfig, resolve_config
from vbhal.errors import ConfigError

log = logging.getLogger("vbhal")

_state = threading.local()
_enabled_config: OptimizeConfig | None = None
_patches: list[tuple[Any, str, Any]] = []  # (owner, attribute, original)
_patched_classes: set[type] = set()
_MISSING = object()  # the class had no __init__ of its own: restoring means deleting ours


def _depth() -> int:
    return getattr(_state, "depth", 0)


def _auto_optimize(model: nn.Module) -> None:
    from vbhal.optimize import optimize

    if _enabled_config is None:
        return
    optimize(model, config=_enabled_config)


def _patch(owner: Any, attr: str, new: Any) -> None:
    _patches.append((owner, attr, owner.__dict__[attr]))
    setattr(owner, attr, new)


def _patch_class_init(cls: type) -> None:
    if cls in _patched_classes:
        return
    original = cls.__init__

    @functools.wraps(original)
    def __init__(self, *args, **kwargs):
        _state.depth = _depth() + 1
        try:
            original(self, *args, **kwargs)
        finally:
            _state.depth = _depth() - 1
        if _depth() == 0 and getattr(_state, "loading", 0) == 0:
            _auto_optimize(self)

    _patches.append((cls, "__init__", cls.__dict__.get("__init__", _MISSING)))
    cls.__init__ = __init__  # type: ignore[misc]
    _patched_classes.add(cls)


def _patch_transformers() -> bool:
    if importlib.util.find_spec("transformers") is None:
        return False
    from transformers import PreTrainedModel

    if any(owner is PreTrainedModel for owner, _, _ in _patches):
        return True
    orig_from_pretrained = PreTrainedModel.__dict__["from_pretrained"].__func__
    orig_post_init = PreTrainedModel.__dict__["post_init"]

    @classmethod  # type: ignore[misc]
    @functools.wraps(orig_from_pretrained)
    def from_pretrained(cls, *args, **kwargs):
        _state.loading = getattr(_state, "loading", 0) + 1
        try:
            model = orig_from_pretrained(cls, *args, **kwargs)
        finally:
            _state.loading -= 1
        if getattr(_state, "loading", 0) == 0 and isinstance(model, nn.Module):
            _auto_optimize(model)
        return model

    @functools.wraps(orig_post_init)
    def post_init(self, *args, **kwargs):
        result = orig_post_init(self, *args, **kwargs)
        if getattr(_state, "loading", 0) == 0 and _depth() == 0 and _is_outermost_pretrained(self):
            _auto_optimize(self)
        return result

    _patch(PreTrainedModel, "from_pretrained", from_pretrained)
    _patch(PreTrainedModel, "post_init", post_init)
    return True


def _is_outermost_pretrained(model: nn.Module) -> bool:
    """True unless another PreTrainedModel is still inside its own __init__ further up the stack."""
    import inspect

    from transformers import PreTrainedModel

    frame = inspect.currentframe()
    try:
        f = frame.f_back if frame else None
        while f is not None:
            if f.f_code.co_name == "__init__":
                other = f.f_locals.get("self")
                if other is not model and isinstance(other, PreTrainedModel):
                    return False
            f = f.f_back
    finally:
        del frame
    return True


def _import_class(path: str) -> type:
    module_name, _, attr = path.rpartition(".")
    if not module_name:
        raise ConfigError(f"autopatch: {path!r} is not a dotted path like 'mypackage.models.MyModel'")
    try:
        cls = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as e:
        raise ConfigError(f"autopatch: cannot import {path!r}: {e}") from None
    if not (isinstance(cls, type) and issubclass(cls, nn.Module)):
        raise ConfigError(f"autopatch: {path!r} is not a torch.nn.Module subclass")
    return cls


def enable(mode: str | None = None, **overrides: Any) -> OptimizeConfig:
    """Turn vbhal on globally: models built or loaded from now on are optimized automatically.

    Example::

        import vbhal
        vbhal.enable(mode="speed")
        model = AutoModelForCausalLM.from_pretrained(path)   # comes back optimized
    """
    global _enabled_config
    cfg = resolve_config(mode, overrides=overrides)
    disable()
    _enabled_config = cfg
    if cfg.autopatch_hf:
        _patch_transformers()
    for path in cfg.autopatch:
        _patch_class_init(_import_class(path))
    for cls in list(_registered):
        _patch_class_init(cls)
    return cfg


_registered: list[type] = []


def autopatch(cls: type) -> type:
    """Register a model class to be optimized at construction while vbhal is enabled (usable as a decorator)."""
    if not (isinstance(cls, type) and issubclass(cls, nn.Module)):
        raise TypeError(f"vbhal.autopatch expects an nn.Module subclass, got {cls!r}")
    if cls not in _registered:
        _registered.append(cls)
    if _enabled_config is not None:
        _patch_class_init(cls)
    return cls


def disable() -> None:
    """Turn global enabling off and restore every patched method."""
    global _enabled_config
    _enabled_config = None
    while _patches:
        owner, attr, original = _patches.pop()
        if original is _MISSING:
            delattr(owner, attr)
        else:
            setattr(owner, attr, original)
    _patched_classes.clear()


def is_enabled() -> bool:
    return _enabled_config is not None


def get_config() -> OptimizeConfig:
    """The configuration in force: the enabled one, else what files and environment resolve to now."""
    return _enabled_config if _enabled_config is not None else resolve_config()
