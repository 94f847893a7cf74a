"""`TrainConfig`: every setting of a `vbhal train` run, its presets, and how they merge.

Precedence (lowest first): the dataclass defaults < the training preset of ``--config`` (batch size,
learning rate, corpus cap... see `TRAIN_PRESETS`) < a YAML/JSON ``--config-file`` < command-line flags.
Model shape fields left at None come from the model preset (`vbhal.train.model.PRESETS`).

`TrainConfig.check()` rejects bad or contradictory settings with a `ConfigError` before any work.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vbhal.train._errors import ConfigError
from vbhal.train.model import PRESETS, GPTConfig

__all__ = ["TrainConfig", "TRAIN_PRESETS", "load_config_file", "MODEL_FIELDS"]

# Training defaults per preset. "max_corpus_bytes" caps the default stdlib corpus (whole files).
# tiny: 5 epochs of ~183 k tokens (44 steps of 32 x 128) = 0.92 M tokens; `vbhal train --config tiny
# --epochs 5` measured 35.8 s wall (one intra-op thread, 2-core machine at load 1.6; 64 s at load 4.4)
# with validation loss 2.544 nats/byte (uniform: ln 256 = 5.55); the stated target is < 2.7.
TRAIN_PRESETS: dict[str, dict[str, Any]] = {
    "tiny": dict(batch_size=32, learning_rate=3e-3, warmup_steps=20, epochs=5,
                 max_corpus_bytes=192 * 1024, log_interval=10),
    "small": dict(batch_size=32, learning_rate=1e-3, warmup_steps=100, epochs=1,
                  max_corpus_bytes=4 * 1024 * 1024, log_interval=20),
    # medium: micro-batch 16 x 2048 = 32 k tokens per step (H100, 32 x 1024 at 12 heads: 11.6 GiB peak)
    "medium": dict(batch_size=16, learning_rate=6e-4, warmup_steps=200, epochs=1,
                   max_corpus_bytes=None, log_interval=50),
    "large": dict(batch_size=8, learning_rate=3e-4, warmup_steps=200, epochs=1,
                  max_corpus_bytes=None, log_interval=50),
}

# TrainConfig fields that are GPTConfig fields (None = take the preset's value).
MODEL_FIELDS = ("vocab_size", "hidden_size", "num_layers", "num_heads", "num_kv_heads", "seq_length",
                "mlp_ratio", "dropout", "tie_embeddings")

_CHOICES = {
    "lr_schedule": ("cosine", "linear", "constant"),
    "mixed_precision": ("auto", "bf16", "fp16", "no"),
    "strategy": ("ddp", "fsdp"),
    "lr_scaling": ("linear", "sqrt", "none"),
    "mode": (None, "full", "speed", "memory", "balanced"),
    "fp4_format": ("mxfp4", "nvfp4"),
    "sdpa_backend": ("auto", "cudnn", "flash", "efficient", "math"),
    "compile_mode": ("default", "max-autotune-no-cudagraphs", "max-autotune", "reduce-overhead"),
}


@dataclass
class TrainConfig:
    """All settings of a run. Field names are the CLI flags with '-' -> '_'."""

    # model (None: from the preset)
    config: str = "tiny"
    vocab_size: int | None = None
    hidden_size: int | None = None
    num_layers: int | None = None
    num_heads: int | None = None
    num_kv_heads: int | None = None
    seq_length: int | None = None
    mlp_ratio: float | None = None
    dropout: float | None = None
    tie_embeddings: bool | None = None
    # data
    data: list[str] | None = None
    max_corpus_bytes: int | None = -1         # -1: the preset's cap; None: no cap
    num_workers: int | None = None
    # optimisation
    batch_size: int | None = None
    epochs: int | None = None
    max_steps: int | None = None
    learning_rate: float | None = None
    min_lr_ratio: float = 0.1
    warmup_steps: int | None = None
    lr_schedule: str = "cosine"
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    gradient_accumulation_steps: int = 1
    max_grad_norm: float = 1.0
    mixed_precision: str = "auto"
    gradient_checkpointing: bool = False
    compile: bool = False
    compile_mode: str = "default"            # torch.compile mode (see _CHOICES); used with --compile
    deferred_sync: bool | None = None        # fused AdamW + on-device NaN guard; None: on for CUDA
    sdpa_backend: str = "auto"               # PyTorch SDPA backend tried first on CUDA (auto: torch's order)
    seed: int = 1337
    # vbhal features
    use_fp4: bool | None = None              # None: leave it to --mode / the core's defaults
    fp4_format: str = "mxfp4"
    use_flash_attn: bool | None = None
    mode: str | None = None
    vgpu_auto: bool = False
    estimate_resources: bool = False
    # logging, evaluation, checkpoints
    output_dir: str = "output"
    log_interval: int | None = None
    val_interval: int | None = None          # steps; None: at the end of every epoch
    val_batches: int = 20                    # 0: no validation (and no best_model.pt)
    save_steps: int | None = None            # None: at the end of every epoch; 0: only at the end
    keep_checkpoints: int = 3
    checkpoints: bool = True                 # False: write no training checkpoints at all (benchmarks)
    resume: str | None = None
    stop_after_steps: int | None = None      # stop (with a checkpoint) after this many steps of this job
    progress: bool = True
    tensorboard: bool = True                 # used when the tensorboard package is installed
    # devices and distribution
    device: str = "auto"
    nproc: int | None = None
    strategy: str = "ddp"
    lr_scaling: str = "linear"
    extra: dict = field(default_factory=dict)  # unknown keys from a config file are an error

    # ------------------------------------------------------------------------------------------
    def with_preset_defaults(self) -> "TrainConfig":
        """A copy with preset-dependent fields (None / -1) filled from `TRAIN_PRESETS[config]`."""
        if self.config not in PRESETS:
            raise ConfigError(f"unknown --config {self.config!r}; choose one of "
                              f"{', '.join(PRESETS)} (or set the model shape flags on top of one).")
        preset = TRAIN_PRESETS[self.config]
        out = dataclasses.replace(self)
        for key, value in preset.items():
            if key == "epochs":
                continue  # only when neither --epochs nor --max-steps was given (below)
            current = getattr(out, key)
            if current is None or (key == "max_corpus_bytes" and current == -1):
                setattr(out, key, value)
        if out.max_corpus_bytes == -1:
            out.max_corpus_bytes = None
        if out.epochs is None and out.max_steps is None:
            out.epochs = preset["epochs"]
        return out

    def model_config(self) -> GPTConfig:
        overrides = {k: getattr(self, k) for k in MODEL_FIELDS if getattr(self, k) is not None}
        return GPTConfig.from_preset(self.config, **overrides)

    def check(self) -> None:
        """Raise ConfigError for out-of-range values and contradictory combinations."""
        if self.extra:
            raise ConfigError(f"unknown setting(s) {sorted(self.extra)} in the config file; known "
                              f"settings are the `vbhal train` flags ({', '.join(sorted(_field_names()))}).")
        for key, allowed in _CHOICES.items():
            if getattr(self, key) not in allowed:
                raise ConfigError(f"--{key.replace('_', '-')} {getattr(self, key)!r} is not one of "
                                  f"{', '.join(str(a) for a in allowed if a is not None)}.")
        positive = ("batch_size", "gradient_accumulation_steps", "keep_checkpoints", "log_interval")
        for key in positive:
            v = getattr(self, key)
            if v is not None and v <= 0:
                raise ConfigError(f"--{key.replace('_', '-')} must be a positive integer, got {v}.")
        for key in ("epochs", "max_steps", "nproc", "stop_after_steps"):
            v = getattr(self, key)
            if v is not None and v <= 0:
                raise ConfigError(f"--{key.replace('_', '-')} must be a positive integer, got {v}.")
        for key in ("warmup_steps", "save_steps", "val_interval", "num_workers", "val_batches"):
            v = getattr(self, key)
            if v is not None and v < 0:
                raise ConfigError(f"--{key.replace('_', '-')} must be >= 0, got {v}.")
        if self.learning_rate is not None and not self.learning_rate > 0:
            raise ConfigError(f"--learning-rate must be positive, got {self.learning_rate}.")
        if not 0 <= self.min_lr_ratio <= 1:
            raise ConfigError(f"min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}.")
        if self.max_grad_norm < 0:
            raise ConfigError(f"--max-grad-norm must be >= 0 (0 turns clipping off), got {self.max_grad_norm}.")
        if self.max_corpus_bytes is not None and self.max_corpus_bytes not in (-1,) and self.max_corpus_bytes <= 0:
            raise ConfigError(f"max_corpus_bytes must be positive (or null for no cap), got {self.max_corpus_bytes}.")
        if self.epochs is not None and self.max_steps is not None:
            raise ConfigError("--epochs and --max-steps were both given; give one (an epoch is one pass "
                              "over the training windows, --max-steps counts optimizer steps).")
        if self.fp4_format != "mxfp4" and not self.use_fp4:
            raise ConfigError(f"--fp4-format {self.fp4_format} without --use-fp4: add --use-fp4 or drop "
                              f"--fp4-format.")
        if self.compile_mode != "default" and not self.compile:
            raise ConfigError(f"--compile-mode {self.compile_mode} without --compile: add --compile or drop "
                              f"--compile-mode.")
        self.model_config()  # validates the shape (divisibility, GQA)

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d.pop("extra", None)
        return d


def _field_names() -> set[str]:
    return {f.name for f in dataclasses.fields(TrainConfig)} - {"extra"}


def load_config_file(path: str | Path) -> dict[str, Any]:
    """Read a YAML (.yaml/.yml) or JSON config file into {field: value}; '-' in keys becomes '_'."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"--config-file {p} does not exist.")
    text = p.read_text()
    try:
        if p.suffix.lower() in (".yaml", ".yml"):
            try:
                import yaml
            except ImportError:
                raise ConfigError("reading a YAML config needs PyYAML (pip install pyyaml), or use a "
                                  ".json config file.") from None
            raw = yaml.safe_load(text)
        else:
            raw = json.loads(text)
    except ConfigError:
        raise
    except Exception as exc:
        raise ConfigError(f"cannot parse --config-file {p}: {exc}") from None
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise ConfigError(f"--config-file {p} must hold a mapping of settings, got {type(raw).__name__}.")
    out: dict[str, Any] = {}
    names = _field_names()
    extra = {}
    for k, v in raw.items():
        key = str(k).replace("-", "_")
        if key in names:
            out[key] = v
        else:
            extra[key] = v
    if extra:
        out["extra"] = extra
    if isinstance(out.get("data"), str):
        out["data"] = [out["data"]]
    return out
