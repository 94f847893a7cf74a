"""Exceptions of the training launcher.

They subclass the core classes of `vbhal.errors` (ConfigError, CheckpointError); while the core
module is not importable (it is written in parallel) a local stand-in with the same name is used,
so `except ConfigError` in user code keeps working once the core lands.
"""

from __future__ import annotations

try:  # the core's classes, per docs/CONTRACT.md
    from vbhal.errors import CheckpointError, ConfigError, VbhalError
except Exception:  # pragma: no cover - only while vbhal/errors.py does not exist yet
    class VbhalError(Exception):
        """Base class of vbhal errors (stand-in until vbhal/errors.py exists)."""

    class ConfigError(VbhalError, ValueError):
        """A configuration value is wrong (stand-in)."""

    class CheckpointError(VbhalError):
        """A checkpoint is unusable (stand-in)."""


class DataError(ConfigError):
    """The training data cannot be used (missing path, empty corpus, too short for seq_length)."""


class ResumeError(CheckpointError):
    """A checkpoint exists but cannot continue this run (different model config, ...)."""


class FeatureUnavailableError(VbhalError):
    """A feature this run asked for depends on a part of vbhal that is not importable."""


def config_error(message: str) -> ConfigError:
    return ConfigError(message)


__all__ = ["VbhalError", "ConfigError", "CheckpointError", "DataError", "ResumeError",
           "FeatureUnavailableError", "config_error"]
