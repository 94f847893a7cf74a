"""How much memory a training step needs, and how to make it fit: the estimator and the planner.

`estimate` traces one real training step of the model — forward, loss, backward and the optimizer
step — on **meta tensors**, so a 70B-parameter model costs no parameter memory and a few seconds.
A `TorchDispatchMode` sees every tensor the step allocates and (through weak references to the
storages) every tensor it frees, so the peak it reports is the peak of the real program, not of a
formula fitted to one architecture:

* parameters, gradients and optimizer state are **summed** (one popular estimator takes their max,
  about 2x low for mixed precision);
* activations are what autograd really saves (``saved_tensors_hooks`` attributes them to layers),
  with attention O(S^2) (eager / math SDPA) or O(S) (flash attention) depending on the kernel;
* mixed precision follows CUDA autocast's op lists, including its cache of low-precision weight
  copies that live until backward;
* gradient checkpointing is traced by really checkpointing the repeated blocks;
* the optimizer step (AdamW/Adam/SGD; foreach, fused or per-tensor) is traced too, so its state and
  its temporaries (foreach AdamW keeps one parameter-sized temporary) are counted;
* FP4 weights are 4.25 bits per element (MXFP4: E2M1 codes + one E8M0 scale per 32) or 4.5 (NVFP4:
  one E4M3 scale per 16), frozen: no gradient, no optimizer state;
* the framework's workspace (cuBLAS) is added; on CUDA two steps are replayed through a model of
  PyTorch's caching allocator, which predicts ``max_memory_reserved`` and -- what decides an OOM --
  whether the step fits under a memory cap, fragmentation included.

Measured on an H100 (benchmarks/bench_estimate.py, 15 configurations of vbhal presets and Hugging
Face GPT-2 / Llama configs): peak allocated within 1% of ``max_memory_allocated`` except the SDPA
math path (-4%).

The planner (`plan`) searches the optimizations (flash attention, bf16 autocast, gradient
checkpointing, FP4 when allowed, offload to the host/disk tiers) and the batch size against a
budget per tier, and returns a `Plan` that `optimize(..., tiers="auto")` and
``vbhal train --vgpu-auto`` consume through `Plan.to_optimize_overrides()`.

Example::

    import vbhal
    from vbhal.estimate import format_estimate, format_plan

    est = vbhal.estimate("medium", batch_size=16, seq_length=1024)
    print(format_estimate(est))                  # or: vbhal estimate --config medium ...
    p = vbhal.plan("medium", gpu_mem="8GB", seq_length=1024, global_batch=64)
    print(format_plan(p)); overrides = p.to_optimize_overrides()
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import weakref
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

import torch
import torch.nn as nn
import torch.nn.functional as F

from vbhal.errors import EstimateError

__all__ = [
    "estimate", "plan", "format_estimate", "format_plan", "parse_bytes",
    "MemoryEstimate", "LayerActivation", "TierUsage", "Plan", "Optimization", "TierLevel",
    "EstimateError", "FP4_BITS_PER_ELEMENT", "PRECISIONS", "OPTIMIZERS", "ATTENTIONS",
]

# ----------------------------------------------------------------------------------------------- constants

#: Bits per weight element of the FP4 formats, scales included.
#: MXFP4 (OCP Microscaling Formats v1.0, sec. 5.3): 4-bit E2M1 codes + one 8-bit E8M0 scale per
#: block of 32 -> 4 + 8/32 = 4.25. NVFP4 (NVIDIA Blackwell): E2M1 codes + one 8-bit E4M3 scale per
#: block of 16 -> 4 + 8/16 = 4.5 (plus one FP32 tensor scale per tensor, counted separately).
FP4_BITS_PER_ELEMENT = {"mxfp4": 4.25, "nvfp4": 4.5}
_FP4_BLOCK = {"mxfp4": 32, "nvfp4": 16}

#: precision -> (parameter dtype, autocast dtype or None). Lightning's names; "bf16" = bf16-mixed.
PRECISIONS: dict[str, tuple[torch.dtype, torch.dtype | None]] = {
    "fp32": (torch.float32, None),
    "bf16-mixed": (torch.float32, torch.bfloat16),
    "fp16-mixed": (torch.float32, torch.float16),
    "bf16-true": (torch.bfloat16, None),
    "fp16-true": (torch.float16, None),
}
_PRECISION_ALIASES = {"float32": "fp32", "32": "fp32", "none": "fp32", "no": "fp32",
                      "bf16": "bf16-mixed", "bfloat16": "bf16-mixed", "mixed": "bf16-mixed",
                      "amp": "bf16-mixed", "fp16": "fp16-mixed", "16-mixed": "fp16-mixed",
                      "float16": "fp16-mixed", "bf16-pure": "bf16-true", "fp16-pure": "fp16-true"}

OPTIMIZERS = ("adamw", "adam", "sgd", "sgd-momentum", "none")
#: "flash": O(S) attention (flash / memory-efficient kernels, vbhal's attention kernel);
#: "math": SDPA's math path, O(S^2) scores saved; "eager": the model's own attention code
#: (for Hugging Face models attn_implementation="eager"); "model": leave whatever the model calls.
ATTENTIONS = ("flash", "math", "eager", "model")

#: cuBLAS keeps a workspace per (handle, stream) in the caching allocator: the forward thread and
#: autograd's backward thread use different handles, so two workspaces are live during training.
#: Size: PyTorch's default CUBLAS_WORKSPACE_CONFIG ":4096:8" on sm90 (Hopper) = 8 x 4 MiB = 32 MiB,
#: ":4096:2:16:8" elsewhere = 8.125 MiB (aten/src/ATen/cuda/CublasHandlePool.cpp).
_CUBLAS_WORKSPACE = {"sm90": 32 * 2**20, "default": 4096 * 1024 * 2 + 16 * 1024 * 8}
_CUBLAS_HANDLES_IN_TRAINING = 2
#: The CUDA caching allocator rounds every block to 512 bytes (c10/cuda/CUDACachingAllocator.cpp,
#: kMinBlockSize), and max_memory_allocated counts the rounded sizes.
_CUDA_ROUND = 512
#: What the CUDA caching allocator needs beyond the live bytes when memory is short: before it
#: reports OOM it releases every cached free segment and retries, so only the free space inside
#: partly used segments (block splitting, 2 MiB / 20 MiB segments of small and mid-size blocks) is
#: lost. Used for "fits" (planner, tier capacity).
_PRESSURE_MARGIN = 0.03
_PRESSURE_SLACK = 64 * 2**20
#: max_memory_reserved / max_memory_allocated without a cap (cached blocks kept), measured on an
#: H100 over 15 configurations (benchmarks/results/estimate-*.json): median 1.05; about 1.3 with
#: gradient checkpointing. Used only where the allocator model does not run (see `estimate`).
_RESERVED_FACTOR = 1.05
_RESERVED_FACTOR_CKPT = 1.30
#: Offload (mode "memory"): working copies of this many repeated blocks stay on the device
#: (the one computing and the one being prefetched), DESIGN.md "Memory tiers".
_OFFLOAD_RESIDENT_BLOCKS = 2

_UNITS = {"": 1, "b": 1,
          "k": 1024, "kb": 1000, "kib": 1024,
          "m": 1024**2, "mb": 1000**2, "mib": 1024**2,
          "g": 1024**3, "gb": 1000**3, "gib": 1024**3,
          "t": 1024**4, "tb": 1000**4, "tib": 1024**4}


def parse_bytes(value: int | float | str | None, *, what: str = "size") -> int | None:
    """Parse a memory size: ``8GB`` (10^9), ``8 GiB`` / ``8G`` (2^30), ``512MiB``, ``1.5TB`` or bytes.

    None stays None. Anything else is an `EstimateError` saying what was expected.
    """
    if value is None:
        return None
    if isinstance(value, bool):
        raise EstimateError(f"{what}: expected a size such as '8GB' or '8 GiB', got {value!r}")
    if isinstance(value, (int, float)):
        n = float(value)
    else:
        m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:[eE][0-9]+)?)\s*([A-Za-z]*)\s*", str(value))
        if not m or m.group(2).lower() not in _UNITS:
            raise EstimateError(
                f"{what}: cannot parse {value!r} as a size; write a number with an optional unit, "
                f"e.g. '8GB' (10^9 bytes), '8 GiB' or '8G' (2^30 bytes), '512MiB', '1.5TB'")
        n = float(m.group(1)) * _UNITS[m.group(2).lower()]
    if not math.isfinite(n) or n <= 0:
        raise EstimateError(f"{what}: must be a positive size, got {value!r}")
    return int(n)


def _positive_int(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise EstimateError(f"{name} must be a positive integer, got {value!r}")
    return value


def _norm_precision(precision: str) -> str:
    key = str(precision).strip().lower()
    key = _PRECISION_ALIASES.get(key, key)
    if key not in PRECISIONS:
        raise EstimateError(f"unknown precision {precision!r}; choose one of {', '.join(PRECISIONS)} "
                            f"(aliases: {', '.join(sorted(_PRECISION_ALIASES))})")
    return key


# ----------------------------------------------------------------------------------------------- results

@dataclass
class LayerActivation:
    """Activation memory of one layer (a repeated block, or a top-level module such as the head).

    `saved_bytes`: what autograd keeps for backward when the layer is not checkpointed;
    `checkpointed_bytes`: what it keeps when it is (the block's input only; None for layers that
    are not checkpointable blocks); `attention_bytes`: the part saved by attention itself.
    """

    name: str
    saved_bytes: int
    checkpointed_bytes: int | None = None
    attention_bytes: int = 0


@dataclass
class TierUsage:
    """Bytes one memory tier holds at the peak of a training step, by category."""

    name: str  # "device", "host", "disk"
    level: int
    parameters: int = 0
    gradients: int = 0
    optimizer_state: int = 0
    activations: int = 0
    temporaries: int = 0
    workspace: int = 0
    allocator_overhead: int = 0
    capacity: int | None = None
    #: set when the allocator model replayed the step under `capacity` (CUDA): its verdict
    fits_override: bool | None = None

    @property
    def total(self) -> int:
        return (self.parameters + self.gradients + self.optimizer_state + self.activations
                + self.temporaries + self.workspace + self.allocator_overhead)

    @property
    def fits(self) -> bool | None:
        if self.capacity is None:
            return None
        return self.fits_override if self.fits_override is not None else self.total <= self.capacity


@dataclass
class MemoryEstimate:
    """The memory of one training step, per category, per tier and at the peak.

    All sizes are bytes on the device unless the attribute says otherwise. `peak_allocated` is what
    ``torch.cuda.max_memory_allocated()`` reports after a few steps. `peak_reserved` is what
    ``max_memory_reserved()`` shows when memory is plentiful (the caching allocator keeps freed
    blocks; an empirical factor). What must fit under a device's capacity is the device tier's
    total: the peak plus the allocator's margin when memory is short (`allocator_overhead`).
    """

    model: str
    setup: dict[str, Any]
    num_parameters: int
    num_trainable: int
    parameters: int            # weights (FP4-packed where quantized) and buffers
    gradients: int
    optimizer_state: int
    activations: int           # live at the peak: saved for backward + outputs not yet consumed
    autocast_copies: int       # low-precision weight copies autocast caches (part of activations' life)
    temporaries: int           # backward / optimizer temporaries live at the peak
    workspace: int             # framework workspace (cuBLAS)
    peak_allocated: int
    peak_reserved: int
    peak_phase: str            # "forward", "backward" or "optimizer"
    activations_total_saved: int  # everything autograd saved in forward (checkpointing applied)
    optimizer_temporaries: int
    layers: list[LayerActivation] = field(default_factory=list)
    tiers: list[TierUsage] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    trace_seconds: float = 0.0

    @property
    def allocator_overhead(self) -> int:
        """Margin the caching allocator needs beyond the peak when memory is short."""
        return self.tiers[0].allocator_overhead if self.tiers else 0

    @property
    def device_need(self) -> int:
        """Bytes the device (or, on CPU, the host) must offer for this step: peak + margin."""
        return self.tiers[0].total if self.tiers else self.peak_allocated

    def tier(self, name: str) -> TierUsage:
        for t in self.tiers:
            if t.name == name:
                return t
        raise KeyError(name)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["allocator_overhead"] = self.allocator_overhead
        for t, td in zip(self.tiers, d["tiers"]):
            td["total"] = t.total
            td["fits"] = t.fits
        return d


# ----------------------------------------------------------------------------------------------- model resolution

@dataclass
class _ModelSpec:
    module: nn.Module
    name: str
    kind: str                     # "vbhal", "hf", "module"
    vocab_size: int | None
    max_seq: int | None
    n_blocks: int | None = None   # when built with fewer (identical) blocks than the model has


def _vbhal_presets() -> dict[str, Any]:
    try:
        from vbhal.train.model import PRESETS
    except ImportError:  # pragma: no cover - the training package is part of vbhal
        return {}
    return PRESETS


def _load_hf_config(path: str | os.PathLike):
    try:
        import transformers
    except ImportError as e:  # pragma: no cover - transformers is an optional dependency
        raise EstimateError("estimating a Hugging Face config needs `transformers`: pip install transformers") from e
    p = Path(path)
    if not p.exists():
        raise EstimateError(f"config file {str(p)!r} does not exist; pass a preset name "
                            f"({', '.join(sorted(_vbhal_presets()))}) or a path to a Hugging Face config.json")
    try:
        if p.is_dir():
            return transformers.AutoConfig.from_pretrained(str(p), local_files_only=True)
        data = json.loads(p.read_text())
        if not isinstance(data, dict):
            raise ValueError("expected a JSON object")
        model_type = data.pop("model_type", None)
        if model_type is None:
            raise ValueError("it has no 'model_type' key")
        return transformers.AutoConfig.for_model(model_type, **data)
    except EstimateError:
        raise
    except Exception as e:  # json errors, unknown model_type, transformers validation
        raise EstimateError(f"cannot read {str(p)!r} as a Hugging Face model config ({e}); "
                            f"it must be a config.json with a 'model_type' key") from None


def _hf_max_seq(cfg) -> int | None:
    for key in ("max_position_embeddings", "n_positions", "max_seq_len", "seq_length"):
        v = getattr(cfg, key, None)
        if isinstance(v, int) and v > 0:
            return v
    return None


def _check_hf_shapes(cfg) -> None:
    hidden = getattr(cfg, "hidden_size", None) or getattr(cfg, "n_embd", None)
    heads = getattr(cfg, "num_attention_heads", None) or getattr(cfg, "n_head", None)
    for key in ("hidden_size", "n_embd", "num_attention_heads", "n_head", "num_hidden_layers", "n_layer",
                "vocab_size", "intermediate_size"):
        v = getattr(cfg, key, None)
        if v is not None and (not isinstance(v, int) or isinstance(v, bool) or v <= 0):
            raise EstimateError(f"Hugging Face config: {key} must be a positive integer, got {v!r}")
    if hidden and heads and hidden % heads and getattr(cfg, "head_dim", None) is None:
        raise EstimateError(f"Hugging Face config: hidden size {hidden} is not divisible by the number of "
                            f"attention heads {heads}; fix the config")


#: Config-built models with more blocks than `_SIMULATE_UP_TO` are built with this many (the
#: layer extrapolation needs 3); up to it they are built whole, so the allocator model can replay
#: the full step.
_BUILD_BLOCKS = 3
_SIMULATE_UP_TO = 48


def _build_hf(cfg, attention: str) -> tuple[nn.Module, int | None]:
    """The causal LM of `cfg` on meta, built with `_BUILD_BLOCKS` layers when it has many (its
    layers are identical; `estimate` extrapolates); returns (model, real number of layers)."""
    import copy

    import transformers

    _check_hf_shapes(cfg)
    impl = "eager" if attention == "eager" else "sdpa"
    n = getattr(cfg, "num_hidden_layers", None)
    build = cfg
    if isinstance(n, int) and n > _SIMULATE_UP_TO:
        build = copy.deepcopy(cfg)
        build.num_hidden_layers = _BUILD_BLOCKS
        for key in ("layer_types", "block_types"):  # per-layer lists must match the layer count
            v = getattr(build, key, None)
            if isinstance(v, (list, tuple)) and len(set(v)) > 1:
                build, n = cfg, None  # heterogeneous layers: build them all
                break
            if isinstance(v, (list, tuple)):
                setattr(build, key, list(v)[:_BUILD_BLOCKS])
    else:
        n = None
    try:
        with torch.device("meta"):
            try:
                model = transformers.AutoModelForCausalLM.from_config(build, attn_implementation=impl)
            except ValueError:
                if impl != "sdpa":
                    raise
                # an architecture without an SDPA path: its own (eager) attention is what runs
                model = transformers.AutoModelForCausalLM.from_config(build, attn_implementation="eager")
    except Exception as e:
        raise EstimateError(f"cannot build a causal LM from the Hugging Face config "
                            f"({type(cfg).__name__}): {e}") from None
    return model, n


def _resolve_model(model: Any, attention: str) -> _ModelSpec:
    """Turn what the user gave (module, preset name, config object, config path) into a module."""
    if isinstance(model, _ModelSpec):
        return model
    if isinstance(model, nn.Module):
        vocab = getattr(getattr(model, "config", None), "vocab_size", None)
        kind = "module"
        try:
            from transformers import PreTrainedModel
            if isinstance(model, PreTrainedModel):
                kind = "hf"
        except ImportError:  # pragma: no cover
            pass
        cfg = getattr(model, "config", None)
        if kind == "module" and type(model).__name__ == "GPT" and type(model).__module__ == "vbhal.train.model":
            kind = "vbhal"
        max_seq = getattr(cfg, "seq_length", None) if kind == "vbhal" else (_hf_max_seq(cfg) if cfg else None)
        return _ModelSpec(model, type(model).__name__, kind, vocab, max_seq)

    presets = _vbhal_presets()
    try:
        from vbhal.train.model import GPT, GPTConfig
    except ImportError:  # pragma: no cover
        GPT = GPTConfig = None  # type: ignore[assignment]
    if GPTConfig is not None and (isinstance(model, GPTConfig) or (isinstance(model, str) and model in presets)):
        cfg = presets[model] if isinstance(model, str) else model
        name = f"vbhal:{model}" if isinstance(model, str) else "GPT(custom)"
        n = cfg.num_layers
        few = _BUILD_BLOCKS if n > _SIMULATE_UP_TO else n
        with torch.device("meta"):
            m = GPT(dataclasses.replace(cfg, num_layers=few))
        return _ModelSpec(m, name, "vbhal", cfg.vocab_size, cfg.seq_length, n_blocks=n)
    if isinstance(model, (str, os.PathLike)):
        s = str(model)
        if not (os.sep in s or s.endswith(".json") or Path(s).exists()):
            raise EstimateError(f"unknown model preset {s!r}; choose one of {', '.join(sorted(presets))}, "
                                f"or pass a path to a Hugging Face config.json")
        cfg = _load_hf_config(s)
        m, n = _build_hf(cfg, attention)
        return _ModelSpec(m, f"hf:{getattr(cfg, 'model_type', '?')}", "hf",
                          getattr(cfg, "vocab_size", None), _hf_max_seq(cfg), n_blocks=n)
    try:
        from transformers import PretrainedConfig
    except ImportError:  # pragma: no cover
        PretrainedConfig = None  # type: ignore[assignment]
    if PretrainedConfig is not None and isinstance(model, PretrainedConfig):
        m, n = _build_hf(model, attention)
        return _ModelSpec(m, f"hf:{model.model_type}", "hf", getattr(model, "vocab_size", None),
                          _hf_max_seq(model), n_blocks=n)
    raise EstimateError(f"cannot estimate {type(model).__name__}: pass an nn.Module, a preset name "
                        f"({', '.join(sorted(presets))}), a GPTConfig, a transformers PretrainedConfig or "
                        f"a path to a Hugging Face config.json")


# ----------------------------------------------------------------------------------------------- the tracer

class _Alloc:
    __slots__ = ("nbytes", "t0", "t1", "phase", "tag")

    def __init__(self, nbytes: int, t0: int, phase: str, tag: str):
        self.nbytes, self.t0, self.t1, self.phase, self.tag = nbytes, t0, None, phase, tag


class _AllocationTracker(torch.utils._python_dispatch.TorchDispatchMode):
    """Sees every storage an op creates and, through a weak reference, when it is freed.

    Times are op counts. `phase` and `tag` label new allocations (set by the step driver).
    """

    def __init__(self, round_to: int = 1):
        super().__init__()
        from torch.utils.weak import WeakIdKeyDictionary

        self.round_to = round_to
        self.seen = WeakIdKeyDictionary()
        self.allocs: list[_Alloc] = []
        self.clock = 0
        self.current = 0
        self.peak = 0
        self.peak_time = 0
        self.phase = "forward"
        self.tag = "activation"
        self.data_dependent = 0
        # peak per segment of the step (("F", block) in forward, ("B", block) in backward): what
        # the layer extrapolation of `estimate` works with
        self.segment: tuple = ("F", "pre")
        self.segments: list[tuple] = [self.segment]
        self.seg_peaks: dict[tuple, tuple[int, int]] = {}

    def enter(self, segment: tuple) -> None:
        if segment == self.segment:
            return
        self.segment = segment
        self.segments.append(segment)
        self._seg_update()

    def _seg_update(self) -> None:
        sp = self.seg_peaks.get(self.segment)
        if sp is None or self.current > sp[0]:
            self.seg_peaks[self.segment] = (self.current, self.clock)

    def ignore(self, t: torch.Tensor) -> None:
        """Storage that exists before the step (a parameter, a buffer): views of it are not new memory."""
        self.seen[t.untyped_storage()] = None

    def _round(self, n: int) -> int:
        r = self.round_to
        return n if r <= 1 else (n + r - 1) // r * r

    def track(self, t: torch.Tensor, tag: str | None = None) -> _Alloc | None:
        try:
            st = t.untyped_storage()
        except Exception:  # sparse / nested / opaque tensors: no plain storage
            return None
        if st in self.seen:
            return self.seen[st]  # None for pre-existing storage
        a = _Alloc(self._round(st.nbytes()), self.clock, self.phase, tag or self.tag)
        self.seen[st] = a
        self.allocs.append(a)
        self.current += a.nbytes
        if self.current > self.peak:
            self.peak, self.peak_time = self.current, self.clock
        self._seg_update()
        weakref.finalize(st, self._free, a)
        return a

    def _free(self, a: _Alloc) -> None:
        if a.t1 is None:
            a.t1 = self.clock
            self.current -= a.nbytes

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten._local_scalar_dense.default and args[0].is_meta:
            # Data-dependent Python control flow (`if mask.all():`) on meta tensors: answer as for
            # plain inputs -- True for checks such as "no packed sequences", 1 for numbers.
            self.data_dependent += 1
            dt = args[0].dtype
            return True if dt == torch.bool else (1.0 if dt.is_floating_point else 1)
        out = func(*args, **(kwargs or {}))
        self.clock += 1
        for t in torch.utils._pytree.tree_leaves(out):
            if isinstance(t, torch.Tensor):
                self.track(t)
        self.clock += 1
        return out

    def live_at(self, time: int) -> list[_Alloc]:
        return [a for a in self.allocs if a.t0 <= time and (a.t1 is None or a.t1 > time)]


# CUDA autocast's op lists (aten/src/ATen/autocast_mode.cpp, "lower_precision_fp" and "fp32"
# categories), by the name torch functions and Tensor methods carry.
_AUTOCAST_LOW = frozenset({
    "linear", "matmul", "__matmul__", "__rmatmul__", "mm", "bmm", "addmm", "addbmm", "baddbmm", "addmv",
    "addr", "mv", "chain_matmul", "multi_dot", "conv1d", "conv2d", "conv3d", "conv_transpose1d",
    "conv_transpose2d", "conv_transpose3d", "conv_tbc", "prelu", "scaled_dot_product_attention",
    "_convolution", "convolution", "cudnn_convolution", "lstm_cell", "gru_cell", "rnn_tanh_cell",
    "rnn_relu_cell", "einsum"})
_AUTOCAST_FP32 = frozenset({
    "acos", "asin", "cosh", "erfinv", "exp", "expm1", "log", "log10", "log2", "log1p", "reciprocal",
    "rsqrt", "sinh", "tan", "pow", "__pow__", "__rpow__", "softplus", "layer_norm", "group_norm",
    "frobenius_norm", "nuclear_norm", "cosine_similarity", "poisson_nll_loss", "cosine_embedding_loss",
    "nll_loss", "nll_loss2d", "hinge_embedding_loss", "kl_div", "l1_loss", "smooth_l1_loss", "huber_loss",
    "mse_loss", "margin_ranking_loss", "multilabel_margin_loss", "soft_margin_loss",
    "triplet_margin_loss", "multi_margin_loss", "binary_cross_entropy_with_logits", "dist", "pdist",
    "cdist", "renorm", "logsumexp", "prod", "softmax", "log_softmax", "cumprod", "cumsum", "sum",
    "norm", "cross_entropy", "normalize", "softmin"})


def _bshd(like: torch.Tensor, last: int | None = None) -> torch.Tensor:
    """A (B, H, S, D) tensor laid out as (B, S, H, D), as the flash / memory-efficient kernels
    allocate their outputs and gradients: transposing it back to (B, S, H*D) is then free."""
    *lead, h, s_, d = like.shape
    d = d if last is None else last
    return torch.empty(*lead, s_, h, d, dtype=like.dtype, device=like.device).transpose(-3, -2)


class _FlashAttentionSim(torch.autograd.Function):
    """What a flash / memory-efficient attention kernel keeps: q, k, v, the output and the
    log-sum-exp (B, H, S) in fp32 -- O(S) -- and, in backward, an fp32 dq accumulator (FA2)."""

    @staticmethod
    def forward(ctx, q, k, v):
        out = _bshd(q, v.shape[-1])
        lse = torch.empty(q.shape[:-1], dtype=torch.float32, device=q.device)
        ctx.save_for_backward(q, k, v, out, lse)
        return out

    @staticmethod
    def backward(ctx, g):
        q, k, v, out, lse = ctx.saved_tensors
        dq_accum = torch.empty(q.shape, dtype=torch.float32, device=q.device)  # noqa: F841 (FA2 workspace)
        softmax_d = torch.empty(lse.shape, dtype=torch.float32, device=q.device)  # noqa: F841
        dq, dk, dv = _bshd(q), _bshd(k), _bshd(v)
        del dq_accum, softmax_d
        return dq, dk, dv


def _math_attention(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False,
                    fused_dropout=True):
    """SDPA's math path as aten's _scaled_dot_product_attention_math runs it: fp16/bf16 inputs are
    computed in fp32 (PyTorch >= 2.5), the mask is added in place, and the (B, H, S, S) fp32 scores
    are saved for backward -- O(S^2)."""
    dt = q.dtype
    if dt in (torch.float16, torch.bfloat16):
        q, k, v = q.float(), k.float(), v.float()
    if k.shape[-3] != q.shape[-3]:
        rep = q.shape[-3] // k.shape[-3]
        k, v = k.repeat_interleave(rep, dim=-3), v.repeat_interleave(rep, dim=-3)
    s = math.sqrt(scale if scale is not None else 1.0 / math.sqrt(q.shape[-1]))
    attn = (q * s) @ (k * s).transpose(-2, -1)
    if is_causal:
        keep = torch.ones(q.shape[-2], k.shape[-2], dtype=torch.bool, device=q.device).tril()
        attn = attn + torch.where(keep.logical_not(), float("-inf"), torch.zeros((), device=q.device))
    if attn_mask is not None:
        if attn_mask.dtype == torch.bool:
            attn_mask = torch.where(attn_mask.logical_not(), float("-inf"), torch.zeros((), device=q.device))
        attn = attn + attn_mask
    # _safe_softmax (fully masked rows -> 0): softmax, an -inf mask and a where; saves its result
    safe = getattr(torch.ops.aten, "_safe_softmax", None)
    attn = safe.default(attn, -1) if safe is not None else torch.softmax(attn, dim=-1)
    if dropout_p > 0:
        attn = _FusedDropoutSim.apply(attn, dropout_p) if fused_dropout else F.dropout(attn, dropout_p)
    out = (attn @ v).to(dt)
    weights = attn.to(dt)  # aten returns the weights too (SDPA drops them): a transient copy
    del weights
    return out


class _FusedDropoutSim(torch.autograd.Function):
    """CUDA's fused dropout (aten native_dropout): the output plus a 1-byte mask saved for backward.
    Meta (and CPU) tensors take the unfused path, whose mask has the input's dtype."""

    @staticmethod
    def forward(ctx, x, p):
        mask = torch.empty(x.shape, dtype=torch.bool, device=x.device)
        ctx.save_for_backward(mask)
        return torch.empty_like(x)

    @staticmethod
    def backward(ctx, g):
        return torch.empty_like(g), None


def _fused_dropout_applies(x: Any, p: float, training: bool) -> bool:
    return isinstance(x, torch.Tensor) and training and 0.0 < p < 1.0 and x.numel() > 0


class _FP4LinearSim(torch.autograd.Function):
    """An FP4 linear layer: the packed weight is frozen, only x is saved; with `dequant_temp` the
    weight is dequantized to x's dtype for the matmul (the reference path), else used in place
    (a fused kernel)."""

    @staticmethod
    def forward(ctx, x, bias, n, k, dequant_temp):
        ctx.n, ctx.k, ctx.dequant_temp, ctx.has_bias = n, k, dequant_temp, bias is not None
        ctx.save_for_backward(x)
        w = torch.empty(n, k, dtype=x.dtype, device=x.device) if dequant_temp else None
        out = torch.empty(x.shape[:-1] + (n,), dtype=x.dtype, device=x.device)
        del w
        return out

    @staticmethod
    def backward(ctx, g):
        (x,) = ctx.saved_tensors
        w = torch.empty(ctx.n, ctx.k, dtype=g.dtype, device=g.device) if ctx.dequant_temp else None
        gx = torch.empty_like(x)
        del w
        gb = g.sum(tuple(range(g.dim() - 1))) if ctx.has_bias else None
        return gx, gb, None, None, None


class _StepSemantics(torch.overrides.TorchFunctionMode):
    """Forward-time semantics of the training step that meta tensors cannot give by themselves:
    CUDA autocast (op lists + weight-cast cache), the attention kernel, FP4 linear layers."""

    def __init__(self, tracker: _AllocationTracker, autocast: torch.dtype | None, attention: str,
                 fp4_weights: Mapping[int, tuple[int, int]], fp4_dequant_temp: bool,
                 fused_dropout: bool = True):
        super().__init__()
        self.fused_dropout = fused_dropout
        self.tracker = tracker
        self.autocast = autocast
        self.attention = attention
        self.fp4 = fp4_weights
        self.fp4_dequant_temp = fp4_dequant_temp
        self.cache: dict[int, torch.Tensor] = {}
        self.attention_saved: list[torch.Tensor] = []
        self.enabled = True
        self.active = False

    def __enter__(self):
        self.active = True
        return super().__enter__()

    def __exit__(self, *exc):
        self.active = False
        return super().__exit__(*exc)

    def _cast(self, t: Any, dtype: torch.dtype) -> Any:
        if not (isinstance(t, torch.Tensor) and t.is_floating_point() and t.dtype != dtype
                and t.dtype != torch.float64):
            return t
        if t.is_leaf and t.requires_grad:  # autocast caches casts of weights until it exits
            hit = self.cache.get(id(t))
            if hit is None:
                old = self.tracker.tag
                self.tracker.tag = "autocast"
                hit = t.to(dtype)
                self.tracker.tag = old
                self.cache[id(t)] = hit
            return hit
        return t.to(dtype)

    def _cast_all(self, args, kwargs, dtype):
        cast = lambda x: self._cast(x, dtype)  # noqa: E731
        args = tuple(cast(a) if not isinstance(a, (list, tuple)) else type(a)(cast(x) for x in a) for a in args)
        kwargs = {k: cast(v) for k, v in kwargs.items()}
        return args, kwargs

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if not self.enabled:
            return func(*args, **kwargs)
        name = getattr(func, "__name__", "")
        if name == "linear" and self.fp4:
            w = args[1] if len(args) > 1 else kwargs.get("weight")
            if w is not None and id(w) in self.fp4:
                n, k = self.fp4[id(w)]
                x = args[0] if args else kwargs["input"]
                bias = args[2] if len(args) > 2 else kwargs.get("bias")
                if self.autocast is not None:
                    x = self._cast(x, self.autocast)
                    bias = self._cast(bias, self.autocast)
                return _FP4LinearSim.apply(x, bias, n, k, self.fp4_dequant_temp)
        if name == "addmm" and self.fp4 and len(args) >= 3 and id(args[2]) in self.fp4:
            # transformers Conv1D: addmm(bias, x2d, W) with W stored (in, out)
            n, k = self.fp4[id(args[2])]
            x, bias = args[1], args[0]
            if self.autocast is not None:
                x, bias = self._cast(x, self.autocast), self._cast(bias, self.autocast)
            return _FP4LinearSim.apply(x, bias, n, k, self.fp4_dequant_temp)
        if self.autocast is not None:
            if name in _AUTOCAST_LOW:
                args, kwargs = self._cast_all(args, kwargs, self.autocast)
            elif name in _AUTOCAST_FP32:
                args, kwargs = self._cast_all(args, kwargs, torch.float32)
        if name == "scaled_dot_product_attention" and self.attention in ("flash", "math"):
            return self._attention(*args, **kwargs)
        if name == "dropout" and self.fused_dropout:
            x = args[0] if args else kwargs.get("input")
            p = args[1] if len(args) > 1 else kwargs.get("p", 0.5)
            training = args[2] if len(args) > 2 else kwargs.get("training", True)
            inplace = args[3] if len(args) > 3 else kwargs.get("inplace", False)
            if _fused_dropout_applies(x, p, training) and not inplace:
                return _FusedDropoutSim.apply(x, p)
        return func(*args, **kwargs)

    def _attention(self, q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None,
                   enable_gqa=False):
        before = self.tracker.current
        gqa = k.shape[-3] != q.shape[-3]
        if self.attention == "flash" and gqa and q.dtype == torch.float32 and self.fused_dropout:
            # CUDA: fp32 rules out flash attention, and the memory-efficient kernel has no GQA:
            # PyTorch's SDPA falls back to its math path (O(S^2)) -- so do we.
            self.math_fallbacks = getattr(self, "math_fallbacks", 0) + 1
            out = _math_attention(q, k, v, attn_mask, dropout_p, is_causal, scale, enable_gqa, True)
        elif self.attention == "flash" and dropout_p > 0 and not self.fused_dropout:
            # CPU: the flash kernel has no dropout; SDPA takes its math path (O(S^2))
            self.math_fallbacks = getattr(self, "math_fallbacks", 0) + 1
            out = _math_attention(q, k, v, attn_mask, dropout_p, is_causal, scale, enable_gqa, False)
        elif self.attention == "flash":
            out = _FlashAttentionSim.apply(q, k, v)
        else:
            out = _math_attention(q, k, v, attn_mask, dropout_p, is_causal, scale, enable_gqa, self.fused_dropout)
        self.attention_bytes = getattr(self, "attention_bytes", 0) + max(0, self.tracker.current - before)
        return out


def _find_blocks(model: nn.Module) -> tuple[str, list[nn.Module]]:
    """The repeated blocks: the ModuleList of same-class children holding the most parameters."""
    best, best_name, best_n = [], "", -1
    for name, mod in model.named_modules():
        if isinstance(mod, nn.ModuleList) and len(mod) >= 1:
            kinds = {type(c) for c in mod}
            if len(kinds) != 1:
                continue
            n = sum(p.numel() for p in mod.parameters())
            if n > best_n:
                best, best_name, best_n = list(mod), name, n
    return best_name, best


try:  # the FP4 swap's own rules, so the estimate quantizes exactly the layers optimize() does
    from vbhal.nn.fp4_linear import DEFAULT_KEEP_NAMES as _KEEP_NAMES, ROUTER_MAX_OUT_FEATURES as _ROUTER_MAX
except ImportError:  # pragma: no cover - FP4Linear is part of vbhal
    _KEEP_NAMES, _ROUTER_MAX = ("lm_head", "head", "classifier"), 512


def _is_hf_conv1d(m: nn.Module) -> bool:
    return type(m).__name__ == "Conv1D" and type(m).__module__.startswith("transformers") and hasattr(m, "nf")


def _linear_nk(m: nn.Module) -> tuple[int, int]:
    """(out_features, in_features) of an nn.Linear or a transformers Conv1D (weight stored (in, out))."""
    w = m.weight
    return (w.shape[1], w.shape[0]) if _is_hf_conv1d(m) else (w.shape[0], w.shape[1])


def _fp4_linears(model: nn.Module, fmt: str = "mxfp4") -> list[tuple[str, nn.Module]]:
    """The layers `vbhal.nn.fp4_linear.swap_linears` quantizes by default: plain nn.Linear (and
    transformers Conv1D) except output heads, embeddings, tied weights, MoE routers/gates and layers
    narrower than one block -- kept in high precision (DESIGN.md, "FP4 quality surprises")."""
    owners: dict[int, int] = {}
    for mod in model.modules():
        for p in mod.parameters(recurse=False):
            owners[id(p)] = owners.get(id(p), 0) + 1
    out = []
    for name, m in model.named_modules():
        if not (type(m) is nn.Linear or _is_hf_conv1d(m)) or not name:
            continue
        parts = name.split(".")
        last = parts[-1]
        n, k = _linear_nk(m)
        if any(p in _KEEP_NAMES for p in parts) or last == "output" or any("embed" in p for p in parts):
            continue
        if owners.get(id(m.weight), 0) > 1:
            continue
        if (last in ("router", "gate") or last.endswith(("_router", "_gate"))) and n <= _ROUTER_MAX:
            continue
        if k < _FP4_BLOCK[fmt]:
            continue
        out.append((name, m))
    return out


def _fp4_nbytes(n: int, k: int, fmt: str) -> int:
    """Bytes of an (n, k) FP4 weight as `QuantizedWeight` stores it (K padded to the block)."""
    block = _FP4_BLOCK[fmt]
    kp = (k + block - 1) // block * block
    codes = n * kp // 2
    scales = n * kp // block  # one byte per scale: E8M0 (mxfp4) / E4M3 (nvfp4)
    return codes + scales + (4 if fmt == "nvfp4" else 0)


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


@dataclass
class _Trace:
    peak_fb: int                 # forward + backward peak (params excluded), incl. grads and inputs
    peak_fb_phase: str
    fb_breakdown: dict[str, int]
    step_extra_peak: int         # optimizer phase peak above what backward left (state + temporaries)
    after_backward: int          # live after backward: gradients, the batch
    opt_state: int
    opt_temporaries: int
    grads: int
    saved_total: int
    layers: list[LayerActivation]
    attention_saved: int
    n_blocks: int = 0
    # every allocation: (t_alloc, t_free or None, bytes, phase, is_gradient, tag) -- the allocator model's input
    timeline: list[tuple] = field(default_factory=list)
    segments: list[tuple] = field(default_factory=list)
    seg_peaks: dict[tuple, int] = field(default_factory=dict)
    seg_breakdown: dict[tuple, dict[str, int]] = field(default_factory=dict)


def _make_inputs(spec: _ModelSpec, batch: int, seq: int, example_inputs) -> tuple[tuple, dict]:
    if example_inputs is not None:
        data = example_inputs(batch, seq) if callable(example_inputs) else example_inputs
        if isinstance(data, dict):
            return (), {k: _to_meta(v) for k, v in data.items()}
        if isinstance(data, torch.Tensor):
            return (_to_meta(data),), {}
        return tuple(_to_meta(a) for a in data), {}
    if spec.vocab_size is None:
        raise EstimateError(f"{spec.name}: cannot guess the inputs of this model; pass "
                            f"example_inputs=lambda batch, seq: (tensor, ...) (meta tensors are fine)")
    ids = torch.empty(batch, seq, dtype=torch.long, device="meta")
    labels = torch.empty(batch, seq, dtype=torch.long, device="meta")
    if spec.kind == "hf":
        return (), {"input_ids": ids, "labels": labels, "use_cache": False}
    return (ids, labels), {}


def _to_meta(t):
    return torch.empty_like(t, device="meta") if isinstance(t, torch.Tensor) else t


def _loss_of(out) -> torch.Tensor:
    """The scalar to call backward on: `.loss`, a (logits, loss) tuple's loss, or the mean of the output."""
    loss = getattr(out, "loss", None)
    if loss is None and isinstance(out, dict):
        loss = out.get("loss")
    if loss is None and isinstance(out, (tuple, list)) and len(out) == 2 and isinstance(out[1], torch.Tensor) \
            and out[1].dim() == 0:
        loss = out[1]
    if loss is None:
        t = out[0] if isinstance(out, (tuple, list)) else out
        loss = t.float().mean()
    return loss


def _trace_step(spec: _ModelSpec, *, batch: int, seq: int, param_dtype: torch.dtype,
                autocast: torch.dtype | None, attention: str, checkpointing: bool,
                optimizer: str, impl: str, fp4: str | None, fp4_dequant_temp: bool,
                round_to: int, example_inputs, loss_fn, device_kind: str = "cuda",
                keep_blocks: int | None = None) -> _Trace:
    """Run one training step of `spec.module` on meta tensors under the allocation tracker.

    `keep_blocks`: run only the first repeated blocks (the layer extrapolation of `estimate`).
    """
    model = spec.module
    blocks_name, blocks = _find_blocks(model)
    dropped_ids: set[int] = set()
    dropped_prefixes: tuple[str, ...] = ()
    if keep_blocks is not None and keep_blocks < len(blocks):
        dropped_ids = {id(p) for b in blocks[keep_blocks:] for p in b.parameters()}
        dropped_prefixes = tuple(f"{blocks_name}.{i}." for i in range(keep_blocks, len(blocks)))
        blocks = blocks[:keep_blocks]
    else:
        keep_blocks = None
    block_ids = {id(b): f"{blocks_name}.{i}" for i, b in enumerate(blocks)}
    block_index = {id(b): i for i, b in enumerate(blocks)}

    # Meta stand-ins for every parameter and buffer (the user's module is never modified).
    fp4_shapes = {f"{n}.weight": _linear_nk(m) for n, m in _fp4_linears(model, fp4)} if fp4 else {}
    fp4_weight_names = set(fp4_shapes)
    params: dict[str, torch.Tensor] = {}
    by_id: dict[int, torch.Tensor] = {}
    fp4_ids: dict[int, tuple[int, int]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        if name.startswith(dropped_prefixes) and dropped_prefixes:
            continue
        if id(p) in by_id:
            params[name] = by_id[id(p)]
            continue
        frozen = (not p.requires_grad) or name in fp4_weight_names
        dt = param_dtype if p.is_floating_point() else p.dtype
        mp = torch.empty(p.shape, dtype=dt, device="meta", requires_grad=not frozen)
        if name in fp4_weight_names:
            fp4_ids[id(mp)] = fp4_shapes[name]
        by_id[id(p)] = mp
        params[name] = mp
    for name, b in model.named_buffers(remove_duplicate=False):
        if dropped_prefixes and name.startswith(dropped_prefixes):
            continue
        params[name] = torch.empty(b.shape, dtype=b.dtype, device="meta")
    trainable = [t for i, t in by_id.items() if t.requires_grad and i not in dropped_ids]

    tracker = _AllocationTracker(round_to)
    for t in params.values():
        tracker.ignore(t)
    sem = _StepSemantics(tracker, autocast, attention, fp4_ids, fp4_dequant_temp,
                         fused_dropout=device_kind == "cuda")

    # Per-layer saved-tensor attribution: forward pre/post hooks keep the current layer.
    stack: list[str] = []
    saved_by_layer: dict[str, int] = {}
    saved_storages = set()
    param_storages = set()
    ckpt_input: dict[str, int] = {}
    top_names = {id(m): n for n, m in model.named_children()}

    def layer_of(mod) -> str | None:
        return block_ids.get(id(mod)) or top_names.get(id(mod))

    def enter_on_grad(t: Any, segment: tuple) -> None:
        if isinstance(t, torch.Tensor) and t.requires_grad:
            t.register_hook(lambda g: tracker.enter(segment))

    def pre_hook(mod, args):
        j = block_index.get(id(mod))
        if j is not None and sem.active:
            tracker.enter(("F", j))
            # the gradient of a block's input is complete when its backward is done
            x = next((a for a in torch.utils._pytree.tree_leaves(args) if isinstance(a, torch.Tensor)), None)
            enter_on_grad(x, ("B", j - 1) if j > 0 else ("B", "pre"))
        name = layer_of(mod)
        if name is not None:
            stack.append(name)
            if id(mod) in block_ids and name not in ckpt_input:
                ckpt_input[name] = sum(_nbytes(a) for a in torch.utils._pytree.tree_leaves(args)
                                       if isinstance(a, torch.Tensor))

    def post_hook(mod, args, out):
        j = block_index.get(id(mod))
        if j is not None and sem.active:
            tracker.enter(("F", "post") if j == len(blocks) - 1 else ("F", j))
            y = next((a for a in torch.utils._pytree.tree_leaves(out) if isinstance(a, torch.Tensor)), None)
            enter_on_grad(y, ("B", j))  # its gradient complete: this block's backward starts
        if layer_of(mod) is not None and stack:
            stack.pop()

    def pack(t):
        try:
            st = t.untyped_storage()
            key = (id(st), st.nbytes())
        except Exception:
            return t
        # a saved parameter (or its view) costs nothing new
        if id(st) not in param_storages and key not in saved_storages:
            saved_storages.add(key)
            a = tracker.seen.get(st)
            layer = stack[-1] if stack else "(loss)"
            saved_by_layer[layer] = saved_by_layer.get(layer, 0) + (a.nbytes if a else st.nbytes())
        return t

    # hooks on the blocks and the top-level children only (no global hooks: other models running
    # in this process are not disturbed)
    hooked = {id(m): m for m in list(blocks) + [m for _, m in model.named_children()]}
    handles = [h for m in hooked.values()
               for h in (m.register_forward_pre_hook(pre_hook), m.register_forward_hook(post_hook))]
    for t in by_id.values():
        param_storages.add(id(t.untyped_storage()))
    for t in params.values():
        param_storages.add(id(t.untyped_storage()))

    # The model's own checkpointing (Hugging Face's `gradient_checkpointing` flags, vbhal's
    # per-block wrapper) would recompute outside our semantics: off for the trace, restored below;
    # the `gradient_checkpointing` argument decides.
    own_flags = [m for m in model.modules() if getattr(m, "gradient_checkpointing", None) is True]
    own_forwards = {m: m.__dict__.pop("forward") for m in model.modules()
                    if getattr(m, "_vbhal_checkpointed", False) and "forward" in m.__dict__}
    for m in own_flags:
        m.gradient_checkpointing = False
    # Checkpoint the repeated blocks by wrapping their forward (restored below).
    patched: list[tuple[nn.Module, Any]] = []
    if checkpointing and blocks:
        from torch.utils.checkpoint import checkpoint

        for b in blocks:
            orig = b.forward

            def recompute(*a, __orig=orig, **k):
                # In backward the recomputation runs outside our forward-time semantics: enter
                # them again (as torch.utils.checkpoint restores autocast), with a fresh cast
                # cache that dies with the recomputation, as autocast's does.
                if sem.active:
                    return __orig(*a, **k)
                with sem:
                    try:
                        return __orig(*a, **k)
                    finally:
                        sem.cache.clear()

            def fwd(*a, __run=recompute, __orig=orig, **k):
                if not torch.is_grad_enabled():
                    return __orig(*a, **k)
                return checkpoint(__run, *a, use_reentrant=False, preserve_rng_state=False, **k)
            patched.append((b, b.__dict__.get("forward")))
            b.forward = fwd
    was_training = model.training
    container = model.get_submodule(blocks_name) if keep_blocks is not None else None
    saved_modules = container._modules if container is not None else None
    from torch.nn.utils.stateless import _reparametrize_module

    opt_state = opt_temp = grads_bytes = 0
    step_extra_peak = 0
    try:
        if container is not None:
            container._modules = dict(list(saved_modules.items())[:keep_blocks])
        model.train()
        with tracker:
            args, kwargs = _make_inputs(spec, batch, seq, example_inputs)
            for t in list(args) + list(kwargs.values()):
                if isinstance(t, torch.Tensor):
                    tracker.track(t, "input")
            tracker.phase = "forward"
            # The stand-ins stay in the module through backward: checkpointed blocks recompute
            # with them (torch.func.functional_call would put the real weights back too early).
            with _reparametrize_module(model, params, tie_weights=False, strict=False):
                with sem, torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
                    out = model(*args, **kwargs)
                    loss = loss_fn(out) if loss_fn is not None else _loss_of(out)
                    sem.cache.clear()
                del out
                fwd_end = tracker.clock
                tracker.phase = "backward"
                tracker.tag = "activation"
                tracker.enter(("B", "post"))
                loss.backward()
                del loss
            grad_allocs = [tracker.seen.get(p.grad.untyped_storage()) for p in trainable if p.grad is not None]
            grad_allocs = [a for a in grad_allocs if a is not None]
            grads_bytes = sum(a.nbytes for a in grad_allocs)
            peak_fb, peak_time = tracker.peak, tracker.peak_time
            grad_allocs = {id(a) for a in grad_allocs}
            fb = _breakdown(tracker, peak_time, grad_allocs)
            phase = "forward" if peak_time <= fwd_end else "backward"
            after_backward = tracker.current

            # Optimizer step, traced: state it creates and temporaries it frees again.
            segments = tracker.segments
            seg_breakdown = {seg: _breakdown(tracker, t, grad_allocs) for seg, (_, t) in tracker.seg_peaks.items()}
            seg_peaks = {seg: v for seg, (v, _) in tracker.seg_peaks.items()}
            tracker.phase = "optimizer"
            base = tracker.current
            tracker.peak = base

            def snapshot() -> list[tuple]:
                return [(a.t0, a.t1, a.nbytes, a.phase, id(a) in grad_allocs, a.tag) for a in tracker.allocs]

            timeline = snapshot()
            if optimizer != "none" and trainable:
                opt = _make_optimizer(optimizer, impl, trainable)
                if opt is not None:
                    opt.step()
                    timeline = snapshot()  # before the optimizer (and its state) goes away
                    step_extra_peak = tracker.peak - base
                    opt_state = sum(a.nbytes for a in tracker.allocs if a.phase == "optimizer" and a.t1 is None)
                    opt_temp = step_extra_peak - opt_state
                    if impl == "fused":
                        # fused kernels update in place: no temporaries (traced as foreach for the state)
                        opt_temp, step_extra_peak = 0, opt_state
                    del opt
            saved_total = sum(saved_by_layer.values())
    finally:
        if container is not None:
            container._modules = saved_modules
        for h in handles:
            h.remove()
        for b, prev in patched:
            if prev is None:
                b.__dict__.pop("forward", None)
            else:
                b.forward = prev
        model.train(was_training)
        for m in own_flags:
            m.gradient_checkpointing = True
        for m, fwd_own in own_forwards.items():
            m.forward = fwd_own

    layers = []
    for name, n in saved_by_layer.items():
        layers.append(LayerActivation(name, n, ckpt_input.get(name)))
    return _Trace(peak_fb=peak_fb, peak_fb_phase=phase, fb_breakdown=fb, step_extra_peak=step_extra_peak,
                  after_backward=after_backward,
                  opt_state=opt_state, opt_temporaries=max(0, opt_temp), grads=grads_bytes,
                  saved_total=saved_total, layers=layers,
                  attention_saved=int(getattr(sem, "attention_bytes", 0)),
                  n_blocks=len(blocks), segments=segments, seg_peaks=seg_peaks, seg_breakdown=seg_breakdown,
                  timeline=timeline)


#: Models with more repeated blocks than this are traced with 2 and 3 blocks and extrapolated.
_EXTRAPOLATE_ABOVE = 8


def _segment_classes(t: _Trace) -> dict[str, tuple] | None:
    """Map the structural positions of a step (first/last block of forward and backward, the parts
    before and after the blocks) to the segments of a trace; None if the blocks did not run once
    each, in order, forward then backward."""
    k = t.n_blocks
    expected = ([("F", "pre")] + [("F", j) for j in range(k)] + [("F", "post"), ("B", "post")]
                + [("B", j) for j in range(k - 1, -1, -1)] + [("B", "pre")])
    if t.segments != expected:
        return None
    return {"F-pre": ("F", "pre"), "F-first": ("F", 0), "F-last": ("F", k - 1), "F-post": ("F", "post"),
            "B-post": ("B", "post"), "B-first": ("B", k - 1), "B-last": ("B", 0), "B-pre": ("B", "pre")}


def _extrapolate(t2: _Trace, t3: _Trace, n: int, blocks_name: str) -> _Trace | None:
    """The trace of an n-block model from traces with 2 and 3 blocks.

    Identical blocks make every quantity affine in the number of blocks *at a fixed structural
    position* (e.g. "the start of the first block's backward"): live memory there is a constant plus
    one block's activations (or gradients) per block. The peak of the step is the largest of these
    positions' peaks, so each is extrapolated on its own and the largest taken -- the peak can move
    from the start of backward to its end as the blocks grow, and this follows it.
    """
    c2, c3 = _segment_classes(t2), _segment_classes(t3)
    if c2 is None or c3 is None:
        return None

    def ext(a: int, b: int) -> int:
        return max(0, b + (n - 3) * (b - a))

    best = None
    for cls in c3:
        v = ext(t2.seg_peaks.get(c2[cls], 0), t3.seg_peaks.get(c3[cls], 0))
        if best is None or v > best[0]:
            best = (v, cls)
    peak, cls = best
    b2, b3 = t2.seg_breakdown.get(c2[cls], {}), t3.seg_breakdown.get(c3[cls], {})
    fb = {k: ext(b2.get(k, 0), b3.get(k, 0)) for k in b3}
    # the breakdown must add up to the peak (rounding of the extrapolation aside)
    layers = []
    for la in t3.layers:  # in the trace's order, block 0 standing for all n blocks
        if la.name == f"{blocks_name}.0":
            layers += [LayerActivation(f"{blocks_name}.{i}", la.saved_bytes, la.checkpointed_bytes,
                                       la.attention_bytes) for i in range(n)]
        elif not (la.name.startswith(f"{blocks_name}.") and la.name[len(blocks_name) + 1:].isdigit()):
            layers.append(la)
    return _Trace(peak_fb=peak, peak_fb_phase="forward" if cls.startswith("F") else "backward", fb_breakdown=fb,
                  step_extra_peak=ext(t2.step_extra_peak, t3.step_extra_peak),
                  after_backward=ext(t2.after_backward, t3.after_backward),
                  opt_state=ext(t2.opt_state, t3.opt_state),
                  opt_temporaries=ext(t2.opt_temporaries, t3.opt_temporaries),
                  grads=ext(t2.grads, t3.grads), saved_total=ext(t2.saved_total, t3.saved_total), layers=layers,
                  attention_saved=ext(t2.attention_saved, t3.attention_saved), n_blocks=n)


def _breakdown(tracker: _AllocationTracker, time: int, grad_allocs: set[int]) -> dict[str, int]:
    """What is live at `time`, by category."""
    fb = {"gradients": 0, "activations": 0, "autocast": 0, "temporaries": 0, "inputs": 0}
    for a in tracker.live_at(time):
        if id(a) in grad_allocs:
            fb["gradients"] += a.nbytes
        elif a.tag == "input":
            fb["inputs"] += a.nbytes
        elif a.tag == "autocast":
            fb["autocast"] += a.nbytes
        elif a.phase == "forward":
            fb["activations"] += a.nbytes
        else:
            fb["temporaries"] += a.nbytes
    return fb


def _make_optimizer(name: str, impl: str, params: list[torch.Tensor]):
    """The optimizer as torch builds it; fused kernels have no meta implementation, so a fused
    optimizer is traced as foreach (same state) and its temporaries are dropped by the caller."""
    foreach = impl in ("foreach", "fused")
    if name in ("adamw", "adam"):
        cls = torch.optim.AdamW if name == "adamw" else torch.optim.Adam
        return cls(params, lr=1e-4, foreach=foreach)
    if name == "sgd":
        return torch.optim.SGD(params, lr=1e-2, foreach=foreach)
    if name == "sgd-momentum":
        return torch.optim.SGD(params, lr=1e-2, momentum=0.9, foreach=foreach)
    return None


# ----------------------------------------------------------------------------------------------- CUDA allocator model

_MiB = 2**20
#: PyTorch's CUDA caching allocator (c10/cuda/CUDACachingAllocator.cpp): blocks of at most 1 MiB
#: (kSmallSize) come from 2 MiB segments (kSmallBuffer); up to 10 MiB (kMinLargeAlloc) from 20 MiB
#: segments (kLargeBuffer); larger ones get their own segment rounded to 2 MiB (kRoundLarge).
_SMALL_BLOCK, _SMALL_SEGMENT, _MID_LIMIT, _MID_SEGMENT, _LARGE_ROUND = _MiB, 2 * _MiB, 10 * _MiB, 20 * _MiB, 2 * _MiB


def _segment_size(r: int) -> int:
    if r <= _SMALL_BLOCK:
        return _SMALL_SEGMENT
    if r < _MID_LIMIT:
        return _MID_SEGMENT
    return (r + _LARGE_ROUND - 1) // _LARGE_ROUND * _LARGE_ROUND


class _CachingAllocatorModel:
    """A model of PyTorch's CUDA caching allocator (one stream, no expandable segments): best-fit
    reuse of cached blocks, splitting (remainders > 1 MiB in the large pool, >= 512 B in the small
    one), coalescing on free, and -- under a cap -- releasing every fully free segment before it
    gives up (what set_per_process_memory_fraction or a full device does). Replaying a traced step
    through it predicts max_memory_reserved and whether the step fits under a cap: the
    fragmentation that large transient tensors (logits) leave once the optimizer state has been
    carved out of their cached segments."""

    def __init__(self, cap: int | None = None):
        import bisect

        self._bisect = bisect
        self.cap, self.reserved, self.allocated, self.peak_reserved, self.peak_allocated = cap, 0, 0, 0, 0
        self.free: dict[bool, list[tuple[int, int]]] = {True: [], False: []}  # small pool? -> [(size, uid)]
        self.blocks: dict[int, list] = {}  # uid -> [segment, size, is_free, prev, next, small]
        self.segments: dict[int, tuple[int, int]] = {}  # segment -> (size, first uid)
        self.owner: dict[Any, int] = {}
        self._uid = self._nseg = 0

    def _block(self, seg: int, size: int, free: bool, prev, nxt, small: bool) -> int:
        self._uid += 1
        self.blocks[self._uid] = [seg, size, free, prev, nxt, small]
        if free:
            self._bisect.insort(self.free[small], (size, self._uid))
        return self._uid

    def _split(self, u: int, r: int) -> None:
        b = self.blocks[u]
        rem = b[1] - r
        if (b[5] and rem >= 512) or (not b[5] and rem > _SMALL_BLOCK):
            nu = self._block(b[0], rem, True, u, b[4], b[5])
            if b[4]:
                self.blocks[b[4]][3] = nu
            b[4], b[1] = nu, r

    def _release_cached(self) -> None:
        for seg, (size, first) in list(self.segments.items()):
            b = self.blocks[first]
            if b[2] and b[3] is None and b[4] is None:
                self.free[b[5]].remove((b[1], first))
                del self.blocks[first], self.segments[seg]
                self.reserved -= size

    def malloc(self, key: Any, n: int) -> bool:
        r = max(512, (n + 511) // 512 * 512)
        small = r <= _SMALL_BLOCK
        fl = self.free[small]
        i = self._bisect.bisect_left(fl, (r, -1))
        if i < len(fl):
            _, u = fl.pop(i)
            self.blocks[u][2] = False
            self._split(u, r)
        else:
            size = _segment_size(r)
            if self.cap is not None and self.reserved + size > self.cap:
                self._release_cached()
                if self.reserved + size > self.cap:
                    return False
            self._nseg += 1
            self.reserved += size
            u = self._block(self._nseg, size, False, None, None, small)
            self.segments[self._nseg] = (size, u)
            self._split(u, r)
        self.owner[key] = u
        self.allocated += self.blocks[u][1]
        self.peak_allocated = max(self.peak_allocated, self.allocated)
        self.peak_reserved = max(self.peak_reserved, self.reserved)
        return True

    def release(self, key: Any) -> None:
        u = self.owner.pop(key)
        b = self.blocks[u]
        self.allocated -= b[1]
        b[2] = True
        for side in (3, 4):  # coalesce with free neighbours in the segment
            nb = b[side]
            if nb is not None and self.blocks[nb][2]:
                o = self.blocks.pop(nb)
                self.free[o[5]].remove((o[1], nb))
                b[1] += o[1]
                if side == 3:
                    b[3] = o[3]
                    if o[3]:
                        self.blocks[o[3]][4] = u
                    size, first = self.segments[b[0]]
                    if first == nb:
                        self.segments[b[0]] = (size, u)
                else:
                    b[4] = o[4]
                    if o[4]:
                        self.blocks[o[4]][3] = u
        self._bisect.insort(self.free[b[5]], (b[1], u))


def _steady_events(timeline: list[tuple], param_allocs: list[int], workspace: list[int],
                   fused: bool) -> list[tuple]:
    """Two training steps as the allocator sees them: the model's tensors, the workspaces and the
    batch, then step 1 (which creates the optimizer state) and step 2 (which has it)."""
    ev: list[tuple] = [("a", ("p", k), n) for k, n in enumerate(param_allocs)]
    ev += [("a", ("ws", k), n) for k, n in enumerate(workspace)]
    tl = sorted(enumerate(timeline), key=lambda x: x[1][0])
    ev += [("a", ("in", i), t[2]) for i, t in tl if t[5] == "input"]
    for step in (1, 2):
        pts = []
        for i, (t0, t1, n, phase, is_grad, tag) in tl:
            if tag == "input":
                continue
            if phase == "optimizer" and ((t1 is None and step == 2) or (fused and t1 is not None)):
                continue  # state exists from step 1; fused kernels have no temporaries
            pts.append((t0, 0, "a", (step, i), n))
            if t1 is not None:
                pts.append((t1, 1, "f", (step, i), n))
            elif is_grad:
                pts.append((float("inf"), 1, "f", (step, i), n))  # zero_grad(set_to_none=True)
        pts.sort(key=lambda x: (x[0], x[1]))
        ev += [(kind, key, n) for _, _, kind, key, n in pts]
    return ev


def _replay(events: list[tuple], cap: int | None) -> tuple[bool, _CachingAllocatorModel]:
    sim = _CachingAllocatorModel(cap)
    for kind, key, n in events:
        if kind == "a":
            if not sim.malloc(key, n):
                return False, sim
        elif key in sim.owner:
            sim.release(key)
    return True, sim


# ----------------------------------------------------------------------------------------------- estimate

def _device_kind(device: str | torch.device | None) -> str:
    if device is None:
        return "cuda"
    kind = torch.device(device).type if not isinstance(device, str) or device != "gpu" else "cuda"
    return kind


def _cuda_workspace(arch: str | None) -> int:
    return _CUBLAS_HANDLES_IN_TRAINING * _CUBLAS_WORKSPACE.get(arch or "sm90", _CUBLAS_WORKSPACE["default"])


def estimate(model: Any, *, batch_size: int = 1, seq_length: int | None = None,
             precision: str = "bf16-mixed", optimizer: str = "adamw", optimizer_impl: str = "foreach",
             gradient_checkpointing: bool = False, fp4: str | bool | None = None,
             attention: str = "flash", offload: bool = False, world_size: int = 1,
             distributed: str = "ddp", device: str = "cuda", gpu_arch: str | None = "sm90",
             fp4_dequant_temp: bool = False, example_inputs: Any = None,
             loss_fn: Callable[[Any], torch.Tensor] | None = None,
             gpu_mem: int | str | None = None, cpu_mem: int | str | None = None,
             disk: int | str | None = None, layer_detail: bool = True,
             allocator_model: bool | None = None) -> MemoryEstimate:
    """Estimate the memory of one training step of `model`, traced on meta tensors.

    Args:
        model: an `nn.Module` (its weights are never touched or copied), a vbhal preset name
            ("tiny", "small", "medium", "large"), a `GPTConfig`, a transformers `PretrainedConfig`,
            or a path to a Hugging Face ``config.json`` (or its folder).
        batch_size, seq_length: per-device micro-batch; seq_length defaults to the model's context.
        precision: "fp32", "bf16-mixed" (alias "bf16"), "fp16-mixed", "bf16-true", "fp16-true".
        optimizer: "adamw", "adam", "sgd", "sgd-momentum" or "none"; `optimizer_impl`: "foreach"
            (PyTorch's default on CUDA), "fused" or "for-loop".
        gradient_checkpointing: recompute the repeated blocks in backward.
        fp4: None/False, True (= "mxfp4"), "mxfp4" or "nvfp4": linear weights frozen in FP4.
        attention: "flash" (O(S)), "math" (SDPA math path, O(S^2)), "eager" (the model's own
            attention code; Hugging Face models are built with attn_implementation="eager"),
            or "model" (whatever the model calls, untouched).
        offload: keep master weights, gradients and optimizer state in host memory (mode
            "memory"); the device holds working copies of two blocks plus activations.
        world_size, distributed: data-parallel ranks and "ddp" (replicated, plus DDP's gradient
            buckets) or "fsdp" (parameters, gradients and state sharded by `world_size`).
        device: "cuda" (adds cuBLAS workspaces and 512-byte rounding) or "cpu".
        gpu_mem, cpu_mem, disk: capacities per tier (sizes such as "8GB"), shown beside the usage.
        layer_detail: with checkpointing, trace once more without it for the per-layer table
            (`LayerActivation.saved_bytes`); the planner turns it off while it searches.
        allocator_model: replay the step (two of them) through a model of the CUDA caching
            allocator: predicts max_memory_reserved and whether the step fits under `gpu_mem`
            (fragmentation included). Default: on for CUDA, one device, no offload, up to 48 blocks
            (those are traced whole); otherwise an empirical margin is used.

    Returns a `MemoryEstimate`. Raises `EstimateError` for input it cannot work with.

    A module you pass is borrowed for the trace: its parameters and buffers are swapped for meta
    stand-ins (nothing is copied or allocated) and put back, its train/eval mode and checkpointing
    flags restored; do not run it in another thread meanwhile. The step traced is the usual one:
    forward and loss under autocast (the model's other outputs, e.g. logits, dropped before
    backward), ``loss.backward()``, ``optimizer.step()``, ``zero_grad(set_to_none=True)``, in steady
    state (optimizer state exists from the previous step).

    Example::

        est = estimate("medium", batch_size=8, seq_length=1024, gradient_checkpointing=True)
        print(format_estimate(est))
    """
    import time

    t_start = time.perf_counter()
    batch_size = _positive_int("batch_size", batch_size)
    world_size = _positive_int("world_size", world_size)
    if seq_length is not None:
        seq_length = _positive_int("seq_length", seq_length)
    prec = _norm_precision(precision)
    optimizer = str(optimizer).lower()
    if optimizer not in OPTIMIZERS:
        raise EstimateError(f"unknown optimizer {optimizer!r}; choose one of {', '.join(OPTIMIZERS)}")
    if optimizer_impl not in ("foreach", "fused", "for-loop"):
        raise EstimateError(f"optimizer_impl must be 'foreach', 'fused' or 'for-loop', got {optimizer_impl!r}")
    if attention not in ATTENTIONS:
        raise EstimateError(f"unknown attention {attention!r}; choose one of {', '.join(ATTENTIONS)}")
    distributed = {"fsdp2": "fsdp", "none": "ddp", "single": "ddp", "auto": "ddp"}.get(str(distributed), distributed)
    if distributed not in ("ddp", "fsdp"):
        raise EstimateError(f"distributed must be 'ddp' or 'fsdp', got {distributed!r}")
    fmt = None
    if fp4 is True:
        fmt = "mxfp4"
    elif fp4 not in (None, False):
        fmt = str(fp4).lower()
        if fmt not in FP4_BITS_PER_ELEMENT:
            raise EstimateError(f"unknown FP4 format {fp4!r}; choose 'mxfp4' or 'nvfp4'")
    kind = _device_kind(device)
    caps = {"device": parse_bytes(gpu_mem, what="gpu_mem"), "host": parse_bytes(cpu_mem, what="cpu_mem"),
            "disk": parse_bytes(disk, what="disk")}

    spec = _resolve_model(model, attention)
    seq = seq_length or spec.max_seq or 1024
    if spec.max_seq is not None and seq > spec.max_seq and spec.kind == "vbhal":
        raise EstimateError(f"seq_length {seq} exceeds the model's context of {spec.max_seq} tokens; "
                            f"lower --seq-length or raise the model's seq_length")
    param_dtype, autocast = PRECISIONS[prec]

    blocks_name, blocks = _find_blocks(spec.module)
    n_blocks = spec.n_blocks or len(blocks)
    common = dict(batch=batch_size, seq=seq, param_dtype=param_dtype, autocast=autocast, attention=attention,
                  impl=optimizer_impl, fp4=fmt, fp4_dequant_temp=fp4_dequant_temp, example_inputs=example_inputs,
                  loss_fn=loss_fn, device_kind=kind)
    rounding = _CUDA_ROUND if kind == "cuda" else 1

    simulate = (kind == "cuda" and allocator_model is not False and world_size == 1 and not offload
                and len(blocks) == n_blocks and n_blocks <= _SIMULATE_UP_TO)

    def trace(ckpt: bool, opt: str, round_to: int, whole: bool = False) -> _Trace:
        if n_blocks > _EXTRAPOLATE_ABOVE and len(blocks) >= 3 and not whole:
            t2 = _trace_step(spec, checkpointing=ckpt, optimizer=opt, round_to=round_to, keep_blocks=2, **common)
            t3 = _trace_step(spec, checkpointing=ckpt, optimizer=opt, round_to=round_to, keep_blocks=3, **common)
            ext = _extrapolate(t2, t3, n_blocks, blocks_name)
            if ext is not None:
                return ext
            if len(blocks) < n_blocks:  # pragma: no cover - a config-built model is regular
                raise EstimateError(f"{spec.name}: the blocks do not run in order; cannot extrapolate")
        return _trace_step(spec, checkpointing=ckpt, optimizer=opt, round_to=round_to, **common)

    # the offload engine recomputes every unit in backward: trace it checkpointed
    tr = trace(gradient_checkpointing or offload, optimizer, rounding, whole=simulate)
    if gradient_checkpointing and layer_detail:  # per-layer numbers without checkpointing: a second trace
        layers = trace(False, "none", 1).layers
    else:
        layers = tr.layers
    ckpt_in = {la.name: la.checkpointed_bytes for la in tr.layers}
    for la in layers:
        la.checkpointed_bytes = la.checkpointed_bytes if la.checkpointed_bytes is not None else ckpt_in.get(la.name)

    # Parameters and buffers, counted once (tied weights share storage), FP4 packed where swapped.
    rnd = (lambda n: (n + _CUDA_ROUND - 1) // _CUDA_ROUND * _CUDA_ROUND) if kind == "cuda" else (lambda n: n)
    fp4_names = {f"{n}.weight": _linear_nk(m) for n, m in _fp4_linears(spec.module, fmt)} if fmt else {}
    seen: set[int] = set()
    n_params = n_train = param_bytes = 0
    param_allocs: list[int] = []  # one entry per tensor the model holds (the allocator model's input)
    for name, p in spec.module.named_parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        n_params += p.numel()
        if name in fp4_names:
            param_bytes += rnd(_fp4_nbytes(*fp4_names[name], fmt))
            # two allocations (codes, scales) in QuantizedWeight
            param_bytes += _CUDA_ROUND if kind == "cuda" else 0
            nn_, kk = fp4_names[name]
            kp = -(-kk // _FP4_BLOCK[fmt]) * _FP4_BLOCK[fmt]
            param_allocs += [nn_ * kp // 2, nn_ * kp // _FP4_BLOCK[fmt]] + ([4] if fmt == "nvfp4" else [])
            continue
        dt = param_dtype if p.is_floating_point() else p.dtype
        param_bytes += rnd(p.numel() * torch.empty((), dtype=dt).element_size())
        param_allocs.append(p.numel() * torch.empty((), dtype=dt).element_size())
        if p.requires_grad:
            n_train += p.numel()
    for b in spec.module.buffers():
        param_bytes += rnd(_nbytes(b))
        param_allocs.append(_nbytes(b))
    if n_blocks > len(blocks) and blocks:
        # built with fewer (identical) blocks than it has: add the missing ones
        extra = n_blocks - len(blocks)
        prefix = f"{blocks_name}.0."
        for name, p in blocks[0].named_parameters():
            full = prefix + name
            n_params += extra * p.numel()
            if full in fp4_names:
                param_bytes += extra * (rnd(_fp4_nbytes(*fp4_names[full], fmt))
                                        + (_CUDA_ROUND if kind == "cuda" else 0))
                continue
            dt = param_dtype if p.is_floating_point() else p.dtype
            param_bytes += extra * rnd(p.numel() * torch.empty((), dtype=dt).element_size())
            if p.requires_grad:
                n_train += extra * p.numel()
        for b in blocks[0].buffers():
            param_bytes += extra * rnd(_nbytes(b))

    notes: list[str] = []
    workspace = _cuda_workspace(gpu_arch) if kind == "cuda" else 0
    grads, opt_state, opt_temp = tr.grads, tr.opt_state, tr.opt_temporaries
    fbk = tr.fb_breakdown
    # Steady state (step 2 onwards): parameters and optimizer state are resident for the whole
    # step; the forward/backward peak sits on top of them, the optimizer step's peak is what is
    # live after backward (gradients, the batch) plus the state and the step's temporaries.
    fb_total = param_bytes + opt_state + tr.peak_fb
    opt_total = param_bytes + tr.after_backward + opt_state + opt_temp
    if opt_total > fb_total:
        peak_phase = "optimizer"
        cat = dict(gradients=grads, activations=tr.after_backward - grads, autocast=0, temporaries=opt_temp)
    else:
        peak_phase = tr.peak_fb_phase
        cat = dict(gradients=fbk["gradients"], activations=fbk["activations"] + fbk["inputs"],
                   autocast=fbk["autocast"], temporaries=fbk["temporaries"])
    dev = dict(parameters=param_bytes, gradients=cat["gradients"], optimizer_state=opt_state,
               activations=cat["activations"] + cat["autocast"], temporaries=cat["temporaries"])

    if world_size > 1 and distributed == "ddp":
        # DDP's reducer keeps flat gradient buckets beside .grad (gradient_as_bucket_view=False).
        dev["gradients"] += grads
        notes.append("ddp: the reducer's gradient buckets (a second copy of the gradients) are counted")
    elif world_size > 1 and distributed == "fsdp":
        blk = _block_param_bytes(blocks, autocast or param_dtype)
        for key in ("parameters", "gradients", "optimizer_state"):
            dev[key] = -(-dev[key] // world_size)
        dev["parameters"] += _OFFLOAD_RESIDENT_BLOCKS * blk
        notes.append(f"fsdp: parameters, gradients and optimizer state sharded {world_size} ways, "
                     f"{_OFFLOAD_RESIDENT_BLOCKS} blocks unsharded at a time (formula, not traced)")

    host = TierUsage("host", 1, capacity=caps["host"])
    disk_t = TierUsage("disk", 2, capacity=caps["disk"])
    if offload:
        # vbhal.nn.offload (mode "memory"): every block, and every other module holding parameters,
        # is a unit streamed through the device. The host keeps fp32 masters and AdamW state
        # (pageable) plus a working copy and a gradient buffer in the work dtype (pinned); the
        # device keeps the units in flight (the one computing and the prefetched one), one unit's
        # gradient, and activations with unit-level checkpointing (the engine recomputes each
        # unit in backward); the AdamW step runs on the host. Formula on top of the trace.
        work = _elt(autocast or param_dtype)
        units = _offload_units(spec.module, blocks, n_blocks)
        resident = min(len(units), _OFFLOAD_RESIDENT_BLOCKS)
        biggest = sorted((u[0] for u in units), reverse=True)[:resident]
        host.parameters = n_train * 4 + n_params * work
        host.gradients = n_train * work
        host.optimizer_state = n_train * 8
        # the optimizer step leaves the device: its peak is the forward/backward one
        peak_phase = tr.peak_fb_phase
        dev = dict(parameters=sum(biggest) * work, gradients=max((u[1] for u in units), default=0) * work,
                   optimizer_state=0, activations=fbk["activations"] + fbk["inputs"],
                   temporaries=fbk["temporaries"])
        notes.append(f"offload: {len(units)} units stream through the device, {resident} at a time; fp32 masters, "
                     f"AdamW state and work-dtype copies/gradients in host memory (formula over the trace; "
                     f"the engine always uses AdamW and recomputes each unit)")
        if caps["host"] is not None and host.total > caps["host"]:
            over = host.total - caps["host"]
            # the engine's state stack spills fp32 masters + AdamW state to disk (LRU); pinned buffers stay
            spillable = n_train * 12
            move = min(over, spillable, host.optimizer_state + n_train * 4)
            from_state = min(move, host.optimizer_state)
            host.optimizer_state -= from_state
            disk_t.optimizer_state += from_state
            host.parameters -= move - from_state
            disk_t.parameters += move - from_state
            notes.append("offload: host capacity exceeded; AdamW state and fp32 masters spill to disk")

    peak_alloc = sum(dev.values()) + workspace
    verdict = None
    if kind == "cuda":
        ckpt_like = gradient_checkpointing or offload
        reserved = int(peak_alloc * (_RESERVED_FACTOR_CKPT if ckpt_like else _RESERVED_FACTOR))
        pressure = int(peak_alloc * _PRESSURE_MARGIN) + _PRESSURE_SLACK
        if simulate:
            events = _steady_events(tr.timeline, param_allocs, [workspace // 2] * 2 if workspace else [],
                                    fused=optimizer_impl == "fused")
            _, sim = _replay(events, None)
            reserved = sim.peak_reserved
            if caps["device"] is not None:
                verdict, capped = _replay(events, caps["device"])
                if verdict:  # what it holds under this cap, cached blocks released when short
                    pressure = max(0, capped.peak_reserved - peak_alloc)
            notes.append(f"reserved and fit under a cap from a replay of two steps through a model of the CUDA "
                         f"caching allocator (allocated there: {_h(sim.peak_allocated)})")
    else:
        reserved, pressure = peak_alloc, 0
    device_t = TierUsage("device", 0, workspace=workspace, allocator_overhead=pressure,
                         capacity=caps["device"], fits_override=verdict, **dev)
    if kind == "cpu":
        # On a CPU run the "device" is host memory: one tier.
        device_t.name, device_t.level, device_t.capacity = "host", 1, caps["host"]
        for key in ("parameters", "gradients", "optimizer_state"):
            setattr(device_t, key, getattr(device_t, key) + getattr(host, key))
        tiers = [device_t, disk_t]
    else:
        tiers = [device_t, host, disk_t]

    if autocast is not None:
        notes.append(f"mixed precision: autocast keeps {_h(tr.fb_breakdown['autocast'])} of "
                     f"{str(autocast).replace('torch.', '')} weight copies live at the peak")
    if fmt:
        notes.append(f"fp4 ({fmt}, {FP4_BITS_PER_ELEMENT[fmt]} bits/weight): linear weights frozen, "
                     f"no gradient or optimizer state for them")
    return MemoryEstimate(
        model=spec.name,
        setup=dict(batch_size=batch_size, seq_length=seq, precision=prec, optimizer=optimizer,
                   optimizer_impl=optimizer_impl, gradient_checkpointing=gradient_checkpointing, fp4=fmt,
                   attention=attention, offload=offload, world_size=world_size, distributed=distributed,
                   device=kind),
        num_parameters=n_params, num_trainable=n_train, parameters=param_bytes, gradients=grads,
        optimizer_state=opt_state, activations=dev["activations"], autocast_copies=cat["autocast"],
        temporaries=dev["temporaries"], workspace=workspace, peak_allocated=peak_alloc, peak_reserved=reserved,
        peak_phase=peak_phase, activations_total_saved=tr.saved_total, optimizer_temporaries=opt_temp,
        layers=layers, tiers=tiers, notes=notes, trace_seconds=time.perf_counter() - t_start)


def _elt(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def _offload_units(model: nn.Module, blocks: list[nn.Module], n_blocks: int) -> list[tuple[int, int]]:
    """(parameters, trainable parameters) of each unit vbhal.nn.offload streams: each block, and
    each other module that owns parameters directly (embeddings, norms, the head)."""
    in_blocks = {id(p) for b in blocks for p in b.parameters()}
    units: list[tuple[int, int]] = []
    if blocks:
        per = (sum(p.numel() for p in blocks[0].parameters()),
               sum(p.numel() for p in blocks[0].parameters() if p.requires_grad))
        units += [per] * n_blocks
    seen: set[int] = set()
    for m in model.modules():
        own = [p for p in m.parameters(recurse=False) if id(p) not in in_blocks and id(p) not in seen]
        seen.update(id(p) for p in own)
        if own:
            units.append((sum(p.numel() for p in own), sum(p.numel() for p in own if p.requires_grad)))
    return units


def _block_param_bytes(blocks: list[nn.Module], dtype: torch.dtype, trainable_only: bool = False) -> int:
    """Bytes of one repeated block's parameters in `dtype` (blocks are identical)."""
    if not blocks:
        return 0
    size = torch.empty((), dtype=dtype).element_size()
    return sum(p.numel() for p in blocks[0].parameters() if p.requires_grad or not trainable_only) * size


def _h(n: int | float | None) -> str:
    from vbhal._table import human_bytes

    return human_bytes(n)


# ----------------------------------------------------------------------------------------------- planner

@dataclass
class Optimization:
    """One optimization the planner considered: whether it is on, and the device memory it saves
    at the planned batch size (peak reserved without it minus with it)."""

    name: str
    enabled: bool
    saves: int | None
    note: str = ""


@dataclass
class TierLevel:
    """One level of the tier plan: level 0 device, 1 pinned host, 2 disk."""

    level: int
    name: str
    capacity: int | None
    used: int


@dataclass
class Plan:
    """What the planner recommends. `to_optimize_overrides()` feeds `vbhal.optimize` / `vbhal train`."""

    fits: bool
    mode: str
    batch_size: int
    grad_accum: int
    global_batch: int | None
    fp4: bool
    fp4_format: str
    attention: bool
    mixed_precision: str
    gradient_checkpointing: bool
    offload: bool
    seq_length: int
    optimizations: list[Optimization] = field(default_factory=list)
    tiers: list[TierLevel] = field(default_factory=list)
    estimate: MemoryEstimate | None = None
    missing: str | None = None
    suggestions: list[str] = field(default_factory=list)

    def to_optimize_overrides(self) -> dict[str, Any]:
        """OptimizeConfig field overrides (mode, fp4, fp4_format, attention, mixed_precision,
        gradient_checkpointing, offload) plus ``batch_size`` and ``grad_accum`` for the training
        loop (pop those two before building an OptimizeConfig)."""
        return dict(mode=self.mode, fp4=self.fp4, fp4_format=self.fp4_format, attention=self.attention,
                    mixed_precision=self.mixed_precision,
                    gradient_checkpointing=self.gradient_checkpointing, offload=self.offload,
                    batch_size=self.batch_size, grad_accum=self.grad_accum)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["estimate"] = self.estimate.to_dict() if self.estimate else None
        d["overrides"] = self.to_optimize_overrides()
        return d


#: The ladder the planner climbs, fastest first: (mode, checkpointing, fp4, offload).
_LADDER = [("speed", False, False, False), ("balanced", True, False, False), ("full", True, True, False),
           ("memory", True, False, True), ("memory", True, True, True)]


def _detect_budgets(gpu_mem, cpu_mem, disk, device: str) -> dict[str, int | None]:
    from vbhal import _sysinfo

    caps = {"device": parse_bytes(gpu_mem, what="gpu_mem"), "host": parse_bytes(cpu_mem, what="cpu_mem"),
            "disk": parse_bytes(disk, what="disk")}
    if caps["device"] is None and device == "cuda":
        if not torch.cuda.is_available():
            raise EstimateError("no CUDA device detected to plan for; pass gpu_mem (e.g. gpu_mem='8GB' or "
                                "--gpu-mem 8GB), or device='cpu'")
        # what this process can still get: free device memory plus what its allocator already holds
        free, _total = torch.cuda.mem_get_info()
        caps["device"] = free + torch.cuda.memory_reserved()
    if caps["host"] is None:
        caps["host"] = _sysinfo.host_memory_available()
    if caps["disk"] is None:
        caps["disk"] = _sysinfo.disk_free()
    return caps


def _need(est: MemoryEstimate, kind: str) -> int:
    """What must fit in the device tier: the peak plus the allocator's margin under pressure."""
    return est.tiers[0].total


def _fits(est: MemoryEstimate, caps: Mapping[str, int | None], kind: str) -> bool:
    if kind == "cuda":
        dev = est.tiers[0]
        if caps["device"] is not None and dev.capacity == caps["device"] and dev.fits_override is not None:
            if not dev.fits_override:  # the allocator model replayed the step under the cap
                return False
        elif caps["device"] is not None and _need(est, kind) > caps["device"]:
            return False
        host = est.tier("host")
    else:
        host = est.tiers[0]
    if caps["host"] is not None and host.total > caps["host"]:
        return False
    disk_t = est.tier("disk")
    return caps["disk"] is None or disk_t.total <= caps["disk"]


def plan(model: Any, *, gpu_mem: int | str | None = None, cpu_mem: int | str | None = None,
         disk: int | str | None = None, seq_length: int | None = None, global_batch: int | None = None,
         max_batch_size: int = 1024, precision: str = "bf16-mixed", optimizer: str = "adamw",
         optimizer_impl: str = "foreach", allow_fp4: bool = False, allow_offload: bool = True,
         fp4_format: str = "mxfp4", world_size: int = 1, device: str = "cuda", gpu_arch: str | None = "sm90",
         example_inputs: Any = None, loss_fn: Callable | None = None, explain: bool = True) -> Plan:
    """Recommend mode, micro-batch size, gradient accumulation and tier plan for a memory budget.

    Budgets not given are detected (device memory of the current CUDA device, available host RAM
    within the cgroup limit, free disk in the spill directory). The planner climbs from the fastest
    setup (flash attention + bf16 autocast) through gradient checkpointing, FP4 weights (only with
    `allow_fp4`: they freeze the linear weights) and offload to the host/disk tiers, and takes the
    first that fits with the largest micro-batch that fits (capped by `max_batch_size`, and by
    `global_batch` when given; then ``grad_accum = ceil(global_batch / (batch_size * world_size))``).
    With `explain` (default) it also measures what each optimization saves (five more traces).

    When nothing fits, `Plan.fits` is False, `missing` says what is short and `suggestions` what
    would fit.

    Example::

        p = plan("medium", gpu_mem="8GB", seq_length=1024, global_batch=64)
        overrides = p.to_optimize_overrides()   # {'mode': 'balanced', ..., 'batch_size': 12, 'grad_accum': 6}
    """
    kind = _device_kind(device)
    caps = _detect_budgets(gpu_mem, cpu_mem, disk, kind)
    max_batch_size = _positive_int("max_batch_size", max_batch_size)
    if global_batch is not None:
        global_batch = _positive_int("global_batch", global_batch)
        max_batch_size = min(max_batch_size, -(-global_batch // world_size))
    prec = _norm_precision(precision)
    if fp4_format not in FP4_BITS_PER_ELEMENT:
        raise EstimateError(f"unknown FP4 format {fp4_format!r}; choose 'mxfp4' or 'nvfp4'")
    spec = _resolve_model(model, "flash")
    common = dict(seq_length=seq_length, precision=prec, optimizer=optimizer, optimizer_impl=optimizer_impl,
                  world_size=world_size, device=kind, gpu_arch=gpu_arch, example_inputs=example_inputs,
                  loss_fn=loss_fn, gpu_mem=caps["device"], cpu_mem=caps["host"], disk=caps["disk"],
                  attention="flash")

    def est(b: int, ckpt: bool, fp4: bool, off: bool, detail: bool = False) -> MemoryEstimate:
        return estimate(spec, batch_size=b, gradient_checkpointing=ckpt, fp4=fp4_format if fp4 else None,
                        offload=off, layer_detail=detail, **common)

    ladder = [r for r in _LADDER if (allow_fp4 or not r[2]) and (allow_offload or not r[3])]
    chosen = None
    best_fail: tuple[MemoryEstimate, tuple] | None = None
    for rung in ladder:
        mode, ckpt, fp4, off = rung
        e1 = est(1, ckpt, fp4, off)
        if not _fits(e1, caps, kind):
            if best_fail is None or _need(e1, kind) < _need(best_fail[0], kind):
                best_fail = (e1, rung)
            continue
        b = _largest_batch(lambda bb: est(bb, ckpt, fp4, off), e1, caps, kind, max_batch_size)
        chosen = (rung, b, est(b, ckpt, fp4, off, detail=True))
        break

    mp = {"fp32": "none", "bf16-mixed": "bf16", "fp16-mixed": "fp16"}.get(prec, "bf16")
    if chosen is None:
        e1, rung = best_fail  # type: ignore[misc]
        mode, ckpt, fp4, off = rung
        short = _need(e1, kind) - (caps["device"] or 0)
        missing = (f"nothing fits: even batch size 1 in mode {mode!r} needs {_h(_need(e1, kind))} of device "
                   f"memory, {_h(max(0, short))} more than the {_h(caps['device'])} available")
        host_t = e1.tier("host") if kind == "cuda" else e1.tiers[0]
        if caps["host"] is not None and host_t.total > caps["host"]:
            missing += f"; the host tier needs {_h(host_t.total)} of {_h(caps['host'])}"
        sugg = [f"a device with at least {_h(_need(e1, kind))} (gpu_mem) fits batch size 1 in mode {mode!r}"]
        s_fit = _largest_seq_that_fits(lambda s: estimate(spec, batch_size=1, gradient_checkpointing=ckpt,
                                                          fp4=fp4_format if fp4 else None, offload=off,
                                                          layer_detail=False,
                                                          **{**common, "seq_length": s}),
                                       e1.setup["seq_length"], caps, kind)
        if s_fit:
            sugg.append(f"seq_length {s_fit} fits at batch size 1 in mode {mode!r}")
        if not allow_fp4:
            sugg.append("allow_fp4=True (frozen FP4 linear weights) saves weight, gradient and optimizer memory")
        if world_size == 1:
            sugg.append("FSDP over several GPUs shards weights, gradients and optimizer state")
        return Plan(fits=False, mode=mode, batch_size=0, grad_accum=0, global_batch=global_batch, fp4=fp4,
                    fp4_format=fp4_format, attention=True, mixed_precision=mp, gradient_checkpointing=ckpt,
                    offload=off, seq_length=e1.setup["seq_length"], tiers=_tier_levels(e1, caps, kind),
                    estimate=e1, missing=missing, suggestions=sugg)

    (mode, ckpt, fp4, off), b, e = chosen
    accum = 1 if global_batch is None else max(1, -(-global_batch // (b * world_size)))
    opts = _savings(spec, e, b, (ckpt, fp4, off), common, fp4_format, kind) if explain else []
    return Plan(fits=True, mode=mode, batch_size=b, grad_accum=accum,
                global_batch=None if global_batch is None else b * accum * world_size, fp4=fp4,
                fp4_format=fp4_format, attention=True, mixed_precision=mp, gradient_checkpointing=ckpt,
                offload=off, seq_length=e.setup["seq_length"], optimizations=opts,
                tiers=_tier_levels(e, caps, kind), estimate=e)


def _largest_batch(est_b: Callable[[int], MemoryEstimate], e1: MemoryEstimate, caps, kind: str, cap: int) -> int:
    """Largest micro-batch in [1, cap] that fits, given that batch 1 does.

    Memory is affine in the batch size within a phase (the peak moves from the optimizer step to
    backward as activations grow), so two traces give a first guess; a bracketing binary search on
    real traces then settles it with a handful of estimates.
    """
    if cap == 1:
        return 1
    e2 = est_b(2)
    if not _fits(e2, caps, kind):
        return 1
    slope = _need(e2, kind) - _need(e1, kind)
    if caps["device"] is not None and slope > 0:
        guess = int(min(cap, max(2, 1 + (caps["device"] - _need(e1, kind)) // slope)))
    else:
        guess = cap
    lo, hi = 2, None  # lo fits; hi (if known) does not
    probe = guess
    while hi is None:
        if _fits(est_b(probe), caps, kind):
            lo = probe
            if probe >= cap:
                return cap
            probe = min(cap, probe * 2)
        else:
            hi = probe
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if _fits(est_b(mid), caps, kind):
            lo = mid
        else:
            hi = mid
    return lo


def _largest_seq_that_fits(est_s: Callable[[int], MemoryEstimate], seq: int, caps, kind: str) -> int | None:
    s = seq // 2
    while s >= 16:
        if _fits(est_s(s), caps, kind):
            return s
        s //= 2
    return None


def _savings(spec: _ModelSpec, e: MemoryEstimate, b: int, flags, common, fp4_format, kind) -> list[Optimization]:
    """Device memory each optimization saves at the planned batch size (toggle one at a time)."""
    ckpt, fp4, off = flags
    base = dict(common)

    def need(**over) -> int:
        kw = dict(batch_size=b, gradient_checkpointing=ckpt, fp4=fp4_format if fp4 else None, offload=off,
                  layer_detail=False)
        kw.update(over)
        a = {**base, **{k: v for k, v in kw.items() if k in base}}
        a.update({k: v for k, v in kw.items() if k not in base})
        return _need(estimate(spec, **a), kind)

    now = _need(e, kind)
    out = [Optimization("flash attention", True, need(attention="math") - now, "O(S) attention activations"),
           Optimization("bf16 autocast", common["precision"] != "fp32",
                        (need(precision="fp32") - now) if common["precision"] != "fp32" else None,
                        "bf16 activations; adds bf16 weight copies")]
    out.append(Optimization("gradient checkpointing", ckpt,
                            (need(gradient_checkpointing=False) - now) if ckpt else
                            now - need(gradient_checkpointing=True), "recomputes blocks in backward (~+33% compute)"))
    out.append(Optimization(f"fp4 weights ({fp4_format})", fp4,
                            (need(fp4=None) - now) if fp4 else now - need(fp4=fp4_format),
                            "freezes linear weights (adapters/biases train)"))
    out.append(Optimization("offload to host/disk tiers", off,
                            (need(offload=False) - now) if off else now - need(offload=True),
                            "weights/optimizer in host memory; speed bound by host<->device bandwidth"))
    return out


def _tier_levels(e: MemoryEstimate, caps, kind: str) -> list[TierLevel]:
    out = []
    for t in e.tiers:
        cap = {"device": caps["device"], "host": caps["host"], "disk": caps["disk"]}[t.name]
        out.append(TierLevel(t.level, t.name, cap, t.total))
    return out


# ----------------------------------------------------------------------------------------------- formatting

def format_estimate(est: MemoryEstimate, measured: Mapping[str, int] | None = None) -> str:
    """A readable report of an estimate: setup, breakdown per tier, peak, per-layer activations.

    `measured` (e.g. ``{"peak_allocated": torch.cuda.max_memory_allocated(), "peak_reserved":
    torch.cuda.max_memory_reserved()}`` after a real step) adds the measured peak beside the
    prediction, with the error -- what ``vbhal train --estimate-resources`` shows after one step.
    """
    from vbhal._table import format_table

    s = est.setup
    head = (f"{est.model}: {est.num_parameters / 1e6:,.1f}M parameters ({est.num_trainable / 1e6:,.1f}M trainable); "
            f"batch {s['batch_size']} x seq {s['seq_length']}, {s['precision']}, "
            f"{s['optimizer']} ({s['optimizer_impl']}), "
            f"attention {s['attention']}, checkpointing {'on' if s['gradient_checkpointing'] else 'off'}, "
            f"fp4 {s['fp4'] or 'off'}, offload {'on' if s['offload'] else 'off'}, world size {s['world_size']}")
    cats = ("parameters", "gradients", "optimizer_state", "activations", "temporaries", "workspace",
            "allocator_overhead")
    rows = [[c.replace("_", " ")] + [_h(getattr(t, c)) for t in est.tiers] for c in cats]
    rows.append(["total"] + [_h(t.total) for t in est.tiers])
    rows.append(["capacity"] + [_h(t.capacity) if t.capacity is not None else "-" for t in est.tiers])
    rows.append(["fits"] + ["-" if t.fits is None else ("yes" if t.fits else "NO") for t in est.tiers])
    table = format_table(["at the peak"] + [t.name for t in est.tiers], rows)
    peak = (f"peak allocated {_h(est.peak_allocated)} (in {est.peak_phase}); needs {_h(est.device_need)} under a "
            f"cap; reserved without one ~{_h(est.peak_reserved)}; "
            f"activations saved in forward {_h(est.activations_total_saved)}; "
            f"autocast weight copies at the peak {_h(est.autocast_copies)}; "
            f"optimizer temporaries {_h(est.optimizer_temporaries)}")
    if measured:
        for key in ("peak_allocated", "peak_reserved"):
            if measured.get(key):
                pred, real = getattr(est, key), measured[key]
                peak += (f"\n{key.replace('_', ' ')}: predicted {_h(pred)}, measured {_h(real)} "
                         f"({100 * (pred / real - 1):+.1f}%)")
    layers = est.layers
    lrows = []
    if layers:
        blocks = [la for la in layers if la.checkpointed_bytes is not None]
        others = [la for la in layers if la.checkpointed_bytes is None]
        if blocks:
            lrows.append([f"{blocks[0].name} .. {blocks[-1].name} ({len(blocks)}x, each)", _h(blocks[0].saved_bytes),
                          _h(blocks[0].checkpointed_bytes)])
        for la in others:
            lrows.append([la.name, _h(la.saved_bytes), "-"])
    ltable = format_table(["activations per layer", "saved", "checkpointed"], lrows) if lrows else ""
    parts = [head, "", table, "", peak]
    if ltable:
        parts += ["", ltable]
    if est.notes:
        parts += [""] + [f"note: {n}" for n in est.notes]
    return "\n".join(parts)


def format_plan(p: Plan) -> str:
    """A readable report of a plan: the recommendation, each optimization's saving, the tiers."""
    from vbhal._table import format_table

    lines = []
    if p.fits:
        gb = f", global batch {p.global_batch}" if p.global_batch else ""
        lines.append(f"plan: mode {p.mode!r}, micro-batch {p.batch_size} x grad accumulation {p.grad_accum}{gb} "
                     f"at seq {p.seq_length}")
    else:
        lines.append(f"plan: DOES NOT FIT. {p.missing}")
    if p.optimizations:
        lines += ["", format_table(["optimization", "on", "device memory it saves"],
                                   [[o.name, o.enabled, _h(o.saves) if o.saves is not None else "-"]
                                    for o in p.optimizations])]
    lines += ["", format_table(["tier", "level", "capacity", "used"],
                               [[t.name, t.level, _h(t.capacity), _h(t.used)] for t in p.tiers])]
    if p.suggestions:
        lines += [""] + [f"would fit: {s}" for s in p.suggestions]
    lines += ["", "overrides: " + json.dumps(p.to_optimize_overrides())]
    return "\n".join(lines)
