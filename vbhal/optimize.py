"""`optimize`: one pass over a model that binds the HAL's kernels and swaps in what the mode asks for.

Order of the pass (each step reports what it changed):

1. resolve the configuration (mode preset < files < environment < arguments) and select the device;
2. resolve the kernels the config needs, once, through the HAL (the hot path never calls pluggy);
3. FP4: swap ``nn.Linear`` layers for :class:`vbhal.nn.FP4Linear` (embeddings, heads, routers stay);
4. attention: route attention modules through the bound ``attention`` kernel;
5. gradient checkpointing of repeated blocks (a HuggingFace model's own switch where it has one);
6. mixed precision: autocast around the forward (bf16, fp16 where bf16 is unsupported);
7. offload: the tier stack streams weights from host/disk (mode ``memory``).

Optimizing an optimized model changes nothing more.
"""

from __future__ import annotations

import logging
import os
import weakref
from typing import Any

import torch
import torch.nn as nn

from vbhal import hal as _hal
from vbhal._report import OptimizeReport
from vbhal.config import OptimizeConfig, resolve_config
from vbhal.errors import ConfigError, VbhalError
from vbhal.hookspecs import DeviceInfo
from vbhal.nn import checkpoint as _ckpt

log = logging.getLogger("vbhal")

REPORT_ATTR = "_vbhal_report"
_last: "weakref.ref[nn.Module] | None" = None


def optimize(
    model: nn.Module,
    mode: str | None = None,
    *,
    device: str | torch.device | None = None,
    config: OptimizeConfig | None = None,
    **overrides: Any,
) -> nn.Module:
    """Apply vbhal's optimizations to `model` in place and return it.

    Args:
        model: any ``torch.nn.Module`` (a HuggingFace ``PreTrainedModel`` included).
        mode: ``"full"``, ``"speed"``, ``"memory"`` or ``"balanced"`` (default, or from ``VBHAL_MODE`` /
            ``.vbrc`` / ``[tool.vbhal]``). ``vbhal info`` prints what each mode turns on.
        device: device to optimize for (``"cuda:1"``, ``"npu"``, ``"cpu"``); default: ``VBHAL_DEVICE``, else the
            highest-priority device found.
        config: a full :class:`OptimizeConfig` (explicit arguments); `overrides` change single fields.

    Example::

        model = vbhal.optimize(model)                       # balanced, auto-detected device
        model = vbhal.optimize(model, mode="full", fp4_format="nvfp4")
        print(vbhal.stats(model).format())
    """
    global _last
    if not isinstance(model, nn.Module):
        raise TypeError(f"vbhal.optimize expects a torch.nn.Module, got {type(model).__name__}; "
                        f"pass the model object (e.g. vbhal.optimize(model)), not its state_dict or a class")
    cfg = resolve_config(mode, config, overrides=overrides)
    existing: OptimizeReport | None = getattr(model, REPORT_ATTR, None)
    if existing is not None:
        if existing.config != cfg.to_dict():
            existing.warn(f"optimize called again with a different configuration (mode={cfg.mode}); the model "
                          f"was already optimized with mode={existing.mode} and is left as it is — build a fresh "
                          f"model to optimize it differently")
            log.warning(existing.warnings[-1])
        return model

    selection = _select(device, cfg)
    info = selection.device
    report = OptimizeReport(device=info.name, device_reason=selection.reason, mode=cfg.mode, config=cfg.to_dict())
    report.param_bytes_before = _state_bytes(model)
    _check_model_device(model, info, cfg)

    hal = _hal.get_hal()

    def kernel(name: str):
        k = hal.get_kernel(name, info)
        report.kernels[name] = f"{k.backend}: {k.description}" if k.description else k.backend
        if k.backend != info.backend:
            reason = getattr(getattr(hal.pm.get_plugin(info.backend), "table", None), "unavailable", {}).get(name)
            note = f"; {info.backend} backend: {reason}" if reason else ""
            report.add("kernel", "", f"{name}: {info.backend} has no own kernel, {k.backend} reference serves{note}")
        return k

    if cfg.fp4:
        from vbhal.nn.fp4_linear import swap_linears

        swap_linears(model, fmt=cfg.fp4_format, kernel_quantize=kernel("quantize_fp4"),
                     kernel_linear=kernel("fp4_linear"), kernel_dequantize=kernel("dequantize_fp4"),
                     include=cfg.fp4_include, exclude=cfg.fp4_exclude, report=report, scale_rule=cfg.fp4_scale_rule)
    if cfg.attention:
        from vbhal.nn.attention import swap_attention

        swap_attention(model, kernel=kernel("attention"), report=report)
    if cfg.gradient_checkpointing and cfg.offload:
        # The offload engine recomputes each streamed unit in its backward (checkpointing at unit granularity,
        # with the unit's weights on the device); a second, model-level checkpoint would recompute outside it.
        report.add("checkpoint", "", "done by the offload engine: each streamed unit is recomputed in backward")
    elif cfg.gradient_checkpointing:
        _apply_checkpointing(model, report)
    if cfg.mixed_precision != "none":
        dtype = _ckpt.autocast_dtype(cfg.mixed_precision, info.device.type, bool(info.capabilities.get("bf16", True)))
        if dtype is not None and _ckpt.enable_autocast(model, info.device.type, dtype):
            fallback = " (bf16 unsupported on this device)" if cfg.mixed_precision == "bf16" and \
                dtype == torch.float16 else ""
            report.add("mixed_precision", "", f"autocast {str(dtype).replace('torch.', '')} on "
                       f"{info.device.type}{fallback}")
    if cfg.offload:
        from vbhal.nn.offload import apply_offload
        from vbhal.tiers import TierStack

        stack = TierStack.from_specs(hal.get_tiers(info))
        apply_offload(model, stack=stack, config=cfg, report=report)

    report.param_bytes_after = _state_bytes(model)
    setattr(model, REPORT_ATTR, report)
    _last = weakref.ref(model)
    log.info("vbhal: %s", report.format(max_rows=10))
    return model


def _select(device: str | torch.device | DeviceInfo | None, cfg: OptimizeConfig) -> _hal.Selection:
    """The `device` argument, else the configured device (whose source decides the reason), else auto."""
    if device is not None or cfg.device is None:
        return _hal.select_device(device)  # argument, VBHAL_DEVICE, or probe order
    if cfg.device == os.environ.get("VBHAL_DEVICE", "").strip():
        return _hal.select_device(None)  # reported as coming from the environment variable
    sel = _hal.select_device(cfg.device)
    return _hal.Selection(sel.device, f"configuration (device={cfg.device!r})")


def _state_bytes(model: nn.Module) -> int:
    seen: set[int] = set()
    total = 0
    for t in list(model.parameters()) + list(model.buffers()):
        if id(t) in seen or t.device.type == "meta":
            continue
        seen.add(id(t))
        total += t.numel() * t.element_size()
    return total


def _check_model_device(model: nn.Module, info: DeviceInfo, cfg: OptimizeConfig) -> None:
    devices = {t.device for t in list(model.parameters()) + list(model.buffers())}
    if not devices:
        return
    target = info.device
    if any(d.type == "meta" for d in devices):
        raise ConfigError("the model has parameters on the meta device (not materialised); load or initialise "
                          "its weights (e.g. model.to_empty(device=...) and load a state_dict) before optimize")
    if cfg.offload and all(d.type == "cpu" for d in devices):
        return  # offload keeps the master weights on the host and streams them to the device
    wrong = sorted({str(d) for d in devices if d.type != target.type or
                    (target.index is not None and d.index not in (None, target.index))})
    if wrong:
        raise ConfigError(
            f"the model is on {', '.join(wrong)} but vbhal selected {info.name}; move it first "
            f"(model.to({str(target)!r})) or pass device={', '.join(repr(w) for w in wrong)} to optimize")


def _apply_checkpointing(model: nn.Module, report: OptimizeReport) -> None:
    own_switch = getattr(model, "gradient_checkpointing_enable", None)
    if callable(own_switch) and getattr(model, "supports_gradient_checkpointing", True):
        try:
            own_switch()
            report.add("checkpoint", "", f"{type(model).__name__}.gradient_checkpointing_enable()")
            return
        except (ValueError, NotImplementedError, TypeError) as e:
            report.warn(f"the model's own gradient_checkpointing_enable() failed ({e}); using vbhal's")
    blocks = _ckpt.repeated_blocks(model)
    if not blocks:
        report.add("skip", "", "gradient checkpointing: no repeated blocks found")
        return
    for name, block in blocks:
        if _ckpt.enable_checkpointing(block):
            report.add("checkpoint", name, type(block).__name__)


def stats(model: nn.Module | None = None) -> OptimizeReport:
    """The report of what `optimize` changed in `model` (default: the model optimized last)."""
    if model is None:
        model = _last() if _last is not None else None
        if model is None:
            raise VbhalError("no model has been optimized in this process yet; call vbhal.optimize(model) first")
    report = getattr(model, REPORT_ATTR, None)
    if report is None:
        raise VbhalError(f"this {type(model).__name__} has not been optimized; call vbhal.optimize(model) first")
    return report


def print_stats(model: nn.Module | None = None) -> None:
    """Print the optimize report (and the tier statistics when the model uses the tier stack)."""
    report = stats(model)
    print(report.format())
    target = model if model is not None else (_last() if _last is not None else None)
    if report.device.startswith("npu"):
        from vbhal.backends.npu._runtime import fallback_report

        for line in fallback_report():
            print(f"npu reference-path fallback: {line}")
    stack = getattr(target, "_vbhal_tier_stack", None)
    if stack is not None:
        from vbhal.tiers import format_tier_stats

        print(format_tier_stats(stack))
