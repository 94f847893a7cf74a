"""What `optimize` does, as data: :class:`OptimizeConfig`, the four modes, and where settings come from.

Sources, later overriding earlier::

    defaults  <  mode preset  <  .vbrc (JSON; home, then working directory)  <  [tool.vbhal] in ./pyproject.toml
              <  environment (VBHAL_*, plus the legacy ENABLE_VIRTUAL_BLACKWELL / VB_MODE / VB_AUTO_PATCH)
              <  explicit arguments

A bad value is a :class:`~vbhal.errors.ConfigError` naming its source: the file and key, or the variable.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Mapping

from vbhal.errors import ConfigError

MODES = ("full", "speed", "memory", "balanced")
FP4_FORMATS = ("mxfp4", "nvfp4")
SCALE_RULES = ("floor", "rceil")
PRECISIONS = ("bf16", "fp16", "none")


@dataclass(frozen=True)
class OptimizeConfig:
    """Everything `vbhal.optimize` may change, one flag per feature.

    Example::

        cfg = OptimizeConfig.for_mode("memory", fp4=False)
        model = vbhal.optimize(model, config=cfg)
    """

    mode: str = "balanced"
    #: Replace nn.Linear weights by frozen FP4 (MXFP4/NVFP4) weights. Frozen: only biases/adapters train.
    fp4: bool = False
    fp4_format: str = "mxfp4"
    fp4_scale_rule: str = "floor"
    #: fnmatch patterns on qualified module names: include narrows, exclude removes.
    fp4_include: tuple[str, ...] = ()
    fp4_exclude: tuple[str, ...] = ()
    #: Route attention through the bound `attention` kernel (flash attention on CUDA).
    attention: bool = True
    #: Autocast around forward: "bf16", "fp16" or "none". bf16 falls back to fp16 where bf16 is unsupported.
    mixed_precision: str = "bf16"
    #: Recompute repeated blocks in backward instead of keeping their activations.
    gradient_checkpointing: bool = False
    #: Keep weights/optimizer state in the host/disk tiers and stream them to the device (the tier stack).
    offload: bool = False
    #: Device to run on ("cuda", "cuda:1", "npu:0", "cpu", a plug-in's device), None = auto-detect.
    device: str | None = None
    #: Classes (dotted paths) to optimize automatically when vbhal is enabled globally.
    autopatch: tuple[str, ...] = ()
    #: Also optimize HuggingFace PreTrainedModels automatically when enabled globally.
    autopatch_hf: bool = True

    def __post_init__(self) -> None:
        _check_choice("mode", self.mode, MODES, "argument")
        _check_choice("fp4_format", self.fp4_format, FP4_FORMATS, "argument")
        _check_choice("fp4_scale_rule", self.fp4_scale_rule, SCALE_RULES, "argument")
        _check_choice("mixed_precision", self.mixed_precision, PRECISIONS, "argument")

    @classmethod
    def for_mode(cls, mode: str = "balanced", **overrides: Any) -> "OptimizeConfig":
        """The preset of `mode` with `overrides` applied on top."""
        _check_choice("mode", mode, MODES, "argument")
        values = dict(MODE_PRESETS[mode], mode=mode)
        values.update(overrides)
        return _build(values, "argument")

    def replace(self, **changes: Any) -> "OptimizeConfig":
        return _build({**dataclasses.asdict(self), **changes}, "argument")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


#: What each mode turns on (the README's table is generated from this).
MODE_PRESETS: dict[str, dict[str, Any]] = {
    "speed": dict(fp4=False, attention=True, mixed_precision="bf16", gradient_checkpointing=False, offload=False),
    "balanced": dict(fp4=False, attention=True, mixed_precision="bf16", gradient_checkpointing=True, offload=False),
    "memory": dict(fp4=False, attention=True, mixed_precision="bf16", gradient_checkpointing=True, offload=True),
    "full": dict(fp4=True, attention=True, mixed_precision="bf16", gradient_checkpointing=True, offload=False),
}

_FIELD_TYPES = {f.name: f.type for f in fields(OptimizeConfig)}
_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off", ""}


def _check_choice(key: str, value: Any, choices: tuple[str, ...], source: str) -> None:
    if value not in choices:
        raise ConfigError(f"{source}: {key}={value!r} is not one of {', '.join(choices)}")


def _coerce(key: str, value: Any, source: str) -> Any:
    """Turn a value from a file or an environment variable into the field's type, or say what was expected."""
    if key not in _FIELD_TYPES:
        raise ConfigError(f"{source}: unknown setting {key!r}; known settings: {', '.join(sorted(_FIELD_TYPES))}")
    kind = _FIELD_TYPES[key]
    if kind == "bool":
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.strip().lower() in _TRUE | _FALSE:
            return value.strip().lower() in _TRUE
        raise ConfigError(f"{source}: {key}={value!r} is not a boolean (use true/false, 1/0, yes/no, on/off)")
    if kind == "tuple[str, ...]":
        if isinstance(value, str):
            return tuple(p.strip() for p in value.split(",") if p.strip())
        if isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value):
            return tuple(value)
        raise ConfigError(f"{source}: {key}={value!r} must be a list of strings (or a comma-separated string)")
    if kind == "str | None":
        if value is None or (isinstance(value, str) and value.strip().lower() in ("", "auto", "none")):
            return None
        if isinstance(value, str):
            return value.strip()
        raise ConfigError(f"{source}: {key}={value!r} must be a string")
    if not isinstance(value, str):
        raise ConfigError(f"{source}: {key}={value!r} must be a string")
    value = value.strip().lower()
    if key == "mixed_precision" and value in ("bfloat16", "fp32", "float32", "no", "off"):
        value = {"bfloat16": "bf16"}.get(value, "none")
    choices = {"mode": MODES, "fp4_format": FP4_FORMATS, "fp4_scale_rule": SCALE_RULES,
               "mixed_precision": PRECISIONS}.get(key)
    if choices is not None:
        _check_choice(key, value, choices, source)
    return value


def _build(values: Mapping[str, Any], source: str) -> OptimizeConfig:
    clean = {k: _coerce(k, v, source) for k, v in values.items()}
    try:
        return OptimizeConfig(**clean)
    except ConfigError:
        raise
    except TypeError as e:  # pragma: no cover - _coerce rejects unknown keys first
        raise ConfigError(f"{source}: {e}") from None


# --------------------------------------------------------------------------------------------- file / env sources
def _read_vbrc(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path}: not valid JSON ({e.msg} at line {e.lineno}); fix or remove the file") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a JSON object of settings, got {type(data).__name__}")
    return {k: (k, v, f"{path}: key {k!r}") for k, v in data.items()}


def _read_pyproject(path: Path) -> dict[str, Any]:
    if sys.version_info >= (3, 11):
        import tomllib
    else:  # pragma: no cover - Python 3.10
        try:
            import tomli as tomllib  # type: ignore[no-redef]
        except ImportError:
            return {}
    try:
        data = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path}: not valid TOML ({e})") from None
    section = data.get("tool", {}).get("vbhal", {})
    if not isinstance(section, dict):
        raise ConfigError(f"{path}: [tool.vbhal] must be a table")
    return {k.replace("-", "_"): (k, v, f"{path}: [tool.vbhal] key {k!r}") for k, v in section.items()}


#: Variables other than VBHAL_<FIELD> that existing users have in their scripts.
_ENV_ALIASES = {"VB_MODE": "mode"}
_ENABLE_VARS = ("VBHAL_ENABLE", "ENABLE_VIRTUAL_BLACKWELL")
_AUTOPATCH_VARS = ("VB_AUTO_PATCH", "VBHAL_AUTO_PATCH")


def _env_settings(env: Mapping[str, str]) -> dict[str, tuple[str, Any, str]]:
    out: dict[str, tuple[str, Any, str]] = {}
    for var, key in _ENV_ALIASES.items():
        if var in env:
            out[key] = (key, env[var], f"environment variable {var}")
    for name in _FIELD_TYPES:
        var = "VBHAL_" + name.upper()
        if var in env:
            out[name] = (name, env[var], f"environment variable {var}")
    for var in _AUTOPATCH_VARS:
        if var in env:
            out["autopatch_hf"] = ("autopatch_hf", env[var], f"environment variable {var}")
    return out


def env_flag(names: tuple[str, ...], env: Mapping[str, str] | None = None) -> bool:
    """True when any of the variables is set to a true value; a value that is not a boolean is an error."""
    env = os.environ if env is None else env
    for var in names:
        if var in env:
            raw = env[var].strip().lower()
            if raw not in _TRUE | _FALSE:
                raise ConfigError(f"environment variable {var}={env[var]!r} is not a boolean (use 1/0, true/false)")
            if raw in _TRUE:
                return True
    return False


def env_enabled(env: Mapping[str, str] | None = None) -> bool:
    """Whether the environment asks for global enabling (VBHAL_ENABLE or ENABLE_VIRTUAL_BLACKWELL)."""
    return env_flag(_ENABLE_VARS, env)


def config_files(cwd: Path | None = None, home: Path | None = None) -> list[Path]:
    """The configuration files that exist, in the order they are applied."""
    cwd = Path.cwd() if cwd is None else cwd
    home = Path.home() if home is None else home
    found = []
    for p in (home / ".vbrc", cwd / ".vbrc", cwd / "pyproject.toml"):
        if p.is_file() and p not in found:
            found.append(p)
    return found


def resolve_config(
    mode: str | None = None,
    config: OptimizeConfig | None = None,
    *,
    overrides: Mapping[str, Any] | None = None,
    env: Mapping[str, str] | None = None,
    cwd: Path | None = None,
    home: Path | None = None,
) -> OptimizeConfig:
    """Merge every source into one :class:`OptimizeConfig`.

    An explicit `config` object stands for "explicit arguments": its values win over files and environment,
    and `overrides` win over it. Without one, the mode (argument > env > files > "balanced") picks the preset.
    """
    env = os.environ if env is None else env
    layered: dict[str, tuple[str, Any, str]] = {}
    for path in config_files(cwd, home):
        layered.update(_read_pyproject(path) if path.name == "pyproject.toml" else _read_vbrc(path))
    layered.update(_env_settings(env))
    overrides = dict(overrides or {})
    if config is not None:
        base = config.to_dict()
        if mode is not None and mode != config.mode:
            raise ConfigError(f"argument: mode={mode!r} contradicts config.mode={config.mode!r}; pass one of them")
        base.update(overrides)
        return _build(base, "argument")
    # The mode decides the preset; everything else layers on top of it.
    chosen_mode = mode
    if chosen_mode is None and "mode" in layered:
        _, raw, src = layered["mode"]
        chosen_mode = _coerce("mode", raw, src)
    chosen_mode = chosen_mode or "balanced"
    _check_choice("mode", chosen_mode, MODES, "argument")
    values: dict[str, Any] = dict(MODE_PRESETS[chosen_mode], mode=chosen_mode)
    for key, (_, raw, src) in layered.items():
        if key == "mode":
            continue
        values[key] = _coerce(key, raw, src)
    for key, raw in overrides.items():
        values[key] = _coerce(key, raw, "argument")
    return _build(values, "argument")


def mode_table() -> str:
    """A Markdown table of what each mode turns on (used in the README and `vbhal info`)."""
    cols = ("fp4", "attention", "mixed_precision", "gradient_checkpointing", "offload")
    lines = ["| mode | " + " | ".join(cols) + " |", "|---|" + "---|" * len(cols)]
    for mode in MODES:
        p = MODE_PRESETS[mode]
        cells = ["yes" if p[c] is True else "no" if p[c] is False else str(p[c]) for c in cols]
        lines.append(f"| {mode} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


__all__ = ["OptimizeConfig", "MODES", "MODE_PRESETS", "resolve_config", "env_enabled", "env_flag", "mode_table"]
