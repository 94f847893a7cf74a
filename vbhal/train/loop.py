"""The training loop behind `vbhal train`.

`run(cfg)` does, in order: check every setting, load the data, check the resume checkpoint, build
the model (print its parameter counts), apply `vbhal.optimize` when a vbhal feature was asked for,
wrap it for DDP/FSDP2, then train:

* micro-batches under autocast (bf16; fp16 with a GradScaler), ``gradient_accumulation_steps`` of them
  per optimizer step, the gradient all-reduce skipped (``no_sync``) on all but the last;
* AdamW (weight decay on matrices only, fused on CUDA), linear warmup then cosine (or linear /
  constant) decay to ``min_lr_ratio`` of the peak, gradient clipping (folded into the fused AdamW
  kernel as its ``grad_scale`` on CUDA);
* ``--mode memory`` (or a --vgpu-auto plan with offload): the offload engine (`vbhal.nn.offload`)
  replaces the optimizer: blocks streamed through the device, fp32 masters and AdamW on the host, one
  backward + ``engine.step()`` per micro-batch, LR via ``engine.set_lr``, clipping and the skip of
  non-finite steps inside the engine, ``engine.state_dict()`` in every checkpoint (exact resume) and
  the masters as ordinary GPT weights in ``model`` / best_model.pt;
* one host sync per step (loss and grad norm together): a NaN/Inf stops the run *before* the
  optimizer step, so the saved state is the last good one;
* validation every ``val_interval`` steps (default: every epoch end), best model -> best_model.pt;
* tokens/s and, on GPUs, model FLOP utilisation (PaLM formula, see `GPT.flops_per_token`);
* tqdm progress bar, ``training_<timestamp>.log``, ``metrics.jsonl``, ``loss_curve.png``, TensorBoard
  when installed; all written by rank 0 only;
* SIGINT/SIGTERM: the step in flight finishes, all ranks agree, a checkpoint is saved, and the
  process exits with 128 + signal number (130 / 143). A second Ctrl-C aborts at once.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn as nn

from vbhal.train import checkpoint as ckpt
from vbhal.train import distributed as D
from vbhal.train._errors import (CheckpointError, ConfigError, DataError, FeatureUnavailableError,
                                 ResumeError)
from vbhal.train.config import TrainConfig
from vbhal.train.data import (TokenWindows, ResumableSampler, load_corpus, loader_settings,
                              make_loader)
from vbhal.train.model import GPT, GPTConfig

__all__ = ["run", "TrainResult", "peak_flops", "lr_at", "build_optimizer"]

_FLUSH_EVERY = 10   # with deferred sync, the host reads losses (and answers signals) at least this often

# Dense (no sparsity) bf16 tensor-core peaks, from NVIDIA's data sheets (H100 / H200 / A100).
# MFU is reported only for devices listed here (or with VBHAL_PEAK_TFLOPS set).
_PEAK_BF16_TFLOPS = (
    ("H200", 989.4), ("H100 NVL", 835.0), ("H100 PCIE", 756.0), ("H100", 989.4), ("GH200", 989.4),
    ("B200", 2250.0), ("A100", 312.0), ("L40S", 362.05), ("A10G", 70.0), ("L4", 121.0),
)


def peak_flops(device: torch.device) -> float | None:
    """Peak dense bf16 FLOP/s of `device`, or None when unknown (then no MFU is printed)."""
    env = os.environ.get("VBHAL_PEAK_TFLOPS")
    if env:
        return float(env) * 1e12
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device).upper()
    for key, tflops in _PEAK_BF16_TFLOPS:
        if key in name:
            return tflops * 1e12
    return None


def lr_at(step: int, *, warmup: int, total: int, schedule: str, min_ratio: float) -> float:
    """Multiplier of the peak LR at optimizer step `step` (0-based): linear warmup from 1/warmup to 1
    over `warmup` steps, then cosine / linear decay to `min_ratio` at `total`, or constant."""
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    if schedule == "constant":
        return 1.0
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    if schedule == "linear":
        return 1.0 - (1.0 - min_ratio) * progress
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def build_optimizer(model: nn.Module, cfg: TrainConfig, lr: float, device: torch.device) -> torch.optim.AdamW:
    """AdamW over the trainable parameters; weight decay only on tensors of rank >= 2 (matrices and
    embeddings), as in nanoGPT / GPT-3."""
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    fused = cfg.deferred_sync if cfg.deferred_sync is not None else device.type == "cuda"
    kwargs = {"fused": True} if fused else {}
    return torch.optim.AdamW(groups, lr=lr, betas=(cfg.beta1, cfg.beta2), eps=1e-8, **kwargs)


@dataclass
class TrainResult:
    """What a run did; `exit_code` is what the CLI returns (0 done, 130/143 signal, 3 NaN)."""

    step: int = 0
    epoch: int = 0
    losses: list[float] = field(default_factory=list)         # train loss of every step this process ran
    val_losses: list[tuple[int, float]] = field(default_factory=list)
    best_val_loss: float | None = None
    stopped: str = "done"
    exit_code: int = 0
    output_dir: Path | None = None
    last_checkpoint: Path | None = None
    tokens_per_second: float | None = None
    mfu: float | None = None
    elapsed: float = 0.0


class _RunLog:
    """Messages to the console (above the progress bar) and to training_<timestamp>.log (rank 0)."""

    def __init__(self, info: D.DistInfo, path: Path | None):
        self.main = info.is_main
        self.fh = open(path, "a", buffering=1) if (path is not None and self.main) else None
        self.bar = None

    def __call__(self, msg: str, *, console: bool = True) -> None:
        if not self.main:
            return
        if self.fh is not None:
            self.fh.write(time.strftime("%Y-%m-%d %H:%M:%S ") + msg + "\n")
        if console:
            if self.bar is not None:
                self.bar.write(msg, file=sys.stderr)
            else:
                print(msg, file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.fh is not None:
            self.fh.close()
            self.fh = None


class _Signals:
    """Turns the first SIGINT/SIGTERM into a flag checked at step boundaries."""

    def __init__(self, log: _RunLog):
        self.received: int | None = None
        self.pending: str | None = None
        self.log = log
        self.previous: dict[int, object] = {}

    def _handler(self, signum, frame):  # noqa: ARG002
        if self.received is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        if self.received is not None:
            return  # a repeated SIGTERM: already stopping
        self.received = signum
        # A handler runs between two bytecodes of whatever the main thread was doing, possibly inside a
        # write to the log file (or deep inside torch.compile): writing to that file here would raise
        # "reentrant call". Tell the console with one raw write and log to the file at the step boundary.
        msg = (f"received {signal.Signals(signum).name}: finishing this step, saving a checkpoint, "
               f"then stopping (Ctrl-C again aborts without saving).")
        self.pending = msg
        try:
            os.write(2, (msg + "\n").encode())
        except OSError:
            pass

    def flush(self) -> None:
        """Write the deferred signal message to the run log (called from the loop, not the handler)."""
        if self.pending is not None:
            self.log(self.pending, console=False)
            self.pending = None

    def __enter__(self):
        import threading
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self.previous[sig] = signal.signal(sig, self._handler)
        return self

    def __exit__(self, *exc):
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)
        return False


def _precision(cfg: TrainConfig, device: torch.device) -> str:
    mp = cfg.mixed_precision
    if mp == "auto":
        if device.type == "cuda" and torch.cuda.is_bf16_supported():
            return "bf16"
        return "no"
    if mp == "fp16" and device.type != "cuda":
        raise ConfigError("--mixed-precision fp16 needs a CUDA device (its GradScaler is CUDA-only here); "
                          "use bf16 or no on this device.")
    return mp


def _autocast(precision: str, device: torch.device):
    if precision == "no":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)


def _apply_vbhal_features(model: nn.Module, cfg: TrainConfig, device: torch.device, log,
                          plan_overrides: dict | None = None, offload: bool = False) -> nn.Module:
    """--use-fp4 / --use-flash-attn / --mode / --vgpu-auto -> `vbhal.optimize` (the core's API).

    Only the flags the user gave (or the planner chose) are passed as overrides; the rest come from
    the mode. The loop owns autocast, so optimize's own autocast is turned off
    (``mixed_precision="none"``) and the weights stay fp32 masters for the optimizer. With `offload`
    the loop has already built the offload engine (`_build_engine`, with its own optimizer settings):
    optimize then does the rest of the mode (attention), not the offload nor the model-level
    checkpointing (the engine recomputes every streamed unit in backward).
    """
    overrides: dict = dict(plan_overrides or {})
    if cfg.mode is None and not plan_overrides:
        # No mode asked for: change only what the flags name (a mode would also turn on, e.g.,
        # balanced's gradient checkpointing).
        overrides.update(fp4=False, attention=False, gradient_checkpointing=False, offload=False)
    if cfg.use_fp4 is not None:
        overrides["fp4"] = bool(cfg.use_fp4)
        if cfg.use_fp4:
            overrides["fp4_format"] = cfg.fp4_format
    if cfg.use_flash_attn is not None:
        overrides["attention"] = bool(cfg.use_flash_attn)
    if cfg.gradient_checkpointing:
        overrides["gradient_checkpointing"] = True
    mode = overrides.pop("mode", None) or cfg.mode
    if offload:
        overrides.update(offload=False, gradient_checkpointing=False, fp4=False)
    if not (overrides.get("fp4") or overrides.get("attention") or overrides.get("offload")) and mode is None:
        return model, None   # nothing of vbhal's asked for (checkpointing is the model's own switch)
    try:
        import vbhal
        optimize = vbhal.optimize
    except (ImportError, AttributeError) as exc:
        raise FeatureUnavailableError(
            f"--use-fp4/--use-flash-attn/--mode need vbhal.optimize, which is not importable in this "
            f"build ({exc}). Run without those flags.") from None
    overrides["mixed_precision"] = "none"
    applied = dict(overrides, mode=mode or "speed")
    model = optimize(model, applied["mode"], device=str(device), **overrides)
    if offload:
        applied["offload"] = True
    report = getattr(model, "_vbhal_report", None)
    if report is not None:
        text = report.format(max_rows=12) if hasattr(report, "format") else str(report)
        log("vbhal.optimize:\n" + text)
    return model, applied


def _sdpa_backend_context(name: str, device: torch.device):
    """Prefer one SDPA backend (then the others) for the whole run; inside torch.compile the choice is
    made while tracing, so it must be set around the run rather than per call."""
    if name == "auto" or device.type != "cuda":
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel
    order = {"cudnn": SDPBackend.CUDNN_ATTENTION, "flash": SDPBackend.FLASH_ATTENTION,
             "efficient": SDPBackend.EFFICIENT_ATTENTION, "math": SDPBackend.MATH}
    backends = [order[name]] + [b for k, b in order.items() if k != name]
    try:
        return sdpa_kernel(backends, set_priority=True)
    except TypeError:  # torch without priority support: allow only the chosen one (+ math fallback)
        return sdpa_kernel([order[name], SDPBackend.MATH])


def offload_requested(mode: str | None, overrides: dict | None) -> bool:
    """--mode memory (unless the flags turned offload off) or a --vgpu-auto plan that needs offload."""
    overrides = overrides or {}
    return bool(overrides.get("offload")) or (mode == "memory" and "offload" not in overrides)


def _check_offload(cfg: TrainConfig, info: D.DistInfo, precision: str, overrides: dict | None) -> None:
    """Refuse the combinations the offload engine (vbhal.nn.offload) cannot run, before any work."""
    why = "--mode memory" if cfg.mode == "memory" else "the --vgpu-auto plan (it needs offload)"
    if info.enabled:
        raise ConfigError(f"{why} streams the weights through one device and steps AdamW on this host; it "
                          f"does not run under DDP/FSDP ({info.world_size} ranks). Run one process, or use "
                          f"--mode balanced/full with --strategy fsdp to shard instead.")
    if cfg.compile:
        raise ConfigError(f"{why} with --compile: the offload engine moves weights in and out of the model "
                          f"around every block (hooks and host threads torch.compile cannot trace). Drop "
                          f"--compile, or use --mode balanced.")
    if precision == "fp16":
        raise ConfigError(f"{why} with --mixed-precision fp16: the host AdamW steps do not take a gradient "
                          f"scaler. Use --mixed-precision bf16 (or no).")
    if cfg.use_fp4 or (overrides or {}).get("fp4"):
        raise ConfigError(f"{why} with FP4 weights is not wired into `vbhal train` yet (the FP4 swap must "
                          f"precede the offload, which vbhal.optimize does with its own optimizer settings). "
                          f"Use --use-fp4 with --mode full, or --mode memory without --use-fp4.")


def _build_engine(model: GPT, cfg: TrainConfig, device: torch.device, lr: float, log):
    """The offload engine that replaces this loop's optimizer in memory mode: fp32 masters and AdamW
    on the host, the blocks streamed through `device`, accumulation over `gradient_accumulation_steps`
    backward passes, global-norm clipping and the skip of non-finite steps inside the engine."""
    try:
        from vbhal.nn.offload import apply_offload
    except ImportError as exc:
        raise FeatureUnavailableError(f"--mode memory needs vbhal.nn.offload, which is not importable in "
                                      f"this build ({exc}).") from None
    engine = apply_offload(model, device=device, lr=lr, betas=(cfg.beta1, cfg.beta2), eps=1e-8,
                           weight_decay=cfg.weight_decay, grad_accum_steps=cfg.gradient_accumulation_steps,
                           max_grad_norm=cfg.max_grad_norm if cfg.max_grad_norm > 0 else None,
                           skip_nonfinite=True)
    summ = engine.memory_summary()
    log(f"offload engine: {summ['units']} units streamed through {device} ({summ['streamed_params']:,} "
        f"parameters, largest unit {summ['max_unit_bytes'] / 2**20:.1f} MiB), fp32 masters + AdamW "
        f"({summ['host_step']}) on the host; weight decay {cfg.weight_decay:g} on every parameter (the "
        f"engine has one group), clipping "
        + (f"at global norm {cfg.max_grad_norm:g}" if cfg.max_grad_norm > 0 else "off")
        + ", non-finite steps skipped")
    return engine


def offload_model_state(model: nn.Module, engine) -> dict:
    """A state dict `GPT.load_state_dict` takes (tied weights under both names) from the engine's fp32
    master weights: the model's own parameters are only device placeholders while it is offloaded."""
    masters = engine.master_state_dict()
    canonical = {id(p): n for n, p in model.named_parameters()}
    out = {}
    for name, t in model.state_dict(keep_vars=True).items():
        if isinstance(t, nn.Parameter):
            out[name] = masters[canonical[id(t)]]
        else:
            out[name] = t.detach().to("cpu").clone()
    return out


def _estimate_module():
    import importlib
    try:
        return importlib.import_module("vbhal.estimate")
    except Exception as exc:
        raise FeatureUnavailableError(
            f"--estimate-resources / --vgpu-auto need vbhal.estimate, which is not available in this "
            f"build ({type(exc).__name__}: {exc}).") from None


def _estimate_precision(precision: str) -> str:
    return {"bf16": "bf16-mixed", "fp16": "fp16-mixed", "no": "fp32"}[precision]


def info_single(world_size: int) -> bool:
    """Offload (one device + the host) is an option for the planner only in a single-process run."""
    return world_size == 1


def vgpu_plan(cfg: TrainConfig, model_cfg: GPTConfig, device: torch.device, precision: str,
              world_size: int):
    """--vgpu-auto: ask `vbhal.estimate.plan` for mode, micro-batch and accumulation that fit this
    device at the run's global batch; raise ConfigError (with the planner's suggestions) if none does."""
    est = _estimate_module()
    global_batch = cfg.batch_size * cfg.gradient_accumulation_steps * world_size
    p = est.plan(model_cfg, seq_length=model_cfg.seq_length, global_batch=global_batch,
                 precision=_estimate_precision(precision), allow_fp4=bool(cfg.use_fp4),
                 fp4_format=cfg.fp4_format, world_size=world_size,
                 allow_offload=info_single(world_size),
                 device="cuda" if device.type == "cuda" else "cpu")
    if not p.fits:
        raise ConfigError(f"--vgpu-auto: no setup fits: {p.missing}. "
                          + ("Suggestions: " + "; ".join(p.suggestions) if p.suggestions else ""))
    return p, est.format_plan(p)


def estimate_resources(cfg: TrainConfig, model_cfg: GPTConfig, device: torch.device, precision: str,
                       world_size: int) -> str:
    """The estimator's report for this run's model, micro-batch and features (`vbhal.estimate`)."""
    est = _estimate_module()
    e = est.estimate(model_cfg, batch_size=cfg.batch_size, seq_length=model_cfg.seq_length,
                     precision=_estimate_precision(precision), gradient_checkpointing=cfg.gradient_checkpointing,
                     fp4=cfg.fp4_format if cfg.use_fp4 else None,
                     attention="flash" if (cfg.use_flash_attn or device.type == "cuda") else "math",
                     world_size=world_size, distributed=cfg.strategy,
                     device="cuda" if device.type == "cuda" else "cpu")
    return est.format_estimate(e)


def _count_params(model: GPT) -> str:
    total = model.num_parameters()
    non_emb = model.num_parameters(non_embedding=True)
    seen, trainable = set(), 0
    for p in model.parameters():
        if id(p) not in seen and p.requires_grad:
            seen.add(id(p))
            trainable += p.numel()
    return (f"model parameters: {total:,} total, {non_emb:,} non-embedding, {trainable:,} trainable "
            f"({model.config.num_layers} layers x hidden {model.config.hidden_size}, "
            f"{model.config.num_heads} heads"
            + (f" / {model.config.num_kv_heads} kv heads" if model.config.num_kv_heads else "")
            + f", seq {model.config.seq_length}, vocab {model.config.vocab_size})")


def _prepare_output(cfg: TrainConfig, resuming: bool, overwrite: bool) -> Path:
    out = Path(cfg.output_dir)
    ckdir = out / "checkpoints"
    existing = ckpt.list_checkpoints(ckdir)
    if existing and not resuming:
        if not overwrite:
            raise ConfigError(
                f"{out} already holds checkpoints of an earlier run ({existing[-1].name}). Continue it with "
                f"--resume {out}, write to another --output-dir, or pass --overwrite to delete them.")
    return out


def _wipe_checkpoints(out: Path) -> None:
    import shutil
    ckdir = out / "checkpoints"
    if ckdir.is_dir():
        shutil.rmtree(ckdir)
    for name in ("best_model.pt", "best_model.pt.json", "metrics.jsonl"):
        (out / name).unlink(missing_ok=True)


def run(cfg: TrainConfig, *, overwrite: bool = False) -> TrainResult:
    """Train as `cfg` says. Raises ConfigError/DataError/CheckpointError before any work on bad input."""
    t_start = time.time()
    cfg = cfg.with_preset_defaults()
    cfg.check()
    model_cfg = cfg.model_config()
    info = D.init_distributed(cfg.device)
    device = info.device
    try:
        return _run(cfg, model_cfg, info, device, overwrite, t_start)
    finally:
        D.shutdown(info)


def _size_cpu_threads(info: D.DistInfo) -> str | None:
    """On CPU runs, use only the cores that are idle: intra-op threads that outnumber free cores spin
    against each other (measured here: 2 threads on a 2-core machine with 3 other busy processes ran
    8x slower than 1 thread). Skipped when OMP_NUM_THREADS is set."""
    if os.environ.get("OMP_NUM_THREADS"):
        return None
    try:
        cpus = len(os.sched_getaffinity(0))
        busy = os.getloadavg()[0]
    except (AttributeError, OSError):
        return None
    free = max(1, int(cpus - busy + 0.5)) // max(1, info.local_world_size)
    want = max(1, min(torch.get_num_threads(), free))
    if want < torch.get_num_threads():
        before = torch.get_num_threads()
        torch.set_num_threads(want)
        return (f"CPU: {cpus} cores, load {busy:.1f}: using {want} intra-op thread(s) instead of {before} "
                f"(set OMP_NUM_THREADS to choose)")
    return None


def _agreed(fn, info: D.DistInfo, first_rank_only: bool = False):
    """Run fn (on rank 0 only when `first_rank_only`) and make every rank raise the same error if it
    fails, instead of leaving the others waiting in a collective."""
    value, error = None, None
    if info.is_main or not first_rank_only:
        try:
            value = fn()
        except (ConfigError, CheckpointError) as exc:   # DataError/ResumeError are subclasses
            error = exc
    errors = D.gather_objects(None if error is None else (type(error).__name__, str(error)), info)
    first = next((e for e in errors if e is not None), None)
    if error is not None:
        raise error
    if first is not None:
        kind = {"DataError": DataError, "ResumeError": ResumeError, "CheckpointError": CheckpointError}.get(
            first[0], ConfigError)
        raise kind(first[1])
    return value


def _run(cfg: TrainConfig, model_cfg: GPTConfig, info: D.DistInfo, device: torch.device, overwrite: bool,
         t_start: float) -> TrainResult:
    precision = _precision(cfg, device)
    thread_note = _size_cpu_threads(info) if device.type == "cpu" else None
    if cfg.strategy == "fsdp" and not info.enabled:
        raise ConfigError("--strategy fsdp shards the model over several processes; launch with --nproc N "
                          "(N >= 2) or torchrun, or use the default ddp.")
    if cfg.estimate_resources:
        report = estimate_resources(cfg, model_cfg, device, precision, info.world_size)
        if info.is_main:
            print(report)
        return TrainResult(stopped="estimate-only", output_dir=Path(cfg.output_dir))
    plan_overrides = None
    if cfg.vgpu_auto:
        plan, plan_text = vgpu_plan(cfg, model_cfg, device, precision, info.world_size)
        if info.is_main:
            print(plan_text, file=sys.stderr)
        plan_overrides = plan.to_optimize_overrides()
        cfg = dataclasses.replace(cfg, batch_size=plan_overrides.pop("batch_size"),
                                  gradient_accumulation_steps=plan_overrides.pop("grad_accum"))
        plan_overrides.pop("mixed_precision", None)   # the loop's own autocast stays in charge
        if plan_overrides.get("gradient_checkpointing"):
            cfg = dataclasses.replace(cfg, gradient_checkpointing=True)

    offload = offload_requested((plan_overrides or {}).get("mode") or cfg.mode, plan_overrides)
    if offload:
        _check_offload(cfg, info, precision, plan_overrides)
    resuming = cfg.resume is not None
    out = _prepare_output(cfg, resuming, overwrite)

    # ---- data (rank 0 builds the token cache first, the others then read it) --------------------
    def _load():
        return load_corpus(cfg.data, max_bytes=cfg.max_corpus_bytes)

    corpus = _agreed(_load, info, first_rank_only=True)
    if not info.is_main:
        corpus = _load()
    train_set = TokenWindows(corpus.train, model_cfg.seq_length, "train")
    top = int(max(corpus.train.max(initial=0), corpus.val.max(initial=0)))
    if model_cfg.vocab_size <= top:
        raise DataError(f"the data holds token id {top} but --vocab-size is {model_cfg.vocab_size}; "
                        f"raise --vocab-size.")
    # validation split (needed only when validating: --val-batches 0 turns it off)
    val_set = TokenWindows(corpus.val, model_cfg.seq_length, "validation") if cfg.val_batches else None
    if val_set is not None and len(val_set) < info.world_size:
        raise DataError(f"the validation split has {len(val_set)} windows, fewer than the {info.world_size} "
                        f"ranks; give more data, a shorter --seq-length, or --val-batches 0.")
    sampler = ResumableSampler(train_set, num_replicas=info.world_size, rank=info.rank, shuffle=True,
                               seed=cfg.seed)
    micro_per_epoch = len(sampler) // cfg.batch_size
    steps_per_epoch = micro_per_epoch // cfg.gradient_accumulation_steps
    global_batch = cfg.batch_size * cfg.gradient_accumulation_steps * info.world_size
    if steps_per_epoch == 0:
        raise DataError(f"the training split has {len(train_set)} windows of {model_cfg.seq_length} tokens, "
                        f"fewer than one optimizer step needs (batch {cfg.batch_size} x accumulation "
                        f"{cfg.gradient_accumulation_steps} x {info.world_size} ranks = {global_batch}); "
                        f"give more data or lower --batch-size / --seq-length.")
    total_steps = cfg.max_steps if cfg.max_steps is not None else cfg.epochs * steps_per_epoch
    if cfg.warmup_steps > total_steps:
        raise ConfigError(f"--warmup-steps {cfg.warmup_steps} is more than the run's {total_steps} steps; "
                          f"lower it (e.g. to {max(0, total_steps // 10)}).")

    # ---- resume checkpoint: checked before anything is built --------------------------------------
    state = None
    log_path = None
    if info.is_main:
        out.mkdir(parents=True, exist_ok=True)
        log_path = out / f"training_{time.strftime('%Y%m%d_%H%M%S')}.log"
    log = _RunLog(info, log_path)
    try:
        if resuming:
            found = _agreed(lambda: ckpt.find_resumable(cfg.resume, log=log), info, first_rank_only=True)
            found_path = D.broadcast_object(str(found[0]) if found else None, info)
            state = found[1] if found else ckpt.load_checkpoint(Path(found_path))
            ckpt.require_same_model(state["model_config"], model_cfg.to_dict(), Path(found_path))
            if (state.get("engine") is not None) != offload:
                raise ResumeError(
                    f"{found_path} was written " + ("with" if state.get("engine") is not None else "without")
                    + " the offload engine (--mode memory), this run is " + ("with" if offload else "without")
                    + " it: their optimizer states differ. Resume with the same --mode.")
            log(f"resuming from {found_path} (step {state['step']}, epoch {state['epoch']})")
        elif overwrite and info.is_main:
            _wipe_checkpoints(out)
        D.barrier(info)
        if thread_note:
            log(thread_note)
        if cfg.sdpa_backend != "auto":
            log(f"SDPA backend priority: {cfg.sdpa_backend} first" + ("" if device.type == "cuda" else
                " (ignored: not a CUDA device)"))
        with _sdpa_backend_context(cfg.sdpa_backend, device):
            return _train(cfg, model_cfg, info, device, precision, corpus, train_set, val_set, sampler,
                          steps_per_epoch, total_steps, state, out, log, t_start, plan_overrides, offload)
    finally:
        log.close()


def _train(cfg, model_cfg, info, device, precision, corpus, train_set, val_set, sampler, steps_per_epoch,
           total_steps, state, out: Path, log: _RunLog, t_start: float,
           plan_overrides: dict | None = None, offload: bool = False) -> TrainResult:
    result = TrainResult(output_dir=out)
    ckdir = out / "checkpoints"
    metrics_path = out / "metrics.jsonl"
    why = ("" if cfg.device != "auto" else
           " (auto: CUDA found)" if device.type == "cuda" else " (auto: no CUDA device found)")
    log(f"device: {device}{why}" + (f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else "")
        + f", precision: {precision}, ranks: {info.world_size} ({cfg.strategy if info.enabled else 'single process'})")
    log(f"data: {corpus.source} -> {corpus.num_train_tokens:,} train / {corpus.num_val_tokens:,} validation "
        f"tokens ({corpus.num_documents} documents); epoch = {len(train_set)} windows of {model_cfg.seq_length} "
        f"= {len(train_set) * model_cfg.seq_length:,} tokens, {steps_per_epoch} steps")

    # ---- model -------------------------------------------------------------------------------
    torch.manual_seed(cfg.seed)   # identical initial weights on every rank
    model = GPT(model_cfg)
    if cfg.gradient_checkpointing and not offload:   # the offload engine recomputes every block itself
        model.gradient_checkpointing_enable()
    if not offload:
        model.to(device)   # offloaded: the weights stay on the host, the engine streams them
    log(_count_params(model))
    lr = D.scale_learning_rate(cfg.learning_rate, info.world_size, cfg.lr_scaling)
    engine = _build_engine(model, cfg, device, lr, log) if offload else None
    model, applied = _apply_vbhal_features(model, cfg, device, log, plan_overrides, offload=offload)
    raw: GPT = model
    if applied and applied.get("fp4"):
        log("after vbhal.optimize: " + _count_params(raw) + " (FP4 weights are frozen buffers, not parameters)")
    if state is not None and engine is not None:
        engine.load_state_dict(state["engine"])
    elif state is not None and cfg.strategy != "fsdp":
        raw.load_state_dict(state["model"])
    model = D.wrap_model(model, cfg.strategy, info)
    if engine is None:
        optimizer = build_optimizer(model, cfg, lr, device)
    else:
        # The engine steps AdamW on the host; this stand-in only carries the LR schedule (LambdaLR needs
        # an optimizer), which the loop hands to the engine through set_lr before every step.
        optimizer = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=lr)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_at(s, warmup=cfg.warmup_steps, total=total_steps, schedule=cfg.lr_schedule,
                                   min_ratio=cfg.min_lr_ratio))
    scaler = torch.amp.GradScaler(device.type, enabled=(precision == "fp16"))

    step, epoch, consumed, best_val = 0, 0, 0, None
    if state is not None:
        if cfg.strategy == "fsdp":
            D.load_sharded(model, optimizer, Path(state["sharded"]))
        else:
            optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        if state.get("scaler"):
            scaler.load_state_dict(state["scaler"])
        step, epoch, consumed = state["step"], state["epoch"], state["consumed_in_epoch"]
        best_val = state.get("best_val_loss")
        rngs = state["rng"]
        if len(rngs) == info.world_size:
            ckpt.restore_rng_state(rngs[info.rank])
        else:
            log(f"WARNING: checkpoint has RNG states of {len(rngs)} ranks, this run has {info.world_size}; "
                f"re-seeding (dropout masks will differ from an uninterrupted run).")
            torch.manual_seed(cfg.seed + info.rank + step)
    else:
        torch.manual_seed(cfg.seed + info.rank)  # dropout differs across ranks, as it should
    if cfg.compile:
        model = torch.compile(model) if cfg.compile_mode == "default" else torch.compile(model, mode=cfg.compile_mode)

    settings = loader_settings(device, cfg.num_workers, info.local_world_size)
    loader = make_loader(train_set, cfg.batch_size, sampler, **settings)
    val_loader = None
    if val_set is not None:
        val_bs = max(1, min(cfg.batch_size, len(val_set) // info.world_size))
        val_sampler = ResumableSampler(val_set, num_replicas=info.world_size, rank=info.rank, shuffle=False)
        val_loader = make_loader(val_set, val_bs, val_sampler, num_workers=0,
                                 pin_memory=settings["pin_memory"])

    # ---- outputs ------------------------------------------------------------------------------
    metrics_fh = None
    tb = None
    if info.is_main:
        metrics_fh = open(metrics_path, "a" if state is not None else "w", buffering=1)
        if cfg.tensorboard:
            try:
                import tensorboard  # noqa: F401
                from torch.utils.tensorboard import SummaryWriter
                tb = SummaryWriter(str(out / "tensorboard"))
            except Exception:
                tb = None

    def emit(record: dict) -> None:
        if metrics_fh is not None:
            metrics_fh.write(json.dumps(record) + "\n")
        if tb is not None:
            for k, v in record.items():
                if isinstance(v, (int, float)) and k not in ("step", "epoch"):
                    tb.add_scalar(f"{record['kind']}/{k}", v, record["step"])

    flops_tok = raw.flops_per_token()
    peak = peak_flops(device)
    tokens_per_step = cfg.batch_size * cfg.gradient_accumulation_steps * info.world_size * model_cfg.seq_length
    params = [p for p in model.parameters() if p.requires_grad]

    def evaluate() -> float:
        model.eval()
        total = torch.zeros(2, device=device, dtype=torch.float64)
        with torch.no_grad():
            for i, (x, y) in enumerate(val_loader):
                if i >= cfg.val_batches:
                    break
                x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
                with _autocast(precision, device):
                    _, loss = model(x, y)
                total[0] += loss.double()
                total[1] += 1
        model.train()
        total = D.mean_across_ranks(total, info)
        return float(total[0] / total[1])

    def save(reason: str) -> Path | None:
        nonlocal best_val
        if not cfg.checkpoints:
            log(f"checkpoint at step {step} ({reason}) not written: --no-checkpoints", console=reason != "periodic")
            return None
        path = ckpt.checkpoint_path(ckdir, step)
        rng_all = D.gather_objects(ckpt.capture_rng_state(), info)
        payload = {
            "format": ckpt.CHECKPOINT_FORMAT, "step": step, "epoch": epoch, "consumed_in_epoch": consumed,
            "model_config": model_cfg.to_dict(), "train_config": cfg.to_dict(),
            "scheduler": scheduler.state_dict(), "scaler": scaler.state_dict() if scaler.is_enabled() else {},
            "rng": rng_all, "best_val_loss": best_val, "world_size": info.world_size, "reason": reason,
            "optimize": applied,
        }
        try:
            if cfg.strategy == "fsdp" and info.enabled:
                D.save_sharded(model, optimizer, path.with_suffix(".dcp"), info)
                payload["sharded"] = str(path.with_suffix(".dcp"))
            else:
                payload["model"] = raw.state_dict() if engine is None else offload_model_state(raw, engine)
                payload["optimizer"] = optimizer.state_dict()
                if engine is not None:
                    payload["engine"] = engine.state_dict()
            if info.is_main:
                ckpt.save_checkpoint(payload, ckdir, step)
                ckpt.prune_checkpoints(ckdir, cfg.keep_checkpoints, protect=path)
                log(f"saved checkpoint {path} ({reason})", console=reason != "periodic")
            D.barrier(info)
            result.last_checkpoint = path
            return path
        except CheckpointError as exc:
            log(f"ERROR: {exc} (training state not saved at step {step})")
            return None

    def save_best(val_loss: float) -> None:
        if cfg.strategy == "fsdp" and info.enabled:
            from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
            sd = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        else:
            sd = raw.state_dict() if engine is None else offload_model_state(raw, engine)
        if info.is_main:
            try:
                ckpt.save_atomic({"format": ckpt.CHECKPOINT_FORMAT, "model": sd, "model_config": model_cfg.to_dict(),
                                  "step": step, "val_loss": val_loss, "tokenizer": "bytes+eos256",
                                  "optimize": applied},
                                 out / "best_model.pt")
            except CheckpointError as exc:
                log(f"ERROR: {exc} (best model not saved)")

    def validate() -> None:
        nonlocal best_val
        if not cfg.val_batches:
            return
        v = evaluate()
        improved = best_val is None or v < best_val
        if improved:
            best_val = v
            save_best(v)
        result.val_losses.append((step, v))
        emit({"kind": "val", "step": step, "epoch": epoch, "val_loss": v, "best_val_loss": best_val,
              "elapsed": time.time() - t_start})
        log(f"step {step}: validation loss {v:.4f}" + (" (best, saved best_model.pt)" if improved else
                                                        f" (best {best_val:.4f})"))

    # ---- the loop ------------------------------------------------------------------------------
    try:
        from tqdm import tqdm
        bar = tqdm(total=total_steps, initial=step, disable=not (info.is_main and cfg.progress),
                   unit="step", dynamic_ncols=True, mininterval=1.0, file=sys.stderr)
    except ImportError:  # pragma: no cover
        bar = None
    log.bar = bar
    log(f"training {total_steps} steps ({'max-steps' if cfg.max_steps else f'{cfg.epochs} epochs'}), global batch "
        f"{cfg.batch_size * cfg.gradient_accumulation_steps * info.world_size} x {model_cfg.seq_length} tokens, "
        f"peak lr {lr:g} ({cfg.lr_schedule}, warmup {cfg.warmup_steps})")
    accum = cfg.gradient_accumulation_steps
    global_batch = cfg.batch_size * accum * info.world_size
    stop_reason = None
    stop_at = step + cfg.stop_after_steps if cfg.stop_after_steps else -1
    window_t, window_steps, window_loss = time.time(), 0, 0.0
    last_tps = None
    step_norm = float("nan")
    logged_memory = False
    # Deferred sync (default on CUDA): the NaN guard runs on the device. The fused AdamW kernel takes a
    # `found_inf` flag (GradScaler's own mechanism) and skips the whole update when it is set; the flag
    # is sticky, so from the first non-finite step on no update lands. The host reads losses only at
    # flush points (logging, validation, saving, epoch end, at most every _FLUSH_EVERY steps) and then
    # rewinds the step counter, data position and schedule to the last good step. Without it every
    # step waits for the GPU before the next one can be queued.
    device_guard = bool(optimizer.defaults.get("fused")) and precision != "fp16"
    # With the device guard, clipping is folded into the fused AdamW kernel: it divides each gradient by
    # `grad_scale` (GradScaler's unscale input) = max(norm / max_norm, 1) while it reads it, which saves the
    # separate read-modify-write pass over all gradients of clip_grad_norm_ (same clip, division instead
    # of multiplication by the reciprocal: may differ in the last bit). Not under FSDP2 (DTensor norms).
    fused_clip = device_guard and cfg.max_grad_norm > 0 and not (cfg.strategy == "fsdp" and info.enabled)
    grad_scale = None
    nan_seen = torch.zeros((), dtype=torch.bool, device=device)
    pending: list[tuple[int, torch.Tensor]] = []

    def record(vals: list[list[float]]) -> None:
        nonlocal window_steps, window_loss, step_norm
        for loss_v, norm_v in vals:
            result.losses.append(loss_v)
            window_steps += 1
            window_loss += loss_v
            step_norm = norm_v

    def rewind_to(good_step: int) -> None:
        nonlocal step, done_in_epoch, consumed
        back = step - good_step
        step, done_in_epoch, consumed = good_step, done_in_epoch - back, consumed - back * global_batch
        scheduler.last_epoch = good_step
        lrs = [base * scheduler.lr_lambdas[0](good_step) for base in scheduler.base_lrs]
        for group, value in zip(optimizer.param_groups, lrs):
            group["lr"] = value
        scheduler._last_lr = lrs

    model.train()
    with _Signals(log) as signals:
        while step < total_steps and stop_reason is None:
            sampler.set_epoch(epoch)
            sampler.set_start(consumed)
            done_in_epoch = consumed // global_batch
            it = iter(loader)
            while done_in_epoch < steps_per_epoch and step < total_steps:
                loss_sum = torch.zeros((), device=device)
                if engine is not None:
                    engine.set_lr(optimizer.param_groups[0]["lr"])   # this step's LR from the schedule
                for micro in range(accum):
                    x, y = next(it)
                    x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
                    with D.no_sync(model, micro < accum - 1):
                        with _autocast(precision, device):
                            _, loss = model(x, y)
                        scaler.scale(loss / accum).backward()
                    if engine is not None:
                        closed = engine.step()   # None until the last micro-batch closes the step
                    loss_sum += loss.detach()
                if scaler.is_enabled():
                    scaler.unscale_(optimizer)
                if engine is not None:
                    # The engine clipped (or skipped a non-finite step: nothing was updated) already.
                    gnorm = torch.tensor(float("nan") if closed.skipped else (closed.grad_norm or 0.0))
                elif fused_clip:
                    gnorm = torch.nn.utils.get_total_norm([p.grad for p in params if p.grad is not None])
                    grad_scale = torch.clamp((gnorm + 1e-6) / cfg.max_grad_norm, min=1.0)
                elif cfg.max_grad_norm > 0:
                    gnorm = torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
                    if hasattr(gnorm, "full_tensor"):   # FSDP2: a DTensor (already reduced over ranks)
                        gnorm = gnorm.full_tensor()
                else:
                    gnorm = torch.zeros((), device=device)
                stats = torch.stack([loss_sum / accum, gnorm.float().to(device)])
                halt = False
                if device_guard:
                    nan_seen |= ~torch.isfinite(stats).all()
                    optimizer.grad_scale, optimizer.found_inf = grad_scale, nan_seen.float()
                    try:
                        optimizer.step()
                    finally:
                        del optimizer.grad_scale, optimizer.found_inf
                else:
                    vals = stats.tolist()
                    bad = not math.isfinite(vals[0]) or (not scaler.is_enabled() and not math.isfinite(vals[1]))
                    local = 2 if bad else (1 if signals.received is not None or step + 1 == stop_at else 0)
                    verdict = D.max_across_ranks(local, info)   # one tiny all-reduce: all ranks agree
                    if verdict == 2:
                        # Do not step: the weights stay those of the last good step. (The engine skips
                        # a step whose gradients are non-finite by itself; a non-finite loss with finite
                        # gradients, which autograd does not produce, would have been applied.)
                        if engine is not None and not closed.skipped:
                            log(f"WARNING: step {step + 1}: the loss is non-finite but the gradients were "
                                f"finite, so the offload engine applied that update.")
                        optimizer.zero_grad(set_to_none=True)
                        stop_reason = "nan"
                        break
                    halt = verdict == 1
                    if engine is None:
                        scaler.step(optimizer)
                        scaler.update()
                    else:
                        optimizer.step()   # the stand-in: no parameters with gradients, keeps LambdaLR quiet
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
                step += 1
                done_in_epoch += 1
                consumed += global_batch
                due_log = step % cfg.log_interval == 0 or step == total_steps
                due_val = bool(cfg.val_interval) and step % cfg.val_interval == 0
                due_save = bool(cfg.save_steps) and step % cfg.save_steps == 0 and step < total_steps
                if device_guard:
                    pending.append((step, stats))
                    flush = (due_log or due_val or due_save or step % _FLUSH_EVERY == 0 or step == stop_at
                             or done_in_epoch >= steps_per_epoch or step == total_steps
                             or (not info.enabled and signals.received is not None))
                    if not flush:
                        if bar is not None:
                            bar.update(1)
                        continue
                    vals = torch.stack([t for _, t in pending]).tolist()   # the one host sync
                    bad_at = [n for (n, _), v in zip(pending, vals) if not all(map(math.isfinite, v))]
                    local = 2 if bad_at else (1 if signals.received is not None or step == stop_at else 0)
                    verdict = D.max_across_ranks(local, info)
                    if verdict == 2:
                        first_bad = -D.max_across_ranks(-(bad_at[0] if bad_at else step + 1), info)
                        record([v for (n, _), v in zip(pending, vals) if n < first_bad])
                        pending.clear()
                        rewind_to(first_bad - 1)
                        stop_reason = "nan"
                        break
                    record(vals)
                    pending.clear()
                    halt = verdict == 1
                else:
                    record([vals])
                if bar is not None:
                    bar.update(step - bar.n)
                if due_log:
                    if device.type == "cuda":
                        torch.cuda.synchronize(device)
                    now = time.time()
                    tps = window_steps * tokens_per_step / max(now - window_t, 1e-9)
                    last_tps = tps
                    mfu = flops_tok * tps / (peak * info.world_size) if peak else None
                    rec = {"kind": "train", "step": step, "epoch": epoch, "loss": window_loss / window_steps,
                           "lr": scheduler.get_last_lr()[0], "grad_norm": step_norm, "tokens_per_s": tps,
                           "elapsed": now - t_start}
                    if mfu is not None:
                        rec["mfu"] = mfu
                        result.mfu = mfu
                    if device.type == "cuda":
                        rec["peak_mem_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
                        if not logged_memory:
                            log(f"peak GPU memory after {step} step(s): {rec['peak_mem_gib']:.2f} GiB allocated, "
                                f"{torch.cuda.max_memory_reserved(device) / 2**30:.2f} GiB reserved")
                            logged_memory = True
                    emit(rec)
                    if bar is not None:
                        bar.set_postfix(loss=f"{rec['loss']:.3f}", tok_s=f"{tps:,.0f}",
                                        **({"mfu": f"{mfu:.1%}"} if mfu is not None else {}), refresh=False)
                    log(f"step {step} epoch {epoch} loss {rec['loss']:.4f} lr {rec['lr']:.2e} "
                        f"tok/s {tps:,.0f}" + (f" mfu {mfu:.1%}" if mfu is not None else ""), console=False)
                    window_t, window_steps, window_loss = time.time(), 0, 0.0
                if due_val:
                    validate()
                if due_save:
                    save("periodic")
                if halt:
                    signals.flush()
                    if signals.received is not None:
                        stop_reason = f"signal {signal.Signals(signals.received).name}"
                    elif step == stop_at:
                        stop_reason = f"--stop-after-steps {cfg.stop_after_steps}"
                    else:
                        stop_reason = "a signal on another rank"
                    break
            if stop_reason is None and done_in_epoch >= steps_per_epoch:
                # End of epoch: validation / checkpoint defaults are per epoch.
                if not cfg.val_interval and step < total_steps:
                    validate()
                epoch += 1
                consumed = 0
                if cfg.save_steps is None and step < total_steps:
                    save("end of epoch")
        if bar is not None:
            bar.close()
            log.bar = None

        if stop_reason == "nan":
            path = save("non-finite loss")
            log(f"ERROR: the loss or gradient norm became NaN/Inf at step {step + 1}; training stopped before "
                f"that update. " + (f"Last good state saved to {path}. " if path else "No checkpoint was written. ")
                + f"Lower --learning-rate, keep --max-grad-norm, or use --mixed-precision bf16 instead of fp16, "
                f"then --resume {out}.")
            result.stopped, result.exit_code = "nan", 3
        elif stop_reason is not None:
            path = save("interrupted")
            log(f"stopped at step {step} on {stop_reason}; " + (
                f"checkpoint {path}. Continue with `vbhal train --resume {out} ...` (same flags)." if path
                else "no checkpoint was written."))
            if signals.received is not None:
                code = 128 + int(signals.received)
            elif step == stop_at:
                code = 0
            else:
                code = 128 + int(signal.SIGTERM)
            result.stopped, result.exit_code = stop_reason, code
        else:
            if cfg.val_batches and (not result.val_losses or result.val_losses[-1][0] != step):
                validate()
            save("final")

    if engine is not None:
        engine.close()   # waits for the last host steps, stops the worker thread
    result.step, result.epoch, result.best_val_loss = step, epoch, best_val
    result.tokens_per_second = last_tps
    result.elapsed = time.time() - t_start
    if metrics_fh is not None:
        metrics_fh.close()
    if tb is not None:
        tb.close()
    if info.is_main:
        from vbhal.train.plotting import save_loss_curve
        png = save_loss_curve(metrics_path, out / "loss_curve.png",
                              title=f"vbhal train --config {cfg.config}")
        summary = (f"{result.stopped}: {step} steps in {result.elapsed:.1f}s"
                   + (f", best validation loss {best_val:.4f}" if best_val is not None else "")
                   + (f", {last_tps:,.0f} tokens/s" if last_tps else "")
                   + (f", MFU {result.mfu:.1%}" if result.mfu is not None else "")
                   + f"; outputs in {out}" + (f" ({png.name})" if png else ""))
        log(summary)
    return result
