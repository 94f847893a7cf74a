"""Exception classes. Every message says what was wrong and what to do about it."""

from __future__ import annotations


class VbhalError(Exception):
    """Base class of every error vbhal raises on purpose."""


class ConfigError(VbhalError, ValueError):
    """A configuration value is invalid; the message names its source (argument, file and key, or variable)."""


class DeviceNotFoundError(VbhalError, RuntimeError):
    """A device was asked for that no backend found; the message lists the devices that were found."""


class PluginError(VbhalError, RuntimeError):
    """A plug-in failed to load or to probe while strict plug-in loading was on."""


class KernelError(VbhalError, RuntimeError):
    """No backend can provide a kernel, or a kernel was called with inputs it cannot take."""


class QuantizationError(VbhalError, ValueError):
    """A tensor cannot be quantized (NaN/Inf, wrong rank or dtype) or a quantized payload is inconsistent."""


class CheckpointError(VbhalError, RuntimeError):
    """A checkpoint is missing, truncated, corrupted or incompatible with the model being resumed."""


class TierError(VbhalError, RuntimeError):
    """A tensor could not be moved between memory tiers; the message says where it stayed and why."""


class EstimateError(VbhalError, ValueError):
    """The estimator or planner got input it cannot work with (unknown preset, nonsense size, bad budget)."""
