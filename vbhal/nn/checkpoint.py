"""Gradient checkpointing of repeated blocks, and mixed-precision autocast around a model's forward.

Both are installed without changing the module tree or the state_dict keys: checkpointing replaces a
block's ``forward`` on the instance (undone by deleting the attribute), autocast is a pair of forward hooks
on the root module (removable handles). Re-running either is a no-op.
"""

from __future__ import annotations

import functools
from typing import Any

import torch
import torch.nn as nn
from torch.utils.checkpoint import checkpoint

_CKPT_FLAG = "_vbhal_checkpointed"
_AUTOCAST_HANDLES = "_vbhal_autocast_handles"


def _checkpointed_forward(module: nn.Module, original, *args: Any, **kwargs: Any):
    if module.training and torch.is_grad_enabled():
        # use_reentrant=False: works with kwargs, keeps autocast state, and composes with torch.compile.
        return checkpoint(original, *args, use_reentrant=False, **kwargs)
    return original(*args, **kwargs)


def repeated_blocks(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """Children of ModuleLists/Sequentials that repeat (2+ siblings of one class, with parameters).

    These are a transformer's layers: checkpointing each trades one extra forward for their activations.
    """
    found: list[tuple[str, nn.Module]] = []
    for name, container in model.named_modules():
        if not isinstance(container, (nn.ModuleList, nn.Sequential)):
            continue
        children = list(container.named_children())
        by_class: dict[type, list[tuple[str, nn.Module]]] = {}
        for child_name, child in children:
            by_class.setdefault(type(child), []).append((child_name, child))
        for cls, group in by_class.items():
            if len(group) < 2 or issubclass(cls, nn.ModuleList):
                continue
            if not any(True for _ in group[0][1].parameters()):
                continue
            for child_name, child in group:
                found.append((f"{name}.{child_name}" if name else child_name, child))
    # A block nested inside another checkpointed block would be recomputed twice: keep the outermost.
    outer: list[tuple[str, nn.Module]] = []
    for name, mod in found:
        if not any(name.startswith(o + ".") for o, _ in outer):
            outer.append((name, mod))
    return outer


def enable_checkpointing(block: nn.Module) -> bool:
    """Checkpoint `block`'s forward; False if it already was."""
    if getattr(block, _CKPT_FLAG, False):
        return False
    original = block.forward
    block.forward = functools.partial(_checkpointed_forward, block, original)  # type: ignore[method-assign]
    setattr(block, _CKPT_FLAG, True)
    return True


def disable_checkpointing(block: nn.Module) -> None:
    if getattr(block, _CKPT_FLAG, False):
        del block.forward
        delattr(block, _CKPT_FLAG)


def autocast_dtype(precision: str, device_type: str, bf16_supported: bool) -> torch.dtype | None:
    """The autocast dtype for a precision setting: bf16, falling back to fp16 where bf16 is unsupported."""
    if precision == "none":
        return None
    if precision == "bf16" and not bf16_supported:
        return torch.float16
    return torch.bfloat16 if precision == "bf16" else torch.float16


def enable_autocast(model: nn.Module, device_type: str, dtype: torch.dtype) -> bool:
    """Run `model`'s forward under ``torch.autocast(device_type, dtype)``; False if already installed."""
    if getattr(model, _AUTOCAST_HANDLES, None):
        return False
    contexts: list[torch.autocast] = []

    def enter(_module, _args):
        ctx = torch.autocast(device_type=device_type, dtype=dtype)
        ctx.__enter__()
        contexts.append(ctx)

    def leave(_module, _args, _output):
        if contexts:
            contexts.pop().__exit__(None, None, None)

    handles = [model.register_forward_pre_hook(enter), model.register_forward_hook(leave, always_call=True)]
    setattr(model, _AUTOCAST_HANDLES, handles)
    return True


def disable_autocast(model: nn.Module) -> None:
    for h in getattr(model, _AUTOCAST_HANDLES, None) or []:
        h.remove()
    if hasattr(model, _AUTOCAST_HANDLES):
        delattr(model, _AUTOCAST_HANDLES)
