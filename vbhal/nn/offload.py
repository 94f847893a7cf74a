"""Offloaded training on one device: weights stream through the device layer by layer.

Each *unit* (by default: every block of the model's largest ``ModuleList``/``Sequential``, plus every
other leaf module that owns parameters) keeps

* fp32 master weights and AdamW state on the host (pageable RAM),
* a working copy in the compute dtype (bf16 on accelerators) in pooled, pinned host memory,
* nothing on the device between uses.

Just before a unit's forward its working copy is copied to the device on a side stream (prefetched
``depth`` units ahead, the order and depth learned from the first step), and again for its backward
(the unit is recomputed there — activation checkpointing at unit granularity, without the ops whose results
nothing reads, see ``_recompute`` — or, with ``checkpoint=False``, its saved weights are re-fetched through
saved-tensor hooks). Its gradients go
down to pinned host memory on a second stream as soon as they are produced, and a worker thread runs
the unit's AdamW step on the host while the device goes on with the backward of earlier units.

Every cross-stream use waits on an event (``wait_event``), so a buffer is never reused while a kernel
may still read it: the buffers streamed in come from the compute stream's pool (the copy stream first
waits for the compute stream, see ``_compute_mark``) and are freed there; tensors the compute stream
made and a side stream reads (gradients going down) carry that stream (``record_stream``). The host
worker waits on the copy's event before it reads the gradients. The hot path never synchronises the
device with the host, except where a unit's optimizer step is genuinely not finished yet (counted as
stall time).

Arithmetic is the same as ordinary training with ``torch.optim.AdamW(fused=True)``: in fp32 the losses
match bit for bit (tested over 50 steps on CPU), and so do they with bf16 autocast — the working copy is
bf16 only for matmul/conv weights (exactly what autocast makes from the fp32 masters), fp32 for norms and
embeddings. The default host step runs torch's fused CPU AdamW kernel piece by piece (1M elements), casting
the gradient in and the working copy out while the piece is in cache (~28 bytes of memory traffic per
parameter instead of ~40), bitwise equal to ``AdamW(fused=True)`` (for values in the subnormal range too with
``host_flush_denormal=False``; by default the host step flushes subnormals to zero, see the option). Options that
trade that identity for speed
say so: ``host_step="compiled"`` (one torch.compile'd pass over master, state, gradient and working copy,
compiled in a background thread at engine build; the first host step waits for it, a failed compile falls
back to the torch step with a warning. Not bitwise: Inductor's C++ evaluates ``exp_avg + (1-b1)(g - exp_avg)``
with two roundings where torch's vector kernel uses one fused multiply-add, so exp_avg differs in the last
bits where it nearly cancels; losses agree to ~1e-5 relative) and ``chunks>1`` (weight gradients summed over
row chunks).

Training-loop API: ``max_grad_norm`` clips by the global 2-norm exactly as ``clip_grad_norm_`` does
(per-parameter fp32 norms stacked in ``model.parameters()`` order, coefficient ``min(1, max/(norm+1e-6))``;
resident parameters included; bitwise on CPU). ``skip_nonfinite`` (default on) skips the whole optimizer
step when any gradient is inf/NaN (detected through the same norms: a norm that overflows fp32 counts too).
Both need every gradient before any parameter moves, so the host steps of that step are *deferred* to
``step()`` (unit 0 first): they then overlap only the next forward, not the backward — about the backward
time (or the host step time, if smaller) added per step, plus one device synchronisation; pass
``skip_nonfinite=False`` and no ``max_grad_norm`` for full overlap. ``step()`` returns an
:class:`OffloadStepInfo`; ``set_lr`` changes the learning rate between steps; ``state_dict`` /
``load_state_dict`` save and restore everything for a bitwise resume.

Hybrid step (``gpu_step_fraction``): a share of the units (evenly spaced, unit 0 always: its gradients come last
and its weights are needed first) do their AdamW on the device instead: their fp32 master, exp_avg and exp_avg_sq
live in one pinned host block (still the authoritative copy: state_dict, master_state_dict and the host step read
it), go up in pieces (8M elements, prefetched from the start of the unit's backward) through a small ring of device
buffers (``gpu_step_buffer_bytes``), are stepped by torch's fused CUDA AdamW with the gradients where they are (no
gradient copy down), and come home with the new working copy on their own copy streams; the next fetch of the
unit waits on that copy's event. ~24 PCIe bytes per parameter instead of ~0.29 ns of host time per parameter.
Default ``None``: an automatic share, picked after step 1 from measured host-step time, copy bandwidth and compute
time (see ``_auto_decide``; on CPU it stays 0); 0.0 turns it off, a value > 0 fixes it (on CPU the same pieces then
run synchronously, bitwise equal to the host step, tested). CUDA's and the CPU's fused AdamW may differ in the last
bit, so neither the hybrid nor the host step is bitwise equal to in-GPU training with CUDA's AdamW; the H100 test
(tests/nn/test_offload_hybrid.py) checks the hybrid bit for bit against plain training whose AdamW is split between
CPU and CUDA the same way, with and without clipping (passed, session 3). (A 2e-3 loss tolerance against all-CUDA
AdamW had failed in R5: last-bit differences amplified by a loss swinging 0.02..4.7; that test could not tell them
from a bug.) Off (host step, reported) with state on the disk tier or with gradient accumulation.
``memory_summary()["last_step"]`` / ``step_breakdown()``: host step s, device step s, stall s, H2D/D2H GB/s, the
chosen share.

Keep plan (``resident_cache_bytes``): device memory the cap leaves unused keeps copies on the device instead of a
round trip through host memory, chosen by PCIe bytes saved per device byte: (1) the working copies of device-stepped
units stay on the device across steps (the device step writes the new copy there; no write-back, no fetch in the
next forward or backward; the host copy is written back only when the plan is dropped: ``set_gpu_step_fraction``,
``replan``), (2) the saved inputs of the last units of the forward stay on the device (``offload_activations``),
(3) the working copies of the last units of the forward stay from their forward into their backward. Off by default
(0); with ``None`` on accelerators the budget is the per-process cap minus the peak of a planning step minus a margin, planned once the device-stepped
share is known (``plan_pending``; ``replan()`` when the batch shape changes); on CPU only an explicit budget (test
mode). Numbers are unchanged (tested bit for bit); ``memory_summary()["keep_plan"]`` says what stays.

Per-step statistics (``stats.steps`` rows, ``step_breakdown``): bytes moved by kind (``bytes_weights_up``,
``bytes_state_up`` ...), and on accelerators the compute stream's split from timing events (``dev_compute_s``,
``dev_fwd_s``, ``dev_bwd_s``, ``dev_wait_w_s``: waiting for weight copies, ``dev_wait_act_s``: for saved inputs,
``dev_idle_s``: nothing queued) plus caching-allocator retries (``alloc_retries``: memory pressure under a cap),
resolved a step late without synchronising (or at ``synchronize()``).

Also: gradient accumulation (``grad_accum_steps``; fp32 sums on the host), units called several times per
step (gradients summed before the step), tied weights (kept resident on the device), meta-device models
materialised straight into host memory (``init_fn``), masters and AdamW state beyond a host budget in
checksummed disk files (``state_budget_bytes``), saved unit inputs in pinned host memory
(``offload_activations``).

Example::

    engine = apply_offload(model, device="cuda", lr=1e-4)
    for x, y in data:
        loss = loss_fn(model(x), y)
        loss.backward()          # host AdamW steps run during this call (unless deferred, see above)
        info = engine.step()     # step boundary: OffloadStepInfo(grad_norm, skipped, lr)
        engine.set_lr(schedule(step))
    torch.save(engine.state_dict(), "ckpt.pt")  # waits for the last host steps
"""

from __future__ import annotations

import contextlib
import math
import os
import threading
import time
import warnings
from collections.abc import Iterable
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.utils._pytree import tree_flatten, tree_unflatten

from vbhal.errors import TierError
from vbhal.nn import _recompute
from vbhal.tiers.pool import HostBlock, HostPool, TierWarning
from vbhal.tiers.stats import TierStats

#: Parameter offsets inside a unit's flat buffers are multiples of this many bytes (vector-friendly).
ALIGN_BYTES = 256
#: Saved activations smaller than this stay on the device even with ``offload_activations``.
MIN_OFFLOAD_ACT_BYTES = 1 << 20
#: The learned prefetch depth never exceeds this many units.
MAX_PREFETCH_DEPTH = 4
#: Elements per piece of the host AdamW step (a multiple of 64 so pieces keep the fused kernel's 64-byte task
#: units): 4 MiB of fp32 gradient scratch, which with the piece's master stays in the cores' caches.
HOST_STEP_CHUNK = 1 << 20
#: Elements per piece of the device AdamW step of a GPU-stepped unit (a multiple of HOST_STEP_CHUNK): 8M
#: elements = 160 MiB of device ring slot (fp32 master, exp_avg, exp_avg_sq, gradient + the working-copy piece).
GPU_STEP_PIECE = 1 << 23
#: Device ring bytes per piece element: fp32 master, exp_avg, exp_avg_sq, fp32 gradient, working copy (<= 4 bytes).
_SLOT_BYTES_PER_ELEM = 20
#: Kinds of traffic counted per step (stats rows: bytes_<kind>): working copies up, device-step state up/down,
#: device-step working copies down, gradients down (host step) / up (deferred device step), saved inputs down/up.
_BYTE_KINDS = ("weights_up", "state_up", "state_down", "weights_down", "grads_down", "grads_up", "acts_down", "acts_up")
#: Keep plan margin under the cap: this share of the cap (at least KEEP_MARGIN_MIN bytes) stays free.
KEEP_MARGIN_FRAC = 0.08
KEEP_MARGIN_MIN = 512 << 20
#: Auto mode leaves every unit on the host when the whole host step of a step takes less than this (seconds).
AUTO_MIN_HOST_S = 0.05


@dataclass
class OffloadConfig:
    """How :func:`apply_offload` streams a model.

    ``device``: where compute runs. ``work_dtype``: dtype of the working copies on the device (default:
    bf16 on accelerators, the parameters' own dtype on CPU). ``prefetch_depth``: units copied ahead;
    ``None`` learns it after the first step. ``checkpoint``: recompute each unit in backward (memory
    ~ one unit's activations) instead of keeping its activations. ``offload_activations``: also move each
    unit's saved input to pinned host memory between forward and backward (needed when even the
    unit inputs of all layers do not fit). ``device_budget_bytes``: device memory the streamed weights
    may take (limits the learned depth; on CPU this is the budgeted "device" tier).
    ``units``: qualified module names to stream (default: found automatically).
    AdamW hyper-parameters as in ``torch.optim.AdamW``.
    """

    device: str | torch.device = "cuda"
    work_dtype: torch.dtype | None = None
    prefetch_depth: int | None = None
    checkpoint: bool = True
    offload_activations: bool = False
    preserve_rng: bool = True
    device_budget_bytes: int | None = None
    units: list[str] | None = None
    chunks: int = 1  # row chunks (dim 0) per unit call: bounds activation memory; rows must be independent
    init_fn: Any = None  # fills host masters of meta-device parameters: init_fn(qualified_name, fp32_tensor)
    lr: float = 1e-3
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    weight_decay: float = 1e-2
    pin_memory: bool | None = None  # None: pin when the device is an accelerator
    host_pool_chunk_bytes: int = 256 << 20
    # torch intra-op threads (process-wide) for the host step (None: leave as is, or at most the cores the host step
    # may use, see reserve_cores)
    optimizer_threads: int | None = None
    # CPU cores the host step leaves to the training thread, which launches the device's work: the host step's
    # thread and its intra-op threads are kept off them (Linux CPU affinity, set in the host step's thread only;
    # the caller's threads keep every core) and torch's intra-op thread count (process-wide) is lowered to at most
    # the cores left, until close(). None: 1 on accelerators when the process may use 4 cores or more, else 0.
    # H100 host (16 cores), 3.49B params at 16k tokens under an 8 GB cap, one machine: 3.04 s per step with the
    # host step on every core, 2.84 s with one core left (the device's forward 0.23 -> 0.17 s; session 5).
    reserve_cores: int | None = None
    state_budget_bytes: int | None = None  # host RAM for fp32 masters + AdamW state; the rest on disk
    spill_root: str | None = None  # where the disk tier's private directory goes (default: VBHAL_SPILL_DIR / tmp)
    grad_accum_steps: int = 1  # micro-batches (backward + engine.step() each) per optimizer step
    host_step: str = "torch"  # "torch": torch's fused AdamW (bit-exact with it); "compiled": one fused pass (faster)
    # The host step's threads flush subnormal floats to zero (FTZ/DAZ). AdamW state of parameters whose gradients
    # are zero or tiny for a while (rare embedding rows, unrouted experts) decays into the subnormal range, where
    # the CPU's fused AdamW ran 13x slower (20M elements with exp_avg / exp_avg_sq at 1e-39 / 1e-40 and zero
    # gradients, this repo's 2-core CPU: 11.1 s per 1e9 against 0.83 with normal state; flushed: 0.83). Values
    # below 1.2e-38 become 0 there, nothing else changes; False keeps them (bitwise torch in that range too).
    host_flush_denormal: bool = True
    poison: bool = False  # debug: fill each fresh device buffer with NaN before its copy (catches unwritten elements)
    max_grad_norm: float | None = None  # clip by global 2-norm (clip_grad_norm_ arithmetic); defers the host steps
    skip_nonfinite: bool = True  # skip the whole optimizer step when a gradient is inf/NaN; defers the host steps
    # Share of the streamed units whose AdamW step runs on the device (fp32 master + state streamed up and back in
    # pieces, torch's fused AdamW there; the host copy stays authoritative). None: auto on accelerators (decided
    # from the first steps' measurements), 0 on CPU; 0.0: off. On CPU a value > 0 runs the same piece pipeline on
    # the CPU (a test mode, bitwise equal to the host step).
    # Default None (auto): on the H100 the hybrid stepped 3.49B params at 16k tokens in 1.095 s against 1.61-2.00 s
    # host-only (R4/R5), and its GPU test is bitwise equal to plain training with the same CPU/CUDA AdamW split
    # (session 3). 0.0 keeps every AdamW on the host (bitwise equal to torch's fused AdamW on the host).
    gpu_step_fraction: float | None = None
    gpu_step_buffer_bytes: int = 640 << 20  # device memory of the device step's ring of pieces
    # Device memory for copies kept on the device between uses instead of a round trip through host memory:
    # the working copies of device-stepped units (across steps: no write-back, no re-fetch), then the saved inputs
    # and the working copies of the last units of the forward (into their backward). None: on accelerators, what
    # the cap leaves (per-process memory fraction x device memory, minus the peak measured in a planning step,
    # minus a margin), planned again by set_gpu_step_fraction; 0 off; on CPU (test mode) only an explicit value.
    # Default 0 (off, opt in with None or a byte count): on the H100 (R5, 3.49B at 16k tokens under an 8 GB cap)
    # the auto plan filled the cap to 6.8 GB, the caching allocator retried 9 times per step and the step took
    # 1.163 s, against 1.095 s for the hybrid without it (R4); a plan sized for a smaller peak is untested.
    resident_cache_bytes: int | None = 0
    # checkpoint=True: the backward's recompute of a unit leaves out the ops whose results nothing reads (the ops
    # after the last one producing a tensor autograd saves: in x + W2 gelu(W1 x), the second matmul and the add),
    # as torch's non-reentrant checkpoint does; recorded per unit and input signature on the first backward,
    # checked on every use, gradients bitwise the same. Opt in: a unit's forward must not keep a tensor computed
    # after that point in a global or a closure for later, nor register hooks on autograd nodes; module hooks,
    # tensor hooks, module attributes, buffer writes, copies to another device, .item(), .tolist() and .numpy()
    # are detected (then that value is computed, or the unit recomputes in full). See vbhal/nn/_recompute.py. H100, 3.49B params (MLP blocks), 64k tokens under
    # the 8 GB cap, one machine (session 9): 3.009 s per step without, 2.704 s with it (1.20x -> 1.08x in-GPU).
    recompute_skip: bool = False


@dataclass
class OffloadStepInfo:
    """What :meth:`OffloadEngine.step` reports for the optimizer step it closed.

    ``grad_norm``: global 2-norm of all trainable gradients (``None`` when neither clipping nor the non-finite
    check asked for it); ``skipped``: no parameter was updated (a gradient was inf/NaN); ``lr``: the learning
    rate that step used.
    """

    grad_norm: float | None
    skipped: bool
    lr: float


# ---------------------------------------------------------------------------------------------------- units
@dataclass
class _Unit:
    idx: int
    name: str
    module: nn.Module
    params: list[tuple[str, nn.Parameter]]  # trainable first, then frozen
    shapes: list[torch.Size]
    dtypes: list[torch.dtype]  # working-copy dtype of each parameter
    offsets: list[int]  # byte offsets in the working copy / device buffer / gradient buffer
    m_offsets: list[int]  # element offsets in the (tightly packed) fp32 master of the trainable ones
    nbytes: int  # working copy, padded
    train_nbytes: int  # the byte prefix holding trainable parameters (gradients go there)
    train_numel: int  # elements of the fp32 master
    n_train: int
    master: torch.Tensor | None = None  # fp32 flat, host
    work_host: HostBlock | None = None
    grad_host: HostBlock | None = None
    opt: torch.optim.Optimizer | None = None
    dev_buf: torch.Tensor | None = None
    dev_event: Any = None
    dev_stream: Any = None  # the stream whose pool dev_buf came from (the compute stream of the fetch)
    host_ready: threading.Event = field(default_factory=threading.Event)
    pending: Future | None = None
    bound: bool = False
    warned_unused: bool = False
    g_acc: torch.Tensor | None = None  # fp32 gradient sum over micro-batches (gradient accumulation)
    acc_count: int = 0
    acc_final: bool = False  # g_acc already holds the last micro-batch too (deferred steps with accumulation)
    shared: list = field(default_factory=list)  # resident (tied) parameters this unit uses
    fw_calls: int = 0  # grad-enabled forward calls this step
    bw_calls: int = 0  # backward calls seen this step
    grad_acc: list | None = None  # gradients summed over calls until the last backward of the step
    gpu_step: bool = False  # AdamW of this unit runs on the device (state streamed from pinned host memory)
    state_blk: HostBlock | None = None  # pinned host block holding master | exp_avg | exp_avg_sq (GPU-stepped units)
    dev_done: Any = None  # event: the last device step's results (working copy, master, state) are back on the host
    step_tag: int = 0  # optimizer step index of the queued host step (for the auto mode's measurement)
    keep: str = ""  # "all": working copy stays on the device across steps (device-stepped); "fb": forward -> backward
    keep_act: bool = False  # saved inputs stay on the device even with offload_activations
    host_stale: bool = False  # the device copy (keep "all") is newer than work_host's trainable prefix
    act_bytes: int = 0  # bytes of offloadable saved inputs of this unit's calls in the last step
    act_bytes_step: int = 0  # the same, counting this step
    t_start: Any = None  # timing event: start of the current compute phase
    rplans: dict = field(default_factory=dict)  # recompute plans by input signature (vbhal/nn/_recompute.py)

    @property
    def work_bytes(self) -> int:
        return self.nbytes

    def view(self, buf: torch.Tensor, j: int) -> torch.Tensor:
        """Parameter `j` as a typed view of a raw byte buffer laid out like this unit's working copy."""
        n = math.prod(self.shapes[j]) * _itemsize(self.dtypes[j])
        return buf[self.offsets[j] : self.offsets[j] + n].view(self.dtypes[j]).view(self.shapes[j])


def _itemsize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def _pad(n: int) -> int:
    return -(-n // ALIGN_BYTES) * ALIGN_BYTES


#: Modules whose parameters get the 16-bit working copy: the ones whose ops autocast runs in 16 bits
#: (matmuls, convolutions). Every other parameter (norms, embeddings, ...) keeps an fp32 working copy, so the
#: streamed model computes what autocast computes from fp32 parameters.
_LOW_PRECISION_TYPES: tuple[type, ...] = (
    nn.Linear, nn.Bilinear, nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d,
)


def _find_units(model: nn.Module, names: list[str] | None) -> tuple[list[tuple[str, nn.Module]], list[tuple[str, nn.Parameter]]]:
    """Choose the streamed units and the parameters that stay resident on the device.

    Units: the children of the largest ModuleList/Sequential (by parameter count), then every other module
    outside those that owns parameters and has no parameter-holding children. A module that owns
    parameters *and* has parameter-holding children (e.g. a root-level positional embedding), and
    parameters shared between units (tied weights), stay resident on the device.
    """
    modules = dict(model.named_modules())
    if names is not None:
        missing = [n for n in names if n not in modules]
        if missing:
            raise TierError(f"offload units {missing} are not modules of the model; pick from e.g. {list(modules)[:8]}")
        units = [(n, modules[n]) for n in names]
    else:
        best, best_count = None, 0
        for n, m in model.named_modules():
            if isinstance(m, (nn.ModuleList, nn.Sequential)):
                kids = [(f"{n}.{k}" if n else k, c) for k, c in m.named_children() if any(True for _ in c.parameters())]
                if len(kids) >= 2:
                    count = sum(p.numel() for _, c in kids for p in c.parameters())
                    if count > best_count:
                        best, best_count = kids, count
        units = list(best or [])
    prefixes = [n + "." for n, _ in units]
    in_unit = lambda n: any(n == p[:-1] or n.startswith(p) for p in prefixes)
    resident: list[tuple[str, nn.Parameter]] = []
    if names is None:
        for n, m in model.named_modules():
            if in_unit(n):
                continue
            direct = list(m.named_parameters(recurse=False))
            if not direct:
                continue
            kids_have = any(any(True for _ in c.parameters()) for c in m.children())
            if kids_have:
                resident += [(f"{n}.{pn}" if n else pn, p) for pn, p in direct]
            else:
                units.append((n, m))
    # Parameters outside every unit (explicit unit lists) stay resident too.
    covered = {id(p) for _, m in units for p in m.parameters()}
    seen = {id(p) for _, p in resident}
    for pn, p in model.named_parameters():
        if id(p) not in covered and id(p) not in seen:
            resident.append((pn, p))
            seen.add(id(p))
    return units, resident


# ------------------------------------------------------------------------------------------ autograd glue
class _Call:
    """What one unit call passes between forward and backward (non-tensor arguments, output structure)."""

    __slots__ = (
        "act_dev",
        "act_event",
        "act_host",
        "act_stream",
        "autocast",
        "chunk_rows",
        "done",
        "engine",
        "in_leaves",
        "in_spec",
        "inner",
        "inner_in",
        "offloaded",
        "orig",
        "out_leaves",
        "out_spec",
        "out_tensor_pos",
        "rng",
        "tensor_pos",
        "unit",
    )

    def __init__(self) -> None:
        self.act_host: list[HostBlock | None] = []
        self.act_dev: list[torch.Tensor | None] | None = None
        self.act_event = None
        self.act_stream = None
        self.inner = None
        self.inner_in = None
        self.done = False
        self.chunk_rows: int | None = None
        self.offloaded = False


def _rebuild(call: _Call, tensors: Iterable[torch.Tensor]) -> tuple[tuple, dict]:
    leaves = list(call.in_leaves)
    for pos, t in zip(call.tensor_pos, tensors):
        leaves[pos] = t
    args, kwargs = tree_unflatten(leaves, call.in_spec)
    return args, kwargs


def _split_rows(tensors: tuple[torch.Tensor, ...], chunks: int, size: int | None = None) -> tuple[list[list[torch.Tensor]], int | None]:
    """Split the tensors whose leading size is the batch size into pieces of `size` rows (default: `chunks`
    pieces) along dim 0; other tensors are passed whole to every piece. Returns (pieces, rows per piece)."""
    if chunks <= 1 and size is None:
        return [list(tensors)], None
    batch = next((t.shape[0] for t in tensors if t.dim() >= 1 and t.is_floating_point()), None)
    if batch is None:
        batch = next((t.shape[0] for t in tensors if t.dim() >= 1), None)
    if batch is None or (size is None and batch < chunks):
        return [list(tensors)], None
    size = size or -(-batch // chunks)
    pieces = [t.split(size) if (t.dim() >= 1 and t.shape[0] == batch) else None for t in tensors]
    n = -(-batch // size)
    return [[p[i] if p is not None else t for p, t in zip(pieces, tensors)] for i in range(n)], size


def _rows_of(part: list[torch.Tensor], whole: tuple[torch.Tensor, ...] | list[torch.Tensor]) -> int:
    """Rows in this chunk: the leading size of the first tensor that was split."""
    for p, t in zip(part, whole):
        if p is not t and p.dim() >= 1:
            return p.shape[0]
    return next(t.shape[0] for t in part if t.dim() >= 1)


def _detach_like(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    return [t.detach().requires_grad_(t.requires_grad) if t.is_floating_point() else t for t in tensors]


class _UnitFunction(torch.autograd.Function):
    """One call of a streamed unit: fetch weights, run (no graph when checkpointing), release; in backward
    fetch again, recompute chunk by chunk, send parameter gradients down, return input gradients."""

    @staticmethod
    def forward(ctx, call: _Call, dummy: torch.Tensor, *tensors: torch.Tensor):  # type: ignore[override]
        eng: OffloadEngine = call.engine
        unit = call.unit
        ctx.call = call
        eng._before(unit, "F")
        unit.fw_calls += 1
        dev_type = eng.device.type
        call.autocast = (torch.is_autocast_enabled(dev_type), torch.get_autocast_dtype(dev_type))
        if eng.cfg.checkpoint:
            parts, call.chunk_rows = _split_rows(tensors, eng.cfg.chunks)
            call.rng = []
            with torch.no_grad():
                if len(parts) == 1:
                    call.rng.append(eng._get_rng() if eng.cfg.preserve_rng else None)
                    args, kwargs = _rebuild(call, parts[0])
                    out = call.orig(*args, **kwargs)
                else:
                    # Row chunks: each chunk's outputs are written into full-size outputs allocated once.
                    full, spec0, start = None, None, 0
                    batch = sum(_rows_of(part, tensors) for part in parts)
                    for part in parts:
                        call.rng.append(eng._get_rng() if eng.cfg.preserve_rng else None)
                        args, kwargs = _rebuild(call, part)
                        leaves_c, spec0 = tree_flatten(call.orig(*args, **kwargs))
                        n = _rows_of(part, tensors)
                        if full is None:
                            for x in leaves_c:
                                if isinstance(x, torch.Tensor) and (x.dim() == 0 or x.shape[0] != n):
                                    raise TierError(
                                        f"unit '{unit.name}' returned a tensor of shape {tuple(x.shape)} that is not split "
                                        f"by rows ({n} rows per chunk): use chunks=1 for this model"
                                    )
                            full = [x.new_empty((batch, *x.shape[1:])) if isinstance(x, torch.Tensor) else x for x in leaves_c]
                        for f, x in zip(full, leaves_c):
                            if isinstance(x, torch.Tensor):
                                f[start : start + n].copy_(x)
                        start += n
                        del leaves_c
                    out = tree_unflatten(full, spec0)
            eng._save_inputs(ctx, call, tensors)
        else:
            inner_in = _detach_like(list(tensors))
            args, kwargs = _rebuild(call, inner_in)
            with torch.enable_grad(), torch.autograd.graph.saved_tensors_hooks(*eng._weight_hooks(unit)):
                out = call.orig(*args, **kwargs)
            call.inner_in = inner_in
        leaves, spec = tree_flatten(out)
        call.out_spec = spec
        call.out_tensor_pos = [i for i, x in enumerate(leaves) if isinstance(x, torch.Tensor)]
        call.out_leaves = [None if isinstance(x, torch.Tensor) else x for x in leaves]
        outs = [leaves[i] for i in call.out_tensor_pos]
        if not eng.cfg.checkpoint:
            call.inner = outs
        eng._after_forward(unit)
        ret = tuple(o.detach() for o in outs)
        ctx.mark_non_differentiable(*[o for o in ret if not o.is_floating_point()])
        return ret

    @staticmethod
    def backward(ctx, *grad_outs: torch.Tensor):  # type: ignore[override]
        call: _Call = ctx.call
        eng: OffloadEngine = call.engine
        unit = call.unit
        eng._before(unit, "B")
        params = [p for _, p in unit.params[: unit.n_train]] + unit.shared
        if eng.cfg.checkpoint:
            tensors = eng._load_inputs(ctx, call)
            rows = getattr(call, "chunk_rows", None)
            parts, _ = _split_rows(tuple(tensors), eng.cfg.chunks, rows) if rows else ([list(tensors)], None)
            if len(parts) > 1:
                gparts, _ = _split_rows(tuple(g if g is not None else torch.empty(0) for g in grad_outs), 0, rows)
                if len(gparts) != len(parts):
                    raise TierError(f"unit '{unit.name}': output gradients do not split into {len(parts)} row chunks "
                                    "like its inputs; use chunks=1")
            else:
                gparts = [list(grad_outs)]
            enabled, dtype = call.autocast
            in_grads, pgrads = None, None
            start = 0
            skip = eng.cfg.recompute_skip and _recompute.AVAILABLE and not _recompute.hooked(unit.module)
            for ci, (part, gpart) in enumerate(zip(parts, gparts)):
                inner_in = _detach_like(part)
                args, kwargs = _rebuild(call, inner_in)
                # preserve_rng=False: the recompute draws from the running generators; a retry (recompute_skip)
                # starts from the same state, so they advance once, as without it
                rng0 = eng._get_rng() if skip and call.rng[ci] is None else None

                def recompute(args=args, kwargs=kwargs, ci=ci, rng0=rng0, runs=[0]):  # noqa: B006 - per closure
                    if runs[0] and rng0 is not None:
                        torch.set_rng_state(rng0[0])
                        if rng0[1] is not None:
                            eng._dm.set_rng_state(rng0[1], eng.device)
                    runs[0] += 1
                    with torch.enable_grad(), torch.autocast(eng.device.type, dtype=dtype, enabled=enabled), \
                            eng._rng_ctx(call.rng[ci]):
                        return call.orig(*args, **kwargs)

                if skip:
                    out, skipped = _recompute.run(unit.rplans, _recompute.signature(inner_in, call.autocast), recompute,
                                                  lambda o: tree_flatten(o)[0], unit.name, unit.module)
                    eng.recompute_skipped += skipped
                else:
                    out = recompute()
                leaves, _ = tree_flatten(out)
                outs = [leaves[i] for i in call.out_tensor_pos]
                gsel = [g if (g is not None and g.numel()) else None for g in gpart] if len(parts) > 1 else list(gpart)
                ig, pg = _grads(outs, gsel, inner_in, params)
                del out, outs, leaves
                if len(parts) == 1:
                    in_grads, pgrads = ig, pg
                    break
                n = _rows_of(part, tensors)
                if pgrads is None:  # accumulate over row chunks in fp32 (in place), as one big matmul would
                    pgrads = [None if g is None else g.float() for g in pg]
                else:
                    for k, g in enumerate(pg):
                        if g is not None:
                            if pgrads[k] is None:
                                pgrads[k] = g.float()
                            else:
                                pgrads[k].add_(g)
                if in_grads is None:
                    in_grads = [None] * len(tensors)
                for i, g in enumerate(ig):
                    if g is None:
                        continue
                    if part[i] is tensors[i]:  # not split: gradients add up
                        in_grads[i] = g if in_grads[i] is None else in_grads[i] + g
                    else:
                        if in_grads[i] is None:
                            in_grads[i] = torch.zeros_like(tensors[i])
                        in_grads[i][start : start + n].copy_(g)
                start += n
                del ig, pg
        else:
            in_grads, pgrads = _grads(call.inner, list(grad_outs), call.inner_in, params)
        call.inner = call.inner_in = None
        call.done = True
        for p, g in zip(unit.shared, pgrads[unit.n_train:]):
            if g is not None:  # tied weights resident on the device accumulate like ordinary leaves
                p.grad = g.to(p.dtype) if p.grad is None else p.grad + g.to(p.dtype)
        eng._after_backward(unit, pgrads[: unit.n_train])
        return (None, None, *in_grads)


def _grads(outs: list[torch.Tensor], grad_outs: list, inner_in: list, params: list) -> tuple[list, list]:
    """Gradients of `outs` (seeded with `grad_outs`) w.r.t. the inputs that require grad and `params`."""
    sel_out, sel_grad = [], []
    for o, g in zip(outs, grad_outs):
        if g is not None and o.requires_grad:
            sel_out.append(o)
            sel_grad.append(g)
    want = [t for t in inner_in if isinstance(t, torch.Tensor) and t.requires_grad]
    if sel_out:
        grads = list(torch.autograd.grad(sel_out, want + params, sel_grad, allow_unused=True))
    else:
        grads = [None] * (len(want) + len(params))
    it = iter(grads[: len(want)])
    in_grads = [next(it) if (isinstance(t, torch.Tensor) and t.requires_grad) else None for t in inner_in]
    return in_grads, grads[len(want):]


def _adamw_one_pass(p, m, v, g, w, hp):
    """AdamW (torch's formula) on fp32 master `p` with state `m`, `v`, gradient `g` (any float dtype), writing
    the working copy `w`. hp = [1 - lr*wd, b1, 1 - b1, b2, 1 - b2, lr / bc1, sqrt(bc2), eps] (float64, 0-dim
    math in fp32 as the fused kernel does)."""
    hp = hp.float()
    g = g.float()
    p_new = p * hp[0]
    m_new = m + hp[2] * (g - m)  # torch's kernel: exp_avg.lerp_(grad, 1 - beta1) (fused multiply-add there)
    v_new = v * hp[3] + hp[4] * g * g
    denom = v_new.sqrt() / hp[6] + hp[7]
    p_new = p_new + (-hp[5]) * m_new / denom
    p.copy_(p_new)
    m.copy_(m_new)
    v.copy_(v_new)
    w.copy_(p_new)


def _make_compiled_step(threads: int | None = None):
    """torch.compile the one-pass step for the host (C++/OpenMP via Inductor); None (with a warning) if that fails.
    `threads`: the intra-op thread count of the thread that will call it (the host worker's), set on this thread
    before compiling: Dynamo guards on the caller's count, and a call under another count compiles again.

    Compiled with Inductor's C++ wrapper, which releases the GIL for the whole call. The default Python wrapper
    calls the kernel with the GIL held: each host step then froze every other Python thread for its whole
    duration (0.05-0.2 s per unit), including the autograd thread that runs the units' backward hooks and the
    training thread launching the forward, so the device's backward stretched to the length of the host steps
    (session 5's H100 runs: backward 2.2-3.2 s against 0.45 s in GPU memory, with 2.5-3.5 s of host AdamW per
    step). Session 8, this repo's CPU: the main thread ran 3 times during 0.135 s of the Python-wrapper step, 225
    times during the C++-wrapper step (same speed, bitwise the same results); the H100 at 16k tokens under the 8 GB
    cap, one machine: 4.28 s per step with the Python wrapper, 1.55 s with the C++ wrapper (backward 3.24 -> 0.82 s).

    Compiled with ``cpp.dynamic_threads``: the kernel always opens an OpenMP parallel region and takes its thread
    count from the calling thread at run time (the host worker's, see _HostWorker). Without it Inductor sized the
    region at compile time from the warm-up's size hint: with 16 threads, 4103 elements were "not enough work"
    (fewer than cpp.min_chunk_size per thread), and the kernel it generated, reused for every size, ran on one
    core. Session 9, the H100 host (16 cores): that one thread ran the host step at 1.08-1.33 s per 1e9
    parameters, alone or inside the training step (what sessions 3-8 took for an in-step slowdown)."""
    try:
        if threads:
            torch.set_num_threads(threads)
        fn = torch.compile(_adamw_one_pass, dynamic=True, fullgraph=True,
                           options={"cpp_wrapper": True, "cpp.dynamic_threads": True})
        n = (1 << 16) + 7  # warm up once per dtype pair: sizes are symbolic, so every unit reuses these kernels
        p, m, v = torch.ones(n), torch.zeros(n), torch.zeros(n)
        hp = torch.tensor([1.0, 0.9, 0.1, 0.999, 0.001, 1e-3, 0.03, 1e-8], dtype=torch.float64)
        # (gradient, working copy): bf16 training; fp32 gradients (clipped or accumulated: _host_step's grad32)
        # with a bf16 working copy; fp32 training. Other pairs (fp16) compile at their first step.
        for g_dt, w_dt in ((torch.bfloat16, torch.bfloat16), (torch.float32, torch.bfloat16), (torch.float32, torch.float32)):
            fn(p, m, v, torch.ones(n, dtype=g_dt), torch.empty(n, dtype=w_dt), hp)
        return fn
    except Exception as e:  # noqa: BLE001 - no C++ compiler, inductor problem: fall back, loudly
        warnings.warn(f"vbhal offload: compiling the one-pass host AdamW failed ({type(e).__name__}: {e}); using torch's "
                      "fused AdamW", TierWarning, stacklevel=3)
        return None


class _HostWorker:
    """One thread running host optimizer steps, lowest (step, unit index) first among the tasks that are ready.

    Gradients arrive in backward order (last unit first) but the next forward needs the first unit first:
    when steps queue up behind a busy worker, taking the lowest unit index first lets the next forward start
    while the rest of the backlog is still being stepped (FIFO would make it wait for the whole backlog).
    A task submitted with `ready` (the event of its gradient copy) waits its turn until that event has fired:
    the backward's hooks queue tasks well before their copies finish, and the lowest index queued is the copy
    issued last, so lowest-first alone made the worker wait on the newest copy while older ones sat ready
    (session 9, the H100 at 16k tokens: 8 of 17 host steps done in the 0.65 s of the backward, 9 left after
    it). When none is ready it takes the one queued first, whose copy was issued first. A task without `ready`
    keeps its place in the order: nothing after it is taken before it.
    Each step uses torch's intra-op thread pool, so one worker thread keeps every core it may use busy (`cpus`:
    its CPU affinity, inherited by the intra-op threads it starts; see OffloadConfig.reserve_cores).
    """

    def __init__(self, flush_denormal: bool = False, cpus: set[int] | None = None, threads: int | None = None) -> None:
        self._flush_denormal = flush_denormal
        self._cpus = cpus
        # The intra-op thread count the steps run with: torch's (process-wide; the engine set optimizer_threads),
        # capped by `threads` and by the cores the step may use.
        n = torch.get_num_threads()
        if cpus:
            n = min(threads or len(cpus), len(cpus), n)
        self.threads = n
        self._tasks: list = []  # (priority, seq, future, fn, args, ready event or None)
        self._seq = 0
        self._cv = threading.Condition()
        self._stop = False
        self._thread = threading.Thread(target=self._run, name="vbhal-host-adamw", daemon=True)
        self._thread.start()

    def submit(self, priority: tuple, fn: Any, *args: Any, ready: Any = None) -> Future:
        fut: Future = Future()
        with self._cv:
            self._seq += 1
            self._tasks.append((priority, self._seq, fut, fn, args, ready))
            self._cv.notify()
        return fut

    def _take(self) -> tuple:
        """The next task (see the class docstring); called with the lock held and at least one task queued."""
        tasks = sorted(self._tasks, key=lambda t: (t[0], t[1]))
        barrier = next((i for i, t in enumerate(tasks) if t[5] is None), len(tasks))
        if barrier == 0:
            pick = tasks[0]
        else:
            pick = None
            for t in tasks[:barrier]:
                try:
                    fired = t[5].query()
                except Exception:  # noqa: BLE001 - a device error: the task's own wait raises it where it is seen
                    fired = True
                if fired:
                    pick = t
                    break
            if pick is None:
                pick = min(tasks[:barrier], key=lambda t: t[1])
        self._tasks.remove(pick)
        return pick

    def _run(self) -> None:
        if self._flush_denormal:
            # This thread's (x86: MXCSR FTZ/DAZ) setting, inherited by the intra-op threads it starts: set before
            # its first parallel region. The caller's threads are untouched.
            torch.set_flush_denormal(True)
        if self._cpus:
            # This thread's affinity, inherited by the intra-op threads it starts (set before its first parallel
            # region), and no more threads than cores: an intra-op thread sharing a core stalls the whole region.
            # torch's intra-op thread count is process-wide: it is only ever lowered here (restored at close()).
            try:
                os.sched_setaffinity(0, self._cpus)
            except (OSError, ValueError, RuntimeError) as e:  # e.g. the cpuset shrank since: run unpinned
                self.threads = torch.get_num_threads()
                warnings.warn(f"vbhal offload: the host step could not keep off the reserved cores ({e}); it uses "
                              "every core", TierWarning, stacklevel=2)
        # Set on this thread in every case: OpenMP's thread count is per thread, and the compiled step's parallel
        # region (cpp.dynamic_threads) takes this thread's, which torch's own ops would only set lazily.
        torch.set_num_threads(self.threads)
        while True:
            with self._cv:
                while not self._tasks and not self._stop:
                    self._cv.wait()
                if not self._tasks and self._stop:
                    return
                _, _, fut, fn, args, _ = self._take()
            try:
                fut.set_result(fn(*args))
            except BaseException as e:  # noqa: BLE001 - handed to whoever waits on the future
                fut.set_exception(e)

    def shutdown(self) -> None:
        with self._cv:
            self._stop = True
            self._cv.notify()
        self._thread.join()


def _host_step_cpus(reserve: int | None, accel: bool) -> set[int] | None:
    """The cores the host step may use: the process's allowed cores minus the `reserve` lowest-numbered ones (see
    OffloadConfig.reserve_cores), or None (no affinity set: reserve 0, too few cores, or no Linux CPU affinity)."""
    if reserve is not None and reserve < 0:
        raise TierError(f"reserve_cores must be >= 0, got {reserve}")
    if not hasattr(os, "sched_getaffinity"):
        if reserve:
            warnings.warn(f"vbhal offload: reserve_cores={reserve} is ignored here (no CPU affinity on this platform)",
                          TierWarning, stacklevel=3)
        return None
    allowed = sorted(os.sched_getaffinity(0))
    if reserve is None:
        reserve = 1 if accel and len(allowed) >= 4 else 0
    if reserve == 0:
        return None
    if reserve >= len(allowed):
        raise TierError(f"reserve_cores={reserve} leaves the host step no core (this process may use {len(allowed)}): "
                        "give a smaller value, or 0")
    return set(allowed[reserve:])


# ---------------------------------------------------------------------------------------------------- engine
class OffloadEngine:
    """Streams a model's units through the device and trains them with AdamW on the host.

    Made by :func:`apply_offload`; see the module docstring for the data flow.
    """

    stats_title = "vbhal offload (0 device, 1 pinned host, 2 disk)"

    def __init__(self, model: nn.Module, cfg: OffloadConfig, report: Any = None) -> None:
        self.model = model
        self.cfg = cfg
        self.device = torch.device(cfg.device)
        if self.device.type == "cuda" and self.device.index is None:
            self.device = torch.device("cuda", torch.cuda.current_device())
        self._accel = self.device.type != "cpu"
        self._dm = torch.get_device_module(self.device.type) if self._accel else None
        pin = cfg.pin_memory if cfg.pin_memory is not None else self._accel
        self.pool = HostPool(pin=pin, chunk_bytes=cfg.host_pool_chunk_bytes, name="offload-weights")
        self.act_pool = HostPool(pin=pin, chunk_bytes=cfg.host_pool_chunk_bytes, name="offload-activations")
        self.stats = TierStats()
        self.stats.level(0, f"device {self.device}")
        self.stats.level(1, "pinned host" if pin else "host")
        if cfg.optimizer_threads:
            torch.set_num_threads(cfg.optimizer_threads)
        self._threads_at_start = torch.get_num_threads()
        self.host_cpus = _host_step_cpus(cfg.reserve_cores, self._accel)
        self._worker = _HostWorker(flush_denormal=cfg.host_flush_denormal, cpus=self.host_cpus,
                                   threads=cfg.optimizer_threads)
        self._worker_error: BaseException | None = None
        self._lock = threading.Lock()
        self._h2d = self._d2h = None
        self._up = self._opt = self._down = None  # the device step's streams: state up, AdamW, state down
        if self._accel:
            self._h2d = self._dm.Stream(self.device)
            self._d2h = self._dm.Stream(self.device)
            self._up = self._dm.Stream(self.device)
            self._opt = self._dm.Stream(self.device)
            self._down = self._dm.Stream(self.device)
        self.state_pool = HostPool(pin=pin, chunk_bytes=cfg.host_pool_chunk_bytes, name="offload-gpu-step-state")
        self._dummy = torch.empty(0, device=self.device, requires_grad=True)
        self._tcur: list[tuple[str, Any, Any]] = []  # this step's timed spans on the compute stream
        self._tpend: list[tuple[dict, list]] = []  # (stats row, spans) of closed steps not yet resolved
        self._bytes: dict[str, float] = dict.fromkeys(_BYTE_KINDS, 0.0)  # bytes moved this step, by kind
        self._alloc_mark: tuple[int, int] | None = None  # allocator retries / device mallocs at the last step end
        # Keep plan (see _plan_keep): decided once the share of device-stepped units is known.
        self._keep_planned = False
        self._keep_tag = 1  # the step whose peak memory the plan reads (accelerators, resident_cache_bytes=None)
        self._row_base = 0  # stats.steps[s - _row_base] is optimizer step s (load_state_dict moves the count)
        self._keep_peak: tuple[int, bool] | None = None  # (peak allocated bytes, ring allocated then)
        self.keep_plan: dict[str, Any] | None = None
        self._trace: list[tuple[int, str]] = []
        self._order: list[tuple[int, str]] | None = None
        self._pos = 0
        self.depth = cfg.prefetch_depth or 1
        self._learn_events: dict[int, list] = {}
        self._act_calls: list[_Call] = []
        self._to_free: list[_Call] = []
        self._scratch: torch.Tensor | None = None
        self._state_steps = 0
        self._micro = 0  # micro-batch index within the current optimizer step
        self._lr = float(cfg.lr)
        # Clipping and the non-finite skip need every gradient of the step before any parameter moves.
        self._defer = cfg.max_grad_norm is not None or cfg.skip_nonfinite
        self._deferred: list[tuple[_Unit, Any]] = []  # (unit, gradient-copy event) waiting for step()
        self._norms: dict[int, torch.Tensor] = {}  # id(parameter) -> 2-norm of its gradient this step (device)
        self._host_norms: dict[int, list[torch.Tensor]] = {}  # unit index -> norms of its accumulated gradients
        self._compiled_step = None
        self._hp_tensor = torch.zeros(8, dtype=torch.float64)
        self.host_step_note = "torch fused AdamW"
        self._compile_thread: threading.Thread | None = None
        self.compile_wait_s = 0.0  # how long the first host step waited for the background compile
        self.recompute_skipped = 0  # ops the backward's recomputes left out (cfg.recompute_skip), cumulative
        if cfg.host_step not in ("torch", "compiled"):
            raise TierError(f"host_step must be 'torch' or 'compiled', got {cfg.host_step!r}")
        if cfg.host_step == "compiled" and cfg.state_budget_bytes is not None:
            self.host_step_note = "torch fused AdamW (the compiled step does not support state on disk yet)"
        elif cfg.host_step == "compiled":
            # Compiled once in the background while the model is set up and the first forward/backward run;
            # the first host step waits for it (and falls back, with a warning, if it fails).
            self.host_step_note = "one-pass compiled AdamW (compiling)"

            def compile_it() -> None:
                fn = _make_compiled_step(self._worker.threads)
                self._compiled_step = fn
                self.host_step_note = "one-pass compiled AdamW" if fn is not None else \
                    "torch fused AdamW (torch.compile of the one-pass step failed; see warning)"

            self._compile_thread = threading.Thread(target=compile_it, name="vbhal-compile-adamw", daemon=True)
        # Copy rates (prefetch depth, auto share) before the compile starts: its Python holds the GIL in bursts,
        # and a thread stalled between a timing event and its copy inflates the measured time (_copy_rate).
        self.h2d_bandwidth = self._measure_h2d()
        self.d2h_bandwidth = self._measure_d2h()
        if self._compile_thread is not None:
            self._compile_thread.start()
        self.step_count = 0
        self.mispredictions = 0
        self.resident_bytes = 0
        self.peak_resident_bytes = 0
        self._t_step = time.perf_counter()
        self._placeholders: dict[torch.dtype, torch.Tensor] = {}
        self.state_stack = None
        if cfg.state_budget_bytes is not None:
            from vbhal.tiers.stack import Tier, TierStack

            self.state_stack = TierStack(
                [Tier("host RAM (master + AdamW state)", 0, torch.device("cpu"), int(cfg.state_budget_bytes)),
                 Tier("disk", 1, torch.device("cpu"), _disk_capacity(cfg.spill_root), kind="disk")],
                prefetch_depth=6, spill_root=cfg.spill_root,
            )
        self._build(report)
        self._init_gpu_step(report)

    # ------------------------------------------------------------------------------------------- set-up
    def _build(self, report: Any) -> None:
        units, resident = _find_units(self.model, self.cfg.units)
        if not units:
            raise TierError("apply_offload found no module to stream: pass OffloadConfig(units=[...module names...])")
        seen: dict[int, str] = {}
        shared: set[int] = set()
        for n, m in units:
            for p in m.parameters():
                if id(p) in seen and seen[id(p)] != n:
                    shared.add(id(p))
                seen.setdefault(id(p), n)
        res_ids = {id(p) for _, p in resident}
        for pn, p in self.model.named_parameters(remove_duplicate=False):
            if id(p) in shared and id(p) not in res_ids:
                resident.append((pn, p))
                res_ids.add(id(p))
        # Buffers (running stats, caches) live on the device for good.
        for m in self.model.modules():
            for bn, b in list(m._buffers.items()):
                if b is not None:
                    m._buffers[bn] = b.to(self.device)
        if self.cfg.state_budget_bytes is not None:
            # A unit's master and AdamW state are held in RAM together for its step: the budget must fit one.
            need = max(sum(p.numel() for p in m.parameters() if id(p) not in res_ids and p.requires_grad)
                       for _, m in units) * _STATE_BYTES_PER_PARAM
            if self.cfg.state_budget_bytes < need:
                raise TierError(
                    f"state_budget_bytes={self.cfg.state_budget_bytes} cannot hold the largest unit's fp32 master and "
                    f"AdamW state ({need} bytes), which its host step needs in RAM at once: raise it to at least "
                    f"{need} (better a few units more, so the next ones can be read ahead)")
        self.units: list[_Unit] = []
        for i, (name, module) in enumerate(units):
            ps = [(pn, p) for pn, p in module.named_parameters() if id(p) not in res_ids]
            ps = [x for x in ps if x[1].requires_grad] + [x for x in ps if not x[1].requires_grad]
            n_train = sum(1 for _, p in ps if p.requires_grad)
            low_ids = {id(p) for m in module.modules() if isinstance(m, _LOW_PRECISION_TYPES) for p in m.parameters(recurse=False)}
            dtypes = [self._dtype_for(p, id(p) in low_ids) for _, p in ps]
            offsets, m_offsets, off, moff, train_nbytes = [], [], 0, 0, 0
            for j, (_, p) in enumerate(ps):
                offsets.append(off)
                off = _pad(off + p.numel() * _itemsize(dtypes[j]))
                if j < n_train:
                    m_offsets.append(moff)
                    moff += p.numel()
                    train_nbytes = off
            unit = _Unit(i, name, module, ps, [p.shape for _, p in ps], dtypes, offsets, m_offsets, max(off, ALIGN_BYTES),
                         train_nbytes, moff, n_train)
            unit.shared = [p for p in module.parameters() if id(p) in res_ids and p.requires_grad]
            self._materialize(unit)
            self.units.append(unit)
            self._wrap(unit)
            if report is not None:
                report.add("offload", name, f"{len(ps)} params, {unit.nbytes} bytes streamed as {sorted(set(map(str, dtypes)))}")
        # Resident parameters: on the device in their own dtype, AdamW on the device at step().
        self.resident = [p for _, p in resident]
        for p in self.resident:
            p.data = p.data.to(self.device)
        train_res = [p for p in self.resident if p.requires_grad]
        self.resident_opt = self._make_adamw(train_res) if train_res else None
        if report is not None and resident:
            report.add("offload", "resident", f"{len(resident)} parameters stay on {self.device}: " + ", ".join(n for n, _ in resident[:6]))
        self.max_unit_bytes = max(u.work_bytes for u in self.units)
        if self.cfg.device_budget_bytes is not None and self.max_unit_bytes > self.cfg.device_budget_bytes:
            raise TierError(
                f"the largest unit needs {self.max_unit_bytes} bytes on the device but device_budget_bytes is "
                f"{self.cfg.device_budget_bytes}: raise the budget or split the model into smaller units"
            )

    @property
    def work_dtype(self) -> torch.dtype:
        return self._work_dtype

    def _dtype_for(self, p: nn.Parameter, low_ok: bool) -> torch.dtype:
        """Working-copy dtype: the configured one for matmul/conv weights, fp32 for the rest when it is 16-bit."""
        if not hasattr(self, "_work_dtype"):
            wd = self.cfg.work_dtype
            self._work_dtype = wd if wd is not None else (torch.bfloat16 if self._accel else p.dtype)
        if not p.is_floating_point():
            return p.dtype
        if not low_ok and self._work_dtype.itemsize < 4:
            return torch.float32
        return self._work_dtype

    def _materialize(self, unit: _Unit) -> None:
        ps = unit.params
        unit.work_host = self.pool.alloc(unit.nbytes, torch.uint8, zero=True)
        unit.grad_host = self.pool.alloc(unit.train_nbytes, torch.uint8, zero=True) if unit.n_train else None
        unit.master = torch.zeros(unit.train_numel, dtype=torch.float32)
        for j, ((pn, p), off) in enumerate(zip(ps, unit.m_offsets + [0] * (len(ps) - unit.n_train))):
            n = p.numel()
            src = p.data
            if src.is_meta:
                if self.cfg.init_fn is None:
                    raise TierError(
                        f"parameter {unit.name}.{pn} is on the meta device: initialise it first, or pass "
                        "apply_offload(..., init_fn=fn) where fn(name, fp32_host_tensor) fills the host copy in place"
                    )
                # Materialise straight into host memory: a model bigger than the device never exists on it.
                src = unit.master[off : off + n] if j < unit.n_train else torch.empty(n, dtype=torch.float32)
                self.cfg.init_fn(f"{unit.name}.{pn}" if unit.name else pn, src.view(p.shape))
            src = src.detach().reshape(-1).to("cpu")
            if j < unit.n_train and not p.data.is_meta:
                unit.master[off : off + n].copy_(src)
            unit.view(unit.work_host.tensor, j).copy_(src.view(p.shape))
            if p.data.is_meta:  # a meta tensor cannot take real storage: put a fresh Parameter in its place
                owner_name, _, leaf = pn.rpartition(".")
                owner = unit.module.get_submodule(owner_name) if owner_name else unit.module
                newp = nn.Parameter(self._placeholder(unit.dtypes[j]), requires_grad=p.requires_grad)
                owner._parameters[leaf] = newp
                unit.params[j] = (pn, newp)
            else:
                p.data = self._placeholder(unit.dtypes[j])
        if unit.n_train:
            unit.opt = self._make_adamw([unit.master])
            if self.state_stack is not None:
                # The master lives in the state stack (host RAM budget, then disk); the optimizer keeps only an
                # empty stand-in whose .data is pointed at the stack's tensor for the duration of a step.
                self.state_stack.register((unit.idx, "master"), unit.master)
                unit.master.data = torch.empty(0)
        unit.host_ready.set()

    def _make_adamw(self, params: list[torch.Tensor]) -> torch.optim.Optimizer:
        kw = {"lr": self.cfg.lr, "betas": self.cfg.betas, "eps": self.cfg.eps, "weight_decay": self.cfg.weight_decay}
        try:
            return torch.optim.AdamW(params, fused=True, **kw)
        except (RuntimeError, TypeError):  # fused not available for this device/dtype
            return torch.optim.AdamW(params, **kw)

    def _placeholder(self, dtype: torch.dtype) -> torch.Tensor:
        ph = self._placeholders.get(dtype)
        if ph is None:
            ph = self._placeholders[dtype] = torch.empty(0, dtype=dtype, device=self.device)
        return ph

    def _compute_mark(self) -> Any:
        """An event on the compute stream, for a copy stream to wait on before it writes into memory just allocated
        on the compute stream (compute work that has not run yet may have freed that memory).

        Every buffer the engine streams in (working copies, saved inputs) is allocated on the compute stream and
        freed there, so no ``record_stream`` is needed and a freed block is reused at once.
        Allocated on the copy stream instead, each stream's (expandable) segment kept its own pages: under the 8 GB
        cap the forward's copies and the backward's compute could not reuse each other's freed memory without the
        caching allocator's retry (a release of every cached block that synchronises every stream). H100, same
        machine (session 5): 2.3 -> 1.0 retries and 51 -> 12 device mallocs per step. The retry left comes with
        2.7 GB live (allocation trace): the recompute's 512 MB blocks among the 128-256 MB streamed ones fragment
        the mapped memory. A private pool for the streamed buffers (torch.cuda.MemPool) did not remove it, and ran
        out of memory at 64k tokens, so they share the pool."""
        ev = self._dm.Event()
        ev.record(self._dm.current_stream(self.device))
        return ev

    def _measure_h2d(self) -> float | None:
        """Host->device bandwidth of 64 MiB pooled copies (bytes/s), used to learn the prefetch depth and by the
        auto share of device-stepped units."""
        return self._copy_rate(up=True)

    def _copy_rate(self, up: bool) -> float | None:
        """Bandwidth (bytes/s) of one 64 MiB pooled copy host->device (`up`) or device->host: the fastest of five,
        each timed by device events recorded right around it (the DMA's own time).

        Timed with the host clock (sessions 3-7), a Python thread holding the GIL in between inflated it: at
        engine build the background compile of the host step does, and session 8's H100 run read 5 GB/s instead
        of ~40, so the auto share put 1 of 6 units on the device instead of 5 (0.81B under the 8 GB cap: 1.09 s
        per step against 0.30). A stall between an event and its copy still counts, hence the fastest of five."""
        if not self._accel:
            return None
        n = 64 << 20
        blk = self.pool.alloc(n, torch.uint8)
        try:
            dev = torch.empty(n, dtype=torch.uint8, device=self.device)
            src, dst = (blk.tensor, dev) if up else (dev, blk.tensor)
            stream = self._dm.current_stream(self.device)
            dst.copy_(src, non_blocking=True)  # warm
            if not blk.pinned:  # pageable: the host stages the copy, largely outside any device span
                self._dm.synchronize(self.device)
                t0 = time.perf_counter()
                for _ in range(3):
                    dst.copy_(src, non_blocking=True)
                self._dm.synchronize(self.device)
                return 3 * n / (time.perf_counter() - t0)
            pairs = []
            for _ in range(5):
                a, b = self._dm.Event(enable_timing=True), self._dm.Event(enable_timing=True)
                a.record(stream)
                dst.copy_(src, non_blocking=True)
                b.record(stream)
                pairs.append((a, b))
            pairs[-1][1].synchronize()
            ms = min(a.elapsed_time(b) for a, b in pairs)
            return n / (ms / 1e3) if ms > 0 else None
        finally:
            self.pool.free(blk)

    def _wrap(self, unit: _Unit) -> None:
        orig = unit.module.forward
        eng = self

        def forward(*args: Any, **kwargs: Any) -> Any:
            if not torch.is_grad_enabled():
                return eng._inference_call(unit, orig, args, kwargs)
            leaves, spec = tree_flatten((args, kwargs))
            call = _Call()
            call.engine, call.unit, call.orig, call.in_spec = eng, unit, orig, spec
            call.tensor_pos = [i for i, x in enumerate(leaves) if isinstance(x, torch.Tensor)]
            call.in_leaves = [None if isinstance(x, torch.Tensor) else x for x in leaves]
            tensors = [leaves[i] for i in call.tensor_pos]
            outs = _UnitFunction.apply(call, eng._dummy, *tensors)
            leaves_out = list(call.out_leaves)
            for pos, t in zip(call.out_tensor_pos, outs):
                leaves_out[pos] = t
            return tree_unflatten(leaves_out, call.out_spec)

        forward.__wrapped__ = orig  # type: ignore[attr-defined]
        unit.module.forward = forward  # instance attribute: the class is untouched

    # ------------------------------------------------------------------------------------ residency
    def _check_worker(self) -> None:
        if self._worker_error is not None:
            err, self._worker_error = self._worker_error, None
            raise TierError(f"the host optimizer step failed: {err!r}") from err

    def _fetch(self, unit: _Unit, *, block: bool) -> bool:
        """Start copying `unit`'s working copy to the device. Returns False when its host step is not done
        and `block` is False (the copy is tried again later)."""
        if unit.dev_buf is not None:
            return True
        if not unit.host_ready.is_set():
            if not block:
                return False
            t0 = time.perf_counter()
            unit.host_ready.wait()
            self.stats.add(1, stall_s=time.perf_counter() - t0)
            self._check_worker()
        nbytes = unit.work_bytes
        if self._accel:
            buf = torch.empty(unit.nbytes, dtype=torch.uint8, device=self.device)  # on the compute stream
            if self.cfg.poison:
                buf.fill_(0xFF)  # all-ones bytes: NaN in every float format
            alloc = self._compute_mark()
            with self._dm.stream(self._h2d):
                self._h2d.wait_event(alloc)
                if unit.dev_done is not None:
                    self._h2d.wait_event(unit.dev_done)  # the device step's new working copy is home
                buf.copy_(unit.work_host.tensor, non_blocking=True)
                ev = self._dm.Event()
                ev.record(self._h2d)
            unit.dev_event = ev
            unit.dev_stream = self._dm.current_stream(self.device)
        else:
            buf = unit.work_host.tensor.clone()
        unit.dev_buf = buf
        self.resident_bytes += nbytes
        self.peak_resident_bytes = max(self.peak_resident_bytes, self.resident_bytes)
        self.stats.add(0, promotions=1, bytes_in=nbytes)
        self.stats.add(1, bytes_out=nbytes)
        self._bytes["weights_up"] += nbytes
        return True

    def _bind(self, unit: _Unit, timed: bool = True) -> None:
        buf = unit.dev_buf
        if self._accel and unit.dev_event is not None:
            cur = self._dm.current_stream(self.device)
            e0 = self._tev() if timed else None
            cur.wait_event(unit.dev_event)
            self._tspan("wait_w", e0)
            if cur != unit.dev_stream:  # allocated on another stream's pool: it must outlive this stream's work
                buf.record_stream(cur)
            unit.dev_event = None
        for j, (_, p) in enumerate(unit.params):
            p.data = unit.view(buf, j)
        unit.bound = True

    def _release(self, unit: _Unit, force: bool = False) -> None:
        if unit.dev_buf is None or (unit.keep == "all" and not force):
            return
        if self._accel and unit.dev_event is not None:
            # Not bound since its last write (a fetch, or a kept unit's device step): that copy may still run. The
            # buffer goes back to the pool of the stream it was allocated on, so that stream waits for the copy
            # before anything there can reuse the memory.
            (unit.dev_stream or self._dm.current_stream(self.device)).wait_event(unit.dev_event)
        for j, (_, p) in enumerate(unit.params):
            p.data = self._placeholder(unit.dtypes[j])
        self.resident_bytes -= unit.work_bytes
        unit.dev_buf = None
        unit.dev_event = None
        unit.dev_stream = None
        unit.bound = False
        self.stats.add(0, demotions=1)

    def _upcoming(self) -> list[int]:
        if self._order is None:
            return []
        return [u for u, _ in self._order[self._pos : self._pos + self.depth]]

    def _before(self, unit: _Unit, phase: str) -> None:
        """A unit is about to compute: make it resident and bound, and prefetch what comes next."""
        self._check_worker()
        event = (unit.idx, phase)
        if self._order is None:
            self._trace.append(event)
        else:
            if self._pos < len(self._order) and self._order[self._pos] == event:
                self._pos += 1
            else:
                self.mispredictions += 1
                try:
                    self._pos = self._order.index(event, self._pos) + 1
                except ValueError:
                    try:
                        self._pos = self._order.index(event) + 1
                    except ValueError:
                        self._pos = len(self._order)
        hit = unit.dev_buf is not None
        self.stats.add(0, hits=int(hit), misses=int(not hit))
        self._fetch(unit, block=True)
        self._bind(unit)
        if phase == "B":
            self._maybe_decide()
            if unit.gpu_step and unit.bw_calls + 1 >= unit.fw_calls:
                self._gpu_prefetch(unit)
        if self._learning_events() is not None:
            self._mark_compute(unit, phase, "start")
        unit.t_start = self._tev()
        # Prefetch: the learned window, or (first step) the neighbour in module order.
        if self._order is not None:
            for u in self._upcoming():
                self._fetch(self.units[u], block=False)
        else:
            nxt = unit.idx + (1 if phase == "F" else -1)
            if 0 <= nxt < len(self.units):
                self._fetch(self.units[nxt], block=False)

    def _after_forward(self, unit: _Unit) -> None:
        if self._learning_events() is not None:
            self._mark_compute(unit, "F", "end")
        self._phase_end(unit, "fwd")
        if unit.idx not in self._upcoming() and not unit.keep:
            self._release(unit)

    def _after_phase(self, unit: _Unit, final: bool) -> None:
        """End of a backward call: release the working copy unless it is prefetched for what comes next or kept
        (keep "fb" lasts until the unit's last backward of the step, keep "all" across steps)."""
        if self._learning_events() is not None:
            self._mark_compute(unit, "B", "end")
        self._phase_end(unit, "bwd")
        if unit.keep == "all" or (unit.keep == "fb" and not final):
            return
        if unit.keep == "fb" or unit.idx not in self._upcoming():
            self._release(unit)

    def _after_backward(self, unit: _Unit, grads: list[torch.Tensor | None]) -> None:
        """Send the unit's gradients down to the host and queue its host AdamW step (after the unit's last
        backward call of the step: a unit called twice, e.g. a shared block, accumulates first)."""
        unit.bw_calls += 1
        if unit.grad_acc is not None:
            grads = [a if b is None else (b if a is None else a + b) for a, b in zip(unit.grad_acc, grads)]
        if unit.bw_calls < unit.fw_calls:
            unit.grad_acc = grads
            self._after_phase(unit, False)
            return
        unit.grad_acc = None
        unit.fw_calls = unit.bw_calls = 0
        if unit.n_train:
            gh = unit.grad_host.tensor
            unused = [unit.params[j][0] for j, g in enumerate(grads) if g is None]
            if unused and not unit.warned_unused:
                unit.warned_unused = True
                warnings.warn(
                    f"vbhal offload: parameters {unused} of unit '{unit.name}' got no gradient; they are stepped with a "
                    "zero gradient (weight decay and moment decay still apply, unlike torch.optim.AdamW which skips them)",
                    TierWarning,
                    stacklevel=2,
                )
            nbytes = 0
            if unit.pending is not None and not unit.pending.done():
                # The previous micro-batch's host task still reads the gradient buffer: wait before overwriting it.
                t0 = time.perf_counter()
                unit.pending.result()
                self.stats.add(1, stall_s=time.perf_counter() - t0)
            grads = [g if g is None or g.dtype == unit.dtypes[j] else g.to(unit.dtypes[j]) for j, g in enumerate(grads)]
            last_micro = self._micro + 1 >= self.cfg.grad_accum_steps
            if self._defer and last_micro and self.cfg.grad_accum_steps == 1:
                # Per-parameter norms where the gradients are (clip_grad_norm_'s _foreach_norm on fp32 values),
                # queued on the compute stream: no synchronisation until step() needs the total.
                for j, g in enumerate(grads):
                    if g is not None:
                        self._norms[id(unit.params[j][1])] = torch._foreach_norm([g.float()], 2.0)[0]
            if unit.gpu_step and not self._defer:
                # Device step: the gradients stay on the device; state comes up, results go home (no host work).
                self._device_step(unit, grads, self._lr, None)
                self._after_phase(unit, True)
                return
            done = None
            if self._accel:
                cur = self._dm.current_stream(self.device)
                ready = self._dm.Event()
                ready.record(cur)
                with self._dm.stream(self._d2h):
                    self._d2h.wait_event(ready)
                    if unit.dev_done is not None:  # a deferred device step may still read the last gradients
                        self._d2h.wait_event(unit.dev_done)
                    for j, g in enumerate(grads):
                        dst = unit.view(gh, j)
                        if g is None:
                            dst.zero_()
                            continue
                        dst.copy_(g, non_blocking=True)
                        g.record_stream(self._d2h)
                        nbytes += g.numel() * g.element_size()
                    done = self._dm.Event()
                    done.record(self._d2h)
            else:
                for j, g in enumerate(grads):
                    dst = unit.view(gh, j)
                    if g is None:
                        dst.zero_()
                    else:
                        dst.copy_(g)
                        nbytes += g.numel() * g.element_size()
            self.stats.add(0, bytes_out=nbytes)
            self.stats.add(1, bytes_in=nbytes)
            self._bytes["grads_down"] += nbytes
            if not last_micro:  # not the last micro-batch: accumulate only
                unit.pending = self._worker.submit((self.step_count, unit.idx), self._host_accumulate, unit, done, ready=done)
            elif self._defer:
                if not unit.gpu_step:
                    unit.host_ready.clear()
                if self.cfg.grad_accum_steps > 1:  # the sum exists only on the host: its norms are taken there
                    unit.pending = self._worker.submit((self.step_count, unit.idx), self._host_accumulate, unit, done, True,
                                                       ready=done)
                self._deferred.append((unit, done))
            else:
                unit.host_ready.clear()
                unit.step_tag = self.step_count
                unit.pending = self._worker.submit((self.step_count, unit.idx), self._host_step, unit, done, self._lr, None,
                                                   ready=done)
        self._after_phase(unit, True)

    def _host_accumulate(self, unit: _Unit, done: Any, final: bool = False) -> None:
        """Gradient accumulation: add this micro-batch's gradient to an fp32 sum. `final` (last micro-batch of a
        deferred step): also take the per-parameter norms of the sum, which the step then uses as its gradient."""
        try:
            if done is not None:
                done.synchronize()
            t0 = time.perf_counter()
            first = unit.g_acc is None
            if first:
                unit.g_acc = torch.empty(unit.train_numel, dtype=torch.float32)
            for j in range(unit.n_train):
                o, n = unit.m_offsets[j], math.prod(unit.shapes[j])
                dst = unit.g_acc[o : o + n].view(unit.shapes[j])
                src = unit.view(unit.grad_host.tensor, j)
                if unit.acc_count == 0:
                    dst.copy_(src)
                else:
                    dst.add_(src)  # fp32 += working dtype: what .grad accumulation does for an fp32 leaf
            unit.acc_count += 1
            if final:
                unit.acc_final = True
                views = [unit.g_acc[unit.m_offsets[j] : unit.m_offsets[j] + math.prod(unit.shapes[j])]
                         for j in range(unit.n_train)]
                self._host_norms[unit.idx] = list(torch._foreach_norm(views, 2.0))
            self.stats.add(1, busy_s=time.perf_counter() - t0)
        except BaseException as e:  # noqa: BLE001 - surfaced on the main thread
            self._worker_error = e

    def wait_compiled(self) -> None:
        """Wait for the background compile of the one-pass host step (``host_step="compiled"``)."""
        if self._compile_thread is not None:
            t0 = time.perf_counter()
            self._compile_thread.join()
            self._compile_thread = None
            self.compile_wait_s = time.perf_counter() - t0

    def _host_step(self, unit: _Unit, done: Any, lr: float, coef: torch.Tensor | None) -> None:
        """The unit's AdamW step on the host at learning rate `lr`; gradients multiplied by `coef` (a 0-dim fp32
        tensor: the clip coefficient, as clip_grad_norm_ applies it) when given."""
        try:
            self.wait_compiled()
            if done is not None:
                done.synchronize()  # the worker, not the main thread, waits for the gradient copy
            t0 = time.perf_counter()
            if self._compiled_step is not None and unit.acc_count == 0 and coef is None:
                self._host_step_compiled(unit, lr)
                self._host_busy(unit, time.perf_counter() - t0)
                return
            if self._compiled_step is None and self.state_stack is None:
                self._host_step_chunked(unit, lr, coef)
                self._host_busy(unit, time.perf_counter() - t0)
                return
            if unit.acc_final:  # the fp32 sum (last micro-batch included) is complete already
                g32 = unit.g_acc
            else:
                g32 = self._grad_scratch(unit.train_numel)
                for j in range(unit.n_train):  # gradients in their working dtype -> fp32, packed like the master
                    o, n = unit.m_offsets[j], math.prod(unit.shapes[j])
                    dst = g32[o : o + n].view(unit.shapes[j])
                    src = unit.view(unit.grad_host.tensor, j)
                    if unit.acc_count:  # earlier micro-batches, summed in fp32 in the same order as .grad would
                        torch.add(unit.g_acc[o : o + n].view(unit.shapes[j]), src, out=dst)
                    else:
                        dst.copy_(src)
            unit.acc_count = 0
            unit.acc_final = False
            if coef is not None:
                g32.mul_(coef)  # clip_grad_norm_: grad * clamp(max_norm / (norm + 1e-6), max=1)
            if self._compiled_step is not None:
                self._host_step_compiled(unit, lr, grad32=g32)
                self._host_busy(unit, time.perf_counter() - t0)
                return
            with self._state_in_memory(unit):
                unit.master.grad = g32
                unit.opt.param_groups[0]["lr"] = lr
                unit.opt.step()
                unit.master.grad = None
                for j in range(unit.n_train):  # fp32 master -> working copy (rounded to nearest even for bf16)
                    n = math.prod(unit.shapes[j])
                    unit.view(unit.work_host.tensor, j).copy_(unit.master[unit.m_offsets[j] : unit.m_offsets[j] + n].view(unit.shapes[j]))
            self._host_busy(unit, time.perf_counter() - t0)
        except BaseException as e:  # noqa: BLE001 - surfaced on the main thread at the next fetch or step
            self._worker_error = e
        finally:
            unit.host_ready.set()

    def _host_busy(self, unit: _Unit, busy: float) -> None:
        self.stats.add(1, busy_s=busy)
        if self._gpu_units is None and unit.step_tag <= self._auto_tag:  # the auto choice's measurement
            self._host_meas.append((unit.step_tag, unit.train_numel, busy))

    def _adamw_state(self, unit: _Unit) -> dict:
        """The unit's AdamW state as torch.optim.AdamW(fused=True) keeps it (created on first use)."""
        state = unit.opt.state[unit.master]
        if not state:
            state["step"] = torch.tensor(0.0, dtype=torch.float32)
            state["exp_avg"] = torch.zeros_like(unit.master, memory_format=torch.preserve_format)
            state["exp_avg_sq"] = torch.zeros_like(unit.master, memory_format=torch.preserve_format)
        return state

    def _host_step_chunked(self, unit: _Unit, lr: float, coef: torch.Tensor | None) -> None:
        """torch's fused CPU AdamW kernel (``torch._fused_adamw_``, what ``AdamW(fused=True)`` calls) run piece by
        piece: for each piece of HOST_STEP_CHUNK elements, the gradient is cast to fp32 into a scratch that stays
        in cache, stepped, and the new master cast to the working copy while it is still in cache. Memory traffic
        per parameter: ~28 bytes (bf16 gradient in, master/exp_avg/exp_avg_sq in and out, bf16 working copy
        out) instead of ~40 for a whole-unit cast, step, cast.

        Bitwise the same as torch.optim.AdamW(fused=True) stepping each parameter tensor: the kernel is
        elementwise, and pieces start at multiples of HOST_STEP_CHUNK (a multiple of the kernel's 64-byte task
        unit) from each parameter's start, so the vectorised/scalar split of the elements is the same."""
        state = self._adamw_state(unit)
        step_t = state["step"]
        step_t += 1  # torch._foreach_add_(state_steps, 1), as AdamW.step does before the kernel
        b1, b2 = self.cfg.betas
        exp_avg, exp_avg_sq = state["exp_avg"], state["exp_avg_sq"]
        scratch = self._grad_scratch(min(HOST_STEP_CHUNK, unit.train_numel))
        acc = unit.acc_count > 0
        for j in range(unit.n_train):
            o, n = unit.m_offsets[j], math.prod(unit.shapes[j])
            src = unit.view(unit.grad_host.tensor, j).reshape(-1)
            work = unit.view(unit.work_host.tensor, j).reshape(-1)
            for a in range(0, n, HOST_STEP_CHUNK):
                b = min(n, a + HOST_STEP_CHUNK)
                p_c = unit.master[o + a : o + b]
                if unit.acc_final:  # the fp32 sum over micro-batches is complete
                    g = unit.g_acc[o + a : o + b]
                else:
                    g = scratch[: b - a]
                    if acc:  # earlier micro-batches, summed in fp32 in the same order as .grad would
                        torch.add(unit.g_acc[o + a : o + b], src[a:b], out=g)
                    else:
                        g.copy_(src[a:b])
                if coef is not None:
                    g.mul_(coef)  # clip_grad_norm_: grad * clamp(max_norm / (norm + 1e-6), max=1)
                torch._fused_adamw_([p_c], [g], [exp_avg[o + a : o + b]], [exp_avg_sq[o + a : o + b]], [], [step_t],
                                    lr=lr, beta1=b1, beta2=b2, weight_decay=self.cfg.weight_decay, eps=self.cfg.eps,
                                    amsgrad=False, maximize=False)
                work[a:b].copy_(p_c)  # fp32 master -> working copy (round to nearest even for bf16)
        unit.acc_count = 0
        unit.acc_final = False

    def _host_step_compiled(self, unit: _Unit, lr: float, grad32: torch.Tensor | None = None) -> None:
        """AdamW in one pass per parameter: read the low-precision gradient, update master, m, v, write the
        working copy — 28 bytes moved per bf16 parameter instead of ~40 for fused AdamW plus two casts."""
        state = self._adamw_state(unit)  # the same state as the torch step: the variants can be switched
        state["step"] += 1
        step = int(state["step"].item())
        m_all, v_all = state["exp_avg"], state["exp_avg_sq"]
        b1, b2 = self.cfg.betas
        wd = self.cfg.weight_decay
        bc1 = 1 - b1**step
        bc2 = 1 - b2**step
        hp = self._hp_tensor
        hp.copy_(torch.tensor([1 - lr * wd, b1, 1 - b1, b2, 1 - b2, lr / bc1, math.sqrt(bc2), self.cfg.eps], dtype=torch.float64))
        for j in range(unit.n_train):
            o, n = unit.m_offsets[j], math.prod(unit.shapes[j])
            g = unit.view(unit.grad_host.tensor, j).reshape(-1) if grad32 is None else grad32[o : o + n]
            w = unit.view(unit.work_host.tensor, j).reshape(-1)
            # sizes 0 and 1 are specialised by torch.compile (a recompile in mid-training): eager, same formula
            step = self._compiled_step if n >= 2 else _adamw_one_pass
            step(unit.master[o : o + n], m_all[o : o + n], v_all[o : o + n], g, w, hp)

    @contextlib.contextmanager
    def _pinned_state(self, u: _Unit, names: tuple[str, ...]):
        """{name: tensor} of the unit's master and AdamW state among `names` ("master", "exp_avg", "exp_avg_sq";
        state that does not exist yet is left out), on the host. From the state stack each is pinned in host memory
        until the block ends: with state on the disk tier, reading one key can push out another one read a moment
        ago (the stack evicts the key used furthest ahead)."""
        st = self.state_stack
        if st is None:
            state = u.opt.state.get(u.master, {})
            yield {k: u.master if k == "master" else state[k] for k in names if k == "master" or k in state}
            return
        got: dict[str, torch.Tensor] = {}
        try:
            for k in names:
                if (u.idx, k) in st:
                    got[k] = st.access((u.idx, k), pin=True)
            yield got
        finally:
            for k in got:
                st.unpin((u.idx, k))

    def _state_in_memory(self, unit: _Unit):
        """Bring the unit's master and AdamW state into host memory from the state stack (pinned there for the
        step); after the step, state created by the first step is registered with the stack."""
        st = self.state_stack
        if st is None:
            return contextlib.nullcontext()
        eng = self

        @contextlib.contextmanager
        def ctx():
            state = unit.opt.state.get(unit.master)
            names = ("master",) + (("exp_avg", "exp_avg_sq") if state is not None else ())
            with eng._pinned_state(unit, names) as got:
                unit.master.data = got["master"]
                for k in names[1:]:
                    if k in got:
                        state[k] = got[k]
                try:
                    yield
                finally:
                    state = unit.opt.state.get(unit.master, {})
                    for k in ("exp_avg", "exp_avg_sq"):
                        if k in state and (unit.idx, k) not in st:
                            st.register((unit.idx, k), state[k])  # the stack keeps its own copy
                        state.pop(k, None)  # the optimizer holds no state between steps
                    unit.master.data = torch.empty(0)
                    eng._state_steps += 1

        return ctx()

    def _grad_scratch(self, numel: int) -> torch.Tensor:
        """fp32 gradient scratch shared by the (single) worker: allocated once, not per step."""
        if self._scratch is None or self._scratch.numel() < numel:
            self._scratch = torch.empty(max(numel, max(u.train_numel for u in self.units)), dtype=torch.float32)
        return self._scratch[:numel]

    # ---------------------------------------------------------------------------- device (GPU) AdamW step
    def _init_gpu_step(self, report: Any) -> None:
        """Which units step on the device: explicit fraction now, auto (None, accelerators only) after step 1."""
        cfg = self.cfg
        self.gpu_step_note = ""
        self.gpu_step_auto: dict[str, Any] | None = None
        self._auto_tag = 1  # auto: decide from the host steps of this optimizer step (all units host-stepped)
        self._gpu_units: set[int] | None = set()
        self._ring: list[dict] | None = None
        self._piece = GPU_STEP_PIECE
        self._slot_next = 0
        self._prefetched: tuple[int, list[int]] | None = None  # (unit index, ring slots already being filled)
        self._gpu_events: list[tuple[Any, Any]] = []  # (start, end) timing events of launched device steps
        self._gpu_step_s = 0.0  # device step time (span on the device, incl. waits for state uploads), this step
        self._host_meas: list[tuple[int, int, float]] = []  # (step tag, params, busy s) of the first host steps
        self._t_compute_est: float | None = None
        f = cfg.gpu_step_fraction
        if f is not None and not (isinstance(f, (int, float)) and math.isfinite(f) and 0.0 <= f <= 1.0):
            raise TierError(f"gpu_step_fraction must be None (auto) or a number in [0, 1], got {f!r}")
        # Two ring slots of the smallest piece the ring uses: HOST_STEP_CHUNK elements, or (small models) the
        # largest trainable parameter rounded up to 1024 elements (see _get_ring).
        sizes = [math.prod(u.shapes[j]) for u in self.units for j in range(u.n_train)]
        min_piece = min(HOST_STEP_CHUNK, -(-max(sizes) // 1024) * 1024) if sizes else HOST_STEP_CHUNK
        if cfg.gpu_step_buffer_bytes < 2 * min_piece * _SLOT_BYTES_PER_ELEM:
            raise TierError(f"gpu_step_buffer_bytes must be at least {2 * min_piece * _SLOT_BYTES_PER_ELEM} "
                            f"(two ring slots of {min_piece} elements), got {cfg.gpu_step_buffer_bytes}")
        why = None
        if self.state_stack is not None:
            why = "optimizer state on the disk tier"
        elif cfg.grad_accum_steps > 1:
            why = "gradient accumulation sums gradients on the host"
        if why is not None:
            self.gpu_step_note = f"off: {why} (host step for every unit)"
            if f:
                warnings.warn(f"vbhal offload: gpu_step_fraction={f} ignored: {why}; every unit steps on the host",
                              TierWarning, stacklevel=4)
            return
        if f is None:
            if not self._accel:
                self.gpu_step_note = "off (CPU device; auto applies to accelerators)"
                return
            self._gpu_units = None
            self.gpu_step_note = f"auto: decided after optimizer step {self._auto_tag} from its measurements"
            return
        self._set_gpu_units(float(f), "fixed by gpu_step_fraction")
        if report is not None and self._gpu_units:
            report.add("offload", "gpu step", self.gpu_step_note)

    def _set_gpu_units(self, f: float, why: str) -> None:
        """Step an evenly spaced share `f` of the trainable units on the device, unit 0 always among them.

        Why spread and why unit 0: unit 0's gradients arrive last in backward and its weights are needed first by
        the next forward, so its host step can never overlap anything (it is the whole wait at the start of each
        forward); on the device it takes milliseconds. The other device-stepped units are spread evenly (not the
        next ones after unit 0) because each moves ~24 bytes per parameter over PCIe, more than its backward
        compute time covers: spread out, that traffic interleaves with the weight fetches of the host-stepped
        units in between; bunched at the end of backward it would stall it. Spreading also thins the host's
        backlog evenly, so the next forward rarely waits for a host step."""
        for u in self.units:
            u.gpu_step = False
        elig = [u for u in self.units if u.n_train]
        c = 0 if f <= 0 or not elig else max(1, min(len(elig), round(f * len(elig))))
        chosen = [elig[(i * len(elig)) // c] for i in range(c)]
        for u in chosen:
            u.gpu_step = True
        self._gpu_units = {u.idx for u in chosen}
        self.gpu_step_fraction = c / len(elig) if elig else 0.0
        self.gpu_step_note = (f"{c} of {len(elig)} units step on the device ({why})" if c else f"off ({why})")

    def set_gpu_step_fraction(self, f: float | None) -> None:
        """Change the share of device-stepped units between optimizer steps (None: decide again automatically
        from the next full host-stepped optimizer step). Waits for pending steps."""
        if f is not None and not (isinstance(f, (int, float)) and math.isfinite(f) and 0.0 <= f <= 1.0):
            raise TierError(f"gpu_step_fraction must be None (auto) or a number in [0, 1], got {f!r}")
        self.synchronize()
        self._unkeep_all()
        self.cfg.gpu_step_fraction = f
        for u in self.units:
            u.gpu_step = False
        self._host_meas = []
        if f == 0.0:
            self._ring = None  # its device memory goes back to the keep plan
        self._init_gpu_step(None)
        # Auto measures the step after the next one (the next still finishes the host steps of the old share).
        self._auto_tag = self.step_count + 1
        if self._gpu_units is None:
            self.gpu_step_note = f"auto: decided after optimizer step {self._auto_tag} from its measurements"
        # The keep plan is made again from a step of the new configuration (the auto decision's step, or the next).
        self._keep_tag = self._auto_tag if self._gpu_units is None else self.step_count

    def replan(self) -> None:
        """Decide the device-stepped share (auto, or the configured fraction) and the keep plan again from the next
        steps' measurements: call it when the batch shape changes (activation memory and compute time change)."""
        self.set_gpu_step_fraction(self.cfg.gpu_step_fraction)

    def _maybe_decide(self) -> None:
        if self._gpu_units is None and self.step_count > self._auto_tag:
            self._auto_decide()

    def _auto_decide(self) -> None:
        """Choose the device-stepped share from optimizer step `_auto_tag` (every unit on the host then).

        host(f) = (1 - f) * N * H (H: measured host seconds per parameter, under that step's PCIe contention);
        pcie(f) = (B + 12 f N) / bw per direction (B: that step's bytes in the busier direction, bw: 0.8 x the
        measured copy bandwidth; a device-stepped parameter adds 12 bytes each way: fp32 master, exp_avg,
        exp_avg_sq; its gradient no longer goes down but its working copy does). The host step hides behind
        the rest of the step when host(f) <= max(0.8 T, pcie(f)) (T: device compute time per step measured in
        step 0; 0.8: unit 0's host step cannot overlap, see _set_gpu_units): the smallest such f is taken.

        Tried and taken out (session 8, H100, 64k tokens): refining the share once from the first step that used it,
        moving stall / (N h) more parameters to the device when that step's forward waited for host steps. It moved
        the share from 0.57 to 0.67 (forward waited 0.52 s of a 3.14 s step), but the host's AdamW then ran slower
        per parameter under the extra copies (2.03 against 1.57 s per 1e9), the wait stayed (0.54 s) and the step
        was 3.30 s, as without it (3.31 s on another machine)."""
        meas = [(n, t) for tag, n, t in self._host_meas if tag == self._auto_tag]
        self._host_meas = []
        elig = [u for u in self.units if u.n_train]
        N = sum(u.train_numel for u in elig)
        rows = self.stats.steps
        r = self._auto_tag - self._row_base  # this engine's stats row of that optimizer step
        if not meas or not N or not 0 <= r < len(rows):
            self._set_gpu_units(0.0, "auto: nothing measured")
            return
        H = sum(t for _, t in meas) / max(1, sum(n for n, _ in meas))
        row = rows[r]
        B = max(row.get("l0_in", 0.0), row.get("l0_out", 0.0))
        bw = 0.8 * min(self.h2d_bandwidth or 1e10, self.d2h_bandwidth or 1e10)
        host = N * H
        self._resolve_timing()  # the compute stream's time of step _auto_tag, when its events have completed
        if row.get("dev_compute_s"):
            T, src = row["dev_compute_s"], f"measured in step {self._auto_tag}"
        elif self._t_compute_est is not None:
            T, src = self._t_compute_est, "step 0 phases"
        else:
            T, src = row.get("step_s", 0.0), "step time"
        f_pcie = (host - B / bw) / (host + 12 * N / bw)
        f_gpu = 1.0 - 0.8 * T / host if host > 0 else 0.0
        f = max(0.0, min(1.0, f_pcie, f_gpu)) if host >= AUTO_MIN_HOST_S else 0.0
        self.gpu_step_auto = {"host_s_per_Bparams": H * 1e9, "host_s": host, "bytes_busier_direction": B,
                              "bw_GBps": bw / 1e9, "compute_s": T, "f_pcie": f_pcie, "f_compute": f_gpu, "fraction": f,
                              "compute_from": src}
        self._set_gpu_units(f, f"auto: host {host:.3f} s/step, compute {T:.3f} s, pcie {B / bw:.3f} s")

    def _measure_d2h(self) -> float | None:
        """Device->host bandwidth of 64 MiB pooled copies (bytes/s), for the auto share of device-stepped units."""
        return self._copy_rate(up=False)

    def _ensure_dev_state(self, unit: _Unit) -> dict:
        """Put the unit's fp32 master, exp_avg and exp_avg_sq into one pinned host block (they stay the optimizer's
        tensors: the host step, state_dict and master_state_dict read them as before). Only called when no host
        step of the unit is running."""
        state = self._adamw_state(unit)
        n = unit.train_numel
        blk = unit.state_blk
        if blk is not None:
            t = blk.tensor
            if (unit.master.data_ptr() == t.data_ptr() and state["exp_avg"].data_ptr() == t[n:].data_ptr()
                    and state["exp_avg_sq"].data_ptr() == t[2 * n:].data_ptr()):
                return state
        else:
            blk = unit.state_blk = self.state_pool.alloc(3 * n, torch.float32)
        t = blk.tensor
        t[:n].copy_(unit.master)
        t[n : 2 * n].copy_(state["exp_avg"])
        t[2 * n :].copy_(state["exp_avg_sq"])
        unit.master.data = t[:n]
        state["exp_avg"], state["exp_avg_sq"] = t[n : 2 * n], t[2 * n :]
        return state

    def _get_ring(self) -> list[dict]:
        """The device step's reusable device buffers: slots of one piece each (allocated once)."""
        if self._ring is not None:
            return self._ring
        budget = self.cfg.gpu_step_buffer_bytes
        largest = max(math.prod(u.shapes[j]) for u in self.units for j in range(u.n_train))
        piece = min(GPU_STEP_PIECE, max(HOST_STEP_CHUNK, budget // 2 // _SLOT_BYTES_PER_ELEM // HOST_STEP_CHUNK * HOST_STEP_CHUNK))
        piece = min(piece, -(-largest // 1024) * 1024)  # small models: one piece per parameter, less memory
        n_slots = max(2, min(8, budget // (piece * _SLOT_BYTES_PER_ELEM)))
        self._piece = piece
        ring = []
        for _ in range(n_slots):
            f32 = torch.empty(4 * piece, dtype=torch.float32, device=self.device)
            ring.append({"p": f32[:piece], "m": f32[piece : 2 * piece], "v": f32[2 * piece : 3 * piece],
                         "g": f32[3 * piece :], "w": torch.empty(4 * piece, dtype=torch.uint8, device=self.device),
                         "free": None})
        if self._accel:  # allocated on the compute stream: the side streams start after its pending work
            ev = self._dm.Event()
            ev.record(self._dm.current_stream(self.device))
            for st in (self._up, self._opt, self._down):
                st.wait_event(ev)
        self._ring = ring
        return ring

    def _pieces(self, unit: _Unit) -> list[tuple[int, int, int]]:
        """(parameter, start, end) pieces of a unit's trainable parameters, starting at multiples of the piece size
        from each parameter's start (so the fused kernel splits the elements as in the host step)."""
        return [(j, a, min(math.prod(unit.shapes[j]), a + self._piece))
                for j in range(unit.n_train) for a in range(0, math.prod(unit.shapes[j]), self._piece)]

    def _upload_piece(self, unit: _Unit, piece: tuple[int, int, int], s: int) -> None:
        """On the up stream: master, exp_avg, exp_avg_sq of one piece into ring slot `s` (after its last use)."""
        ring, state = self._ring, unit.opt.state[unit.master]
        j, a, b = piece
        o, k = unit.m_offsets[j], b - a
        slot = ring[s]
        if slot["free"] is not None:
            self._up.wait_event(slot["free"])
        if self.cfg.poison:
            for key in ("p", "m", "v", "g"):
                slot[key].fill_(float("nan"))
        for key, src in (("p", unit.master), ("m", state["exp_avg"]), ("v", state["exp_avg_sq"])):
            slot[key][:k].copy_(src[o + a : o + b], non_blocking=True)
        self.stats.add(0, bytes_in=12 * k)
        self.stats.add(1, bytes_out=12 * k)
        self._bytes["state_up"] += 12 * k

    def _gpu_prefetch(self, unit: _Unit) -> None:
        """At the start of a device-stepped unit's (last) backward: start uploading its first pieces' state, so
        they are on the device when its gradients are."""
        if not self._accel or self._defer or self._prefetched is not None:
            return
        self._ensure_dev_state(unit)
        ring = self._get_ring()
        pieces = self._pieces(unit)
        slots = []
        with self._dm.stream(self._up):
            if unit.dev_done is not None:
                self._up.wait_event(unit.dev_done)  # last step's results are home before they are read again
            for pc in pieces[: len(ring)]:
                s = self._slot_next
                self._slot_next = (s + 1) % len(ring)
                self._upload_piece(unit, pc, s)
                slots.append(s)
        self._prefetched = (unit.idx, slots)

    def _device_step(self, unit: _Unit, grads: list[torch.Tensor | None] | None, lr: float,
                     coef: torch.Tensor | None, done: Any = None) -> None:
        """AdamW of a unit on the device, piece by piece through the ring: state up (up stream), torch's fused
        AdamW + casts (opt stream), working copy and state down (down stream), no host synchronisation. `grads`:
        the gradients on the device in the working dtypes (None: read them from the pinned gradient buffer once
        event `done` fires, as the deferred steps do). On CPU the same pieces run synchronously (test mode:
        bitwise equal to the host step)."""
        state = self._ensure_dev_state(unit)
        ring = self._get_ring()
        pieces = self._pieces(unit)
        b1, b2 = self.cfg.betas
        kw = {"lr": lr, "beta1": b1, "beta2": b2, "weight_decay": self.cfg.weight_decay, "eps": self.cfg.eps,
              "amsgrad": False, "maximize": False}
        state["step"] += 1  # as AdamW.step does before the kernel
        gh = unit.grad_host.tensor
        # Kept on the device ("all"): the new working copy is written into the resident buffer and not sent home
        # (the host copy is stale until _unkeep writes it back); the next forward binds it without a fetch.
        kept = unit.keep == "all" and unit.dev_buf is not None
        if kept:
            unit.host_stale = True
        w_all = unit.dev_buf if kept else unit.work_host.tensor
        if not self._accel:  # test mode: the device pipeline's arithmetic, synchronously on the CPU
            t0 = time.perf_counter()
            for (j, a, b) in pieces:
                o, k = unit.m_offsets[j], b - a
                slot = ring[0]
                if self.cfg.poison:
                    for key in ("p", "m", "v", "g"):
                        slot[key].fill_(float("nan"))
                p, m, v, g = slot["p"][:k], slot["m"][:k], slot["v"][:k], slot["g"][:k]
                p.copy_(unit.master[o + a : o + b])
                m.copy_(state["exp_avg"][o + a : o + b])
                v.copy_(state["exp_avg_sq"][o + a : o + b])
                src = unit.view(gh, j).reshape(-1) if grads is None else (None if grads[j] is None else grads[j].reshape(-1))
                if src is None:
                    g.zero_()
                else:
                    g.copy_(src[a:b])
                if coef is not None:
                    g.mul_(coef)
                torch._fused_adamw_([p], [g], [m], [v], [], [state["step"]], **kw)
                unit.view(w_all, j).reshape(-1)[a:b].copy_(p)
                unit.master[o + a : o + b].copy_(p)
                state["exp_avg"][o + a : o + b].copy_(m)
                state["exp_avg_sq"][o + a : o + b].copy_(v)
            self._gpu_step_s += time.perf_counter() - t0
            return
        dm = self._dm
        cur = dm.current_stream(self.device)
        ready = dm.Event()
        ready.record(cur)  # the gradients (and the clip coefficient) exist on the compute stream from here
        pre = self._prefetched[1] if self._prefetched is not None and self._prefetched[0] == unit.idx else []
        if self._prefetched is not None and self._prefetched[0] == unit.idx:
            self._prefetched = None
        else:  # another unit's prefetch (if any) is dropped: its uploads precede ours on the up stream
            self._prefetched = None
        t_start, t_end = dm.Event(enable_timing=True), dm.Event(enable_timing=True)
        with dm.stream(self._opt):
            self._opt.wait_event(ready)
            step_t = torch.full((), float(state["step"]), dtype=torch.float32, device=self.device)
            t_start.record(self._opt)
        if grads is not None:
            for g in grads:
                if g is not None:
                    g.record_stream(self._opt)  # the allocator keeps them until the opt stream is done
        if coef is not None:
            coef.record_stream(self._opt)
        down_bytes = 0
        for k_, (j, a, b) in enumerate(pieces):
            o, k = unit.m_offsets[j], b - a
            wdt = unit.dtypes[j]
            with dm.stream(self._up):
                if k_ < len(pre):
                    s = pre[k_]
                else:
                    s = self._slot_next
                    self._slot_next = (s + 1) % len(ring)
                    if k_ == 0 and unit.dev_done is not None:
                        self._up.wait_event(unit.dev_done)
                    self._upload_piece(unit, (j, a, b), s)
                slot = ring[s]
                wv = slot["w"][: 4 * k].view(wdt)[:k]
                if grads is None:  # deferred: the gradient comes up from the pinned buffer (working dtype)
                    if done is not None and k_ == 0:
                        self._up.wait_event(done)
                    wv.copy_(unit.view(gh, j).reshape(-1)[a:b], non_blocking=True)
                    self.stats.add(0, bytes_in=k * wv.element_size())
                    self.stats.add(1, bytes_out=k * wv.element_size())
                    self._bytes["grads_up"] += k * wv.element_size()
                up_ev = dm.Event()
                up_ev.record(self._up)
            with dm.stream(self._opt):
                self._opt.wait_event(up_ev)
                p, m, v, g = slot["p"][:k], slot["m"][:k], slot["v"][:k], slot["g"][:k]
                if grads is None:
                    g.copy_(wv)
                elif grads[j] is None:
                    g.zero_()
                else:
                    g.copy_(grads[j].reshape(-1)[a:b])
                if coef is not None:
                    g.mul_(coef)
                torch._fused_adamw_([p], [g], [m], [v], [], [step_t], **kw)
                # fp32 master -> working copy (round to nearest even), as the host step
                (unit.view(w_all, j).reshape(-1)[a:b] if kept else wv).copy_(p)
                op_ev = dm.Event()
                op_ev.record(self._opt)
            with dm.stream(self._down):
                self._down.wait_event(op_ev)
                if not kept:
                    unit.view(unit.work_host.tensor, j).reshape(-1)[a:b].copy_(wv, non_blocking=True)
                unit.master[o + a : o + b].copy_(p, non_blocking=True)
                state["exp_avg"][o + a : o + b].copy_(m, non_blocking=True)
                state["exp_avg_sq"][o + a : o + b].copy_(v, non_blocking=True)
                free = dm.Event()
                free.record(self._down)
                slot["free"] = free
            down_bytes += k * (12 if kept else 12 + wv.element_size())
            self._bytes["state_down"] += 12 * k
            if not kept:
                self._bytes["weights_down"] += k * wv.element_size()
        if kept:
            unit.dev_event = op_ev  # the next forward's compute waits for the new working copy
        with dm.stream(self._down):
            t_end.record(self._down)
            fin = dm.Event()
            fin.record(self._down)
        unit.dev_done = fin  # the next fetch of the working copy waits for this
        step_t.record_stream(self._opt)
        self._gpu_events.append((t_start, t_end))
        self.stats.add(0, bytes_out=down_bytes)
        self.stats.add(1, bytes_in=down_bytes)

    def _collect_gpu_times(self) -> float:
        """Device-step seconds of launched steps that have finished (the rest are counted at a later step)."""
        total, keep = self._gpu_step_s, []
        self._gpu_step_s = 0.0
        for a, b in self._gpu_events:
            if b.query():
                total += a.elapsed_time(b) / 1e3
            else:
                keep.append((a, b))
        self._gpu_events = keep
        return total

    # ------------------------------------------------------------------------------- activations
    def _save_inputs(self, ctx: Any, call: _Call, tensors: tuple[torch.Tensor, ...]) -> None:
        if not self.cfg.offload_activations:
            ctx.save_for_backward(*tensors)
            return
        call.unit.act_bytes_step += sum(t.numel() * t.element_size() for t in tensors
                                        if t.device == self.device and t.numel() * t.element_size() >= MIN_OFFLOAD_ACT_BYTES)
        if call.unit.keep_act:  # the keep plan leaves this unit's saved inputs on the device (no round trip)
            ctx.save_for_backward(*tensors)
            return
        call.offloaded = True
        keep: list[torch.Tensor | None] = []
        call.act_host = []
        if self._accel:
            ready = self._dm.Event()
            ready.record(self._dm.current_stream(self.device))
        for t in tensors:
            if t.device == self.device and t.numel() * t.element_size() >= MIN_OFFLOAD_ACT_BYTES:
                blk = self.act_pool.alloc(t.shape, t.dtype)
                if self._accel:
                    with self._dm.stream(self._d2h):
                        self._d2h.wait_event(ready)
                        blk.tensor.copy_(t, non_blocking=True)
                        t.record_stream(self._d2h)
                else:
                    blk.tensor.copy_(t)
                call.act_host.append(blk)
                keep.append(None)
                self.stats.add(0, bytes_out=t.numel() * t.element_size())
                self.stats.add(1, bytes_in=t.numel() * t.element_size())
                self._bytes["acts_down"] += t.numel() * t.element_size()
            else:
                call.act_host.append(None)
                keep.append(t)
        if self._accel:
            ev = self._dm.Event()
            ev.record(self._d2h)
            call.act_event = ev  # the host copy is complete once this fires
        ctx.save_for_backward(*[t if t is not None else torch.empty(0) for t in keep])
        ctx.requires = [t.requires_grad for t in tensors]
        self._act_calls.append(call)

    def _prefetch_acts(self, call: _Call) -> None:
        if call.act_dev is not None or call.done:
            return
        devs: list[torch.Tensor | None] = []
        if self._accel:
            devs = [None if blk is None else torch.empty(blk.tensor.shape, dtype=blk.tensor.dtype, device=self.device)
                    for blk in call.act_host]  # on the compute stream (_compute_mark)
            alloc = self._compute_mark()
            with self._dm.stream(self._h2d):
                self._h2d.wait_event(alloc)
                if call.act_event is not None:
                    self._h2d.wait_event(call.act_event)
                for blk, d in zip(call.act_host, devs):
                    if d is not None:
                        d.copy_(blk.tensor, non_blocking=True)
                ev = self._dm.Event()
                ev.record(self._h2d)
            call.act_event = ev
            call.act_stream = self._dm.current_stream(self.device)
        else:
            devs = [None if b is None else b.tensor.clone() for b in call.act_host]
        n = sum(b.tensor.numel() * b.tensor.element_size() for b in call.act_host if b is not None)
        self.stats.add(0, bytes_in=n)
        self.stats.add(1, bytes_out=n)
        self._bytes["acts_up"] += n
        call.act_dev = devs

    def _load_inputs(self, ctx: Any, call: _Call) -> list[torch.Tensor]:
        saved = list(ctx.saved_tensors)
        if not call.offloaded:
            return saved
        # Prefetch the saved inputs of the next units backward will reach (reverse forward order).
        try:
            k = self._act_calls.index(call)
        except ValueError:
            k = -1
        self._prefetch_acts(call)
        for j in range(k - 1, max(-1, k - 1 - self.depth), -1):
            self._prefetch_acts(self._act_calls[j])
        if self._accel and call.act_event is not None:
            cur = self._dm.current_stream(self.device)
            e0 = self._tev()
            cur.wait_event(call.act_event)
            self._tspan("wait_act", e0)
        out = []
        for t, blk, d, req in zip(saved, call.act_host, call.act_dev, ctx.requires):
            if blk is None:
                out.append(t)
                continue
            if self._accel and self._dm.current_stream(self.device) != call.act_stream:
                d.record_stream(self._dm.current_stream(self.device))  # allocated on another stream's pool
            out.append(d.requires_grad_(req) if d.is_floating_point() else d)
        # The host copies are no longer needed once the device copies have landed (event waited above by compute);
        # free them after the host knows the copy is done: the worker-free path is to free at step end.
        call.act_dev = None
        if k >= 0:
            self._act_calls.pop(k)
        self._to_free.append(call)
        return out

    # ----------------------------------------------------------------------------- weight hooks (no ckpt)
    def _weight_hooks(self, unit: _Unit):
        storage_ptr = unit.dev_buf.untyped_storage().data_ptr()

        def pack(t: torch.Tensor) -> Any:
            if t.device == self.device and t.untyped_storage().data_ptr() == storage_ptr:
                return ("vbhal-weight", t.storage_offset(), tuple(t.shape), t.stride(), t.dtype)
            return t

        def unpack(h: Any) -> torch.Tensor:
            if isinstance(h, tuple) and h and h[0] == "vbhal-weight":
                if unit.dev_buf is None:  # backward reached this unit without _before (should not happen)
                    self._fetch(unit, block=True)
                    self._bind(unit)
                _, off, shape, stride, dtype = h
                return unit.dev_buf.view(dtype).as_strided(shape, stride, off)
            return h

        return pack, unpack

    # -------------------------------------------------------------------------------------- misc
    def _get_rng(self) -> tuple:
        cpu = torch.get_rng_state()
        dev = self._dm.get_rng_state(self.device) if self._accel and hasattr(self._dm, "get_rng_state") else None
        return cpu, dev

    def _rng_ctx(self, rng: tuple | None):
        if rng is None:
            return contextlib.nullcontext()
        eng = self

        class _Ctx:
            def __enter__(self_inner):
                self_inner.saved = eng._get_rng()
                cpu, dev = rng
                torch.set_rng_state(cpu)
                if dev is not None:
                    eng._dm.set_rng_state(dev, eng.device)

            def __exit__(self_inner, *exc):
                cpu, dev = self_inner.saved
                torch.set_rng_state(cpu)
                if dev is not None:
                    eng._dm.set_rng_state(dev, eng.device)
                return False

        return _Ctx()

    # ------------------------------------------------------------------------- per-step device timing
    def _tev(self) -> Any:
        """A timing event recorded on the compute stream now (None on CPU)."""
        if not self._accel:
            return None
        ev = self._dm.Event(enable_timing=True)
        ev.record(self._dm.current_stream(self.device))
        return ev

    def _tspan(self, kind: str, e0: Any) -> None:
        """Close a timed span on the compute stream that started at event `e0` (a phase or a wait)."""
        if e0 is None:
            return
        self._tcur.append((kind, e0, self._tev()))

    def _phase_end(self, unit: _Unit, kind: str) -> None:
        e0, unit.t_start = unit.t_start, None
        self._tspan(kind, e0)

    def _resolve_timing(self, block: bool = False) -> None:
        """Write the compute stream's time split of finished steps into their stats rows (no host synchronisation
        unless `block`): dev_fwd_s / dev_bwd_s (unit phases; backward includes recompute and the wait for its saved
        inputs), dev_wait_w_s (waiting for weight copies), dev_wait_act_s (waiting for saved inputs coming back),
        dev_compute_s (phases minus those waits), dev_span_s (first to last event of the step) and dev_idle_s (span
        minus compute and waits: the device had nothing queued, e.g. the host waited for a host step)."""
        keep = []
        for row, evs in self._tpend:
            if keep or not evs:
                if evs:
                    keep.append((row, evs))
                continue
            last = evs[-1][2]
            if block:
                last.synchronize()
            elif not last.query():
                keep.append((row, evs))
                continue
            sums: dict[str, float] = {}
            for kind, a, b in evs:
                sums[kind] = sums.get(kind, 0.0) + a.elapsed_time(b) / 1e3
            span = evs[0][1].elapsed_time(last) / 1e3
            fwd, bwd = sums.get("fwd", 0.0), sums.get("bwd", 0.0)
            ww, wa = sums.get("wait_w", 0.0), sums.get("wait_act", 0.0)
            row.update(dev_fwd_s=fwd, dev_bwd_s=bwd, dev_wait_w_s=ww, dev_wait_act_s=wa, dev_compute_s=fwd + bwd - wa,
                       dev_span_s=span, dev_idle_s=max(0.0, span - (fwd + bwd) - ww))
        self._tpend = keep

    def _learning_events(self) -> dict | None:
        if self._order is not None or not self._accel or self.cfg.prefetch_depth is not None:
            return None
        return self._learn_events

    def _mark_compute(self, unit: _Unit, phase: str, which: str) -> None:
        ev = self._dm.Event(enable_timing=True)
        ev.record(self._dm.current_stream(self.device))
        self._learn_events.setdefault(unit.idx, []).append((phase, which, ev))

    def _inference_call(self, unit: _Unit, orig: Any, args: tuple, kwargs: dict) -> Any:
        self._check_worker()
        hit = unit.dev_buf is not None
        self.stats.add(0, hits=int(hit), misses=int(not hit))
        self._fetch(unit, block=True)
        self._bind(unit, timed=False)
        if unit.idx + 1 < len(self.units):
            self._fetch(self.units[unit.idx + 1], block=False)
        try:
            return orig(*args, **kwargs)
        finally:
            self._release(unit)

    # ------------------------------------------------------------------------------------- public
    def step(self) -> OffloadStepInfo | None:
        """Close a training step (one backward): step resident parameters, learn the prefetch order after the
        first step. Returns an :class:`OffloadStepInfo` when an optimizer step closed, ``None`` for the other
        micro-batches of gradient accumulation.

        Without clipping and the non-finite check, the streamed units' host AdamW steps were already queued
        during backward and keep running in the background. With either, they are queued here, once the global
        norm is known (unit 0 first, which the next forward needs first); the next forward waits for each unit's
        step only when it needs that unit.
        """
        self._check_worker()
        last_micro = self._micro + 1 >= self.cfg.grad_accum_steps
        self._micro = 0 if last_micro else self._micro + 1
        info = None
        if last_micro:
            info = self._close_optimizer_step()
        for call in self._to_free:
            self._free_acts(call)
        self._to_free = []
        for call in self._act_calls:  # forward without backward (e.g. an abandoned graph)
            self._free_acts(call)
        self._act_calls = []
        for u in self.units:
            if u.bw_calls or u.grad_acc is not None:
                raise TierError(
                    f"unit '{u.name}' had {u.fw_calls} forward calls but only {u.bw_calls} backward calls this step: "
                    "call backward through every output before engine.step()"
                )
            u.fw_calls = 0
        if self._order is None and self._trace:
            self._learn()
        if self.state_stack is not None:  # after this step's host steps (the worker runs tasks in order)
            self._worker.submit((self.step_count, math.inf), self.state_stack.end_step)
        self._pos = 0
        # Release anything still resident (except working copies kept across steps) so each step starts alike.
        for u in self.units:
            self._release(u)
            if self.cfg.offload_activations:
                u.act_bytes, u.act_bytes_step = u.act_bytes_step, 0
        if last_micro:
            self._keep_step_end()
        self.step_count += 1
        now = time.perf_counter()
        extra = {f"bytes_{k}": v for k, v in self._bytes.items()}
        self._bytes = dict.fromkeys(_BYTE_KINDS, 0.0)
        extra.update(self._alloc_counts())
        extra["kept_bytes"] = float(sum(u.work_bytes for u in self.units if u.keep == "all" and u.dev_buf is not None))
        row = self.stats.end_step(step_s=now - self._t_step, gpu_step_s=self._collect_gpu_times(),
                                  gpu_step_units=float(sum(u.gpu_step for u in self.units)), **extra)
        self._tpend.append((row, self._tcur))
        self._tcur = []
        self._resolve_timing()
        self._t_step = now

        return info

    def _alloc_counts(self) -> dict[str, float]:
        """Caching-allocator events since the last step end (CUDA): retries (a failed allocation that freed cached
        blocks and synchronised the device: memory pressure under the cap) and device mallocs."""
        if self.device.type != "cuda":
            return {}
        ms = torch.cuda.memory_stats(self.device)
        now = (int(ms.get("num_alloc_retries", 0)), int(ms.get("num_device_alloc", 0)))
        last, self._alloc_mark = self._alloc_mark, now
        if last is None:
            return {}
        return {"alloc_retries": float(now[0] - last[0]), "device_mallocs": float(now[1] - last[1])}

    # --------------------------------------------------------------------------------- keep plan
    @property
    def plan_pending(self) -> bool:
        """True while a one-time decision is still to come (prefetch order, auto device-step share, keep plan):
        time steps only once this is False and one more step has run."""
        return self._order is None or self._gpu_units is None or not self._keep_planned

    def _cap_bytes(self) -> int | None:
        """Device memory this process may use: the per-process fraction (CUDA) of the device's memory, bounded by
        what is physically free plus what this process holds; None when the fraction cannot be read (no keep)."""
        dm = self._dm
        if not (hasattr(dm, "get_device_properties") and hasattr(dm, "get_per_process_memory_fraction")):
            return None
        try:
            total = dm.get_device_properties(self.device).total_memory
            cap = int(total * float(dm.get_per_process_memory_fraction(self.device)))
            if hasattr(dm, "mem_get_info") and hasattr(dm, "memory_reserved"):
                free, _ = dm.mem_get_info(self.device)
                cap = min(cap, int(free + dm.memory_reserved(self.device)))
            return cap
        except (RuntimeError, TypeError, AttributeError):
            return None

    def _keep_step_end(self) -> None:
        """At the end of an optimizer step: record the planning step's peak memory, and plan once the prefetch order
        and the device-stepped share are known."""
        if self._keep_planned:
            return
        budget = self.cfg.resident_cache_bytes
        if budget is None and self._accel and self.step_count >= self._keep_tag and self._keep_peak is None:
            peak_fn = getattr(self._dm, "max_memory_allocated", None)
            peak = int(peak_fn(self.device)) if peak_fn is not None else 1 << 62  # unknown: nothing is kept
            self._keep_peak = (peak, self._ring is not None)
        if self._order is None or self._gpu_units is None:
            return
        if budget is None and self._accel and self._keep_peak is None:
            return
        self._plan_keep()

    def _plan_keep(self) -> None:
        """Choose what stays on the device between uses, within the budget (resident_cache_bytes, or what the cap
        leaves above the planning step's peak minus a margin), by PCIe bytes saved per device byte:

        1. working copies of device-stepped units across steps ("all"): no write-back and no fetch in forward or
           backward (2 bytes up and 1 down saved per byte kept);
        2. saved inputs of the last units of the forward (offload_activations): no round trip (1 up, 1 down);
        3. working copies of the last units of the forward, from their forward into their backward ("fb"): no
           re-fetch (1 up).
        The plan adds its bytes to the measured peak (conservative: kept data coexists with the peak)."""
        self._keep_planned = True
        cfg = self.cfg
        info: dict[str, Any] = {"all": [], "acts": [], "fb": []}
        if cfg.resident_cache_bytes is not None:
            budget = int(cfg.resident_cache_bytes)
            info["source"] = "resident_cache_bytes"
        elif not self._accel or self._keep_peak is None:
            budget = 0
            info["source"] = "off (CPU without resident_cache_bytes)"
        elif self._cap_bytes() is None:
            budget = 0
            info["source"] = "off (the device's per-process memory cap cannot be read)"
        else:
            cap = self._cap_bytes()
            peak, ring_then = self._keep_peak
            ring = 0
            if self._gpu_units and not ring_then:
                ring = (sum(r["p"].numel() * 16 + r["w"].numel() for r in self._ring) if self._ring is not None
                        else cfg.gpu_step_buffer_bytes)
                # a device-stepped unit's gradients live until its device step has read them (the state upload
                # paces that), overlapping the backward of the next units: two units' worth on top of the peak
                ring += 2 * self.max_unit_bytes
            margin = max(KEEP_MARGIN_MIN, int(KEEP_MARGIN_FRAC * cap))
            budget = max(0, cap - peak - ring - margin)
            info.update(source="cap - peak - margin", cap_bytes=cap, peak_bytes=peak, device_step_bytes_added=ring,
                        margin_bytes=margin)
        if cfg.device_budget_bytes is not None:  # the streamed weights' own budget also bounds what stays
            budget = min(budget, max(0, cfg.device_budget_bytes - (self.depth + 1) * self.max_unit_bytes))
        info["budget_bytes"] = budget
        left = budget
        for u in self.units:
            if u.gpu_step and u.work_bytes <= left:
                u.keep = "all"
                left -= u.work_bytes
                info["all"].append(u.idx)
        fwd: list[int] = []
        for idx, ph in self._order or []:
            if ph == "F" and idx not in fwd:
                fwd.append(idx)
        if cfg.offload_activations:
            for idx in reversed(fwd):
                u = self.units[idx]
                if 0 < u.act_bytes <= left:
                    u.keep_act = True
                    left -= u.act_bytes
                    info["acts"].append(idx)
        for idx in reversed(fwd):
            u = self.units[idx]
            if not u.keep and u.work_bytes <= left:
                u.keep = "fb"
                left -= u.work_bytes
                info["fb"].append(idx)
        info["used_bytes"] = budget - left
        self.keep_plan = info

    def _unkeep_all(self) -> None:
        """Drop the keep plan: write stale working copies home, release everything (waits for the device)."""
        if self._accel:
            self._dm.synchronize(self.device)
        for u in self.units:
            if u.keep == "all" and u.dev_buf is not None and u.host_stale:
                u.work_host.tensor[: u.train_nbytes].copy_(u.dev_buf[: u.train_nbytes])
            u.host_stale = False
            was = u.keep
            u.keep, u.keep_act = "", False
            if was:
                self._release(u, force=True)
        self._keep_planned = False
        self._keep_peak = None
        self.keep_plan = None

    def _close_optimizer_step(self) -> OffloadStepInfo:
        lr = self._lr
        res_params = [p for p in self.resident if p.requires_grad and p.grad is not None]
        if not self._defer:
            if self.resident_opt is not None:
                self.resident_opt.step()
                self.resident_opt.zero_grad(set_to_none=True)
            return OffloadStepInfo(None, False, lr)
        # Global norm as torch.nn.utils.clip_grad_norm_ computes it: per-parameter 2-norms (fp32), stacked in
        # model.parameters() order, 2-norm of the stack.
        for u, _ in self._deferred:
            if u.idx in self._host_norms or (self.cfg.grad_accum_steps > 1 and u.pending is not None):
                t0 = time.perf_counter()
                u.pending.result()  # the host sums these norms come from
                self.stats.add(1, stall_s=time.perf_counter() - t0)
        self._check_worker()
        for u, _ in self._deferred:
            for j, nrm in enumerate(self._host_norms.pop(u.idx, [])):
                self._norms[id(u.params[j][1])] = nrm.to(self.device)
        for p in res_params:
            self._norms[id(p)] = torch._foreach_norm([p.grad], 2.0)[0]
        ordered = [self._norms[id(p)] for p in self.model.parameters() if id(p) in self._norms]
        self._norms = {}
        deferred, self._deferred = self._deferred, []
        if not ordered:
            total = torch.zeros((), dtype=torch.float32, device=self.device)
        else:
            total = torch.linalg.vector_norm(torch.stack(ordered), 2.0)
        coef_dev = None
        if self.cfg.max_grad_norm is not None:
            coef_dev = torch.clamp(self.cfg.max_grad_norm / (total + 1e-6), max=1.0)
        norm = float(total)  # synchronises: the host steps need the coefficient
        skipped = self.cfg.skip_nonfinite and not math.isfinite(norm)
        if skipped:  # like GradScaler: nothing moves, no step is counted
            for u, _ in deferred:
                u.acc_count, u.acc_final = 0, False
                u.host_ready.set()
            for p in res_params:
                p.grad = None
            return OffloadStepInfo(norm, True, lr)
        if self.resident_opt is not None:
            if coef_dev is not None and res_params:
                torch._foreach_mul_([p.grad for p in res_params], coef_dev.to(res_params[0].device))
            self.resident_opt.step()
            self.resident_opt.zero_grad(set_to_none=True)
        coef = None if coef_dev is None else coef_dev.to("cpu", torch.float32)
        for u, done in sorted(deferred, key=lambda e: e[0].idx):
            if u.gpu_step:  # launched now, in unit order like the host steps; gradients come up from pinned memory
                self._device_step(u, None, lr, coef_dev, done)
                continue
            u.step_tag = self.step_count
            u.pending = self._worker.submit((self.step_count, u.idx), self._host_step, u, done, lr, coef, ready=done)
        return OffloadStepInfo(norm, False, lr)

    def set_lr(self, lr: float) -> None:
        """Learning rate of the optimizer steps that follow (host steps queued from now on, and the resident
        parameters' optimizer); the same as setting ``param_group["lr"]`` of torch's AdamW between steps."""
        lr = float(lr)
        if not math.isfinite(lr) or lr < 0:
            raise ValueError(f"set_lr needs a finite learning rate >= 0, got {lr}")
        self._lr = lr
        if self.resident_opt is not None:
            for g in self.resident_opt.param_groups:
                g["lr"] = lr

    @property
    def lr(self) -> float:
        return self._lr

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Nothing to do (streamed gradients never reach ``.grad``; resident ones are cleared by step()): kept so
        loops written for torch optimizers run unchanged."""

    # ----------------------------------------------------------------------------------- checkpoints
    def _fingerprint(self) -> dict:
        names = {id(p): n for n, p in self.model.named_parameters(remove_duplicate=False)}
        return {
            "units": [[u.name, [[pn, list(sh), j < u.n_train] for j, ((pn, _), sh) in enumerate(zip(u.params, u.shapes))]]
                      for u in self.units],
            "resident": [[names.get(id(p), "?"), list(p.shape), bool(p.requires_grad)] for p in self.resident],
        }

    @contextlib.contextmanager
    def _unit_state(self, u: _Unit):
        """(master, exp_avg, exp_avg_sq, step) of a unit on the host (state tensors are None before its first step),
        held in host memory (pinned in the state stack) while the block runs."""
        state = u.opt.state.get(u.master, {})
        step = int(state["step"].item()) if "step" in state else 0
        with self._pinned_state(u, ("master", "exp_avg", "exp_avg_sq")) as got:
            yield got["master"], got.get("exp_avg"), got.get("exp_avg_sq"), step

    def state_dict(self) -> dict:
        """Everything needed to continue training bit for bit: fp32 masters, AdamW ``exp_avg``/``exp_avg_sq`` and
        step count per unit, frozen streamed parameters, resident parameters and their optimizer, learning rate,
        and a fingerprint of the layout. Tensors and plain Python types only (``torch.load(weights_only=True)``).
        Waits for pending host steps; call it between optimizer steps (not inside gradient accumulation)."""
        if self._micro != 0:
            raise TierError("engine.state_dict() inside gradient accumulation: call it after the micro-batch that "
                            "closes an optimizer step")
        self.synchronize()
        units = []
        for u in self.units:
            entry: dict[str, Any] = {"step": 0, "master": None, "exp_avg": None, "exp_avg_sq": None}
            if u.n_train:
                with self._unit_state(u) as (master, m, v, step):
                    entry.update(step=step, master=master.clone(), exp_avg=None if m is None else m.clone(),
                                 exp_avg_sq=None if v is None else v.clone())
            entry["frozen"] = [u.view(u.work_host.tensor, j).clone() for j in range(u.n_train, len(u.params))]
            units.append(entry)
        return {
            "format": "vbhal-offload-1",
            "fingerprint": self._fingerprint(),
            "lr": self._lr,
            "step_count": self.step_count,
            "units": units,
            "resident": [p.detach().to("cpu").clone() for p in self.resident],
            "resident_optimizer": None if self.resident_opt is None else self.resident_opt.state_dict(),
        }

    def load_state_dict(self, sd: dict) -> None:
        """Restore what :meth:`state_dict` saved into this engine (same model layout; any host_step variant).

        Raises :class:`TierError` naming the first difference when the layout differs."""
        if not isinstance(sd, dict) or sd.get("format") != "vbhal-offload-1":
            raise TierError("load_state_dict needs a dict made by OffloadEngine.state_dict() (format 'vbhal-offload-1')")
        diff = _layout_difference(sd["fingerprint"], self._fingerprint())
        if diff is not None:
            raise TierError(f"the saved offload state is for a different model layout: {diff}")
        self.synchronize()
        for u, entry in zip(self.units, sd["units"]):
            for j, t in zip(range(u.n_train, len(u.params)), entry["frozen"]):
                u.view(u.work_host.tensor, j).copy_(t)
            if not u.n_train:
                continue
            if self.state_stack is None:
                u.master.copy_(entry["master"])
            else:
                self.state_stack.update((u.idx, "master"), entry["master"])  # wherever it lives now
            master = entry["master"]
            m, v, step = entry["exp_avg"], entry["exp_avg_sq"], int(entry["step"])
            if self.state_stack is None:
                u.opt.state.pop(u.master, None)
                if m is not None:
                    u.opt.state[u.master] = {"step": torch.tensor(float(step), dtype=torch.float32),
                                             "exp_avg": m.clone(), "exp_avg_sq": v.clone()}
            else:
                st = self.state_stack
                u.opt.state.pop(u.master, None)
                if m is not None:
                    for k, t in (("exp_avg", m), ("exp_avg_sq", v)):
                        if (u.idx, k) in st:
                            st.update((u.idx, k), t)
                        else:
                            st.register((u.idx, k), t.clone())
                    u.opt.state[u.master] = {"step": torch.tensor(float(step), dtype=torch.float32)}
            for j in range(u.n_train):  # the working copy is the master rounded to its dtype
                o, n = u.m_offsets[j], math.prod(u.shapes[j])
                u.view(u.work_host.tensor, j).copy_(master[o : o + n].view(u.shapes[j]))
            if u.state_blk is not None and u.opt.state.get(u.master):  # device-stepped: state back into its pinned block
                self._ensure_dev_state(u)
            if u.dev_buf is not None and u.keep == "all":  # the resident working copy follows the restored one
                u.dev_buf.copy_(u.work_host.tensor)
                u.host_stale = False
        with torch.no_grad():
            for p, t in zip(self.resident, sd["resident"]):
                p.copy_(t)
        if self.resident_opt is not None and sd["resident_optimizer"] is not None:
            self.resident_opt.load_state_dict(sd["resident_optimizer"])
        self.step_count = int(sd["step_count"])
        # Stats rows count this engine's steps, optimizer steps continue from the saved count: the row of step s is
        # s - _row_base. A decision still to come (auto share, keep plan) is made from the steps after the resume.
        self._row_base = self.step_count - len(self.stats.steps)
        if self._gpu_units is None:
            self._auto_tag = self.step_count + 1
            self._host_meas = []
        if not self._keep_planned:
            self._keep_tag = self._auto_tag if self._gpu_units is None else self.step_count
        self.set_lr(sd["lr"])

    def _free_acts(self, call: _Call) -> None:
        if call.act_event is not None and self._accel:
            call.act_event.synchronize()
        for blk in call.act_host:
            if blk is not None:
                self.act_pool.free(blk)
        call.act_host = []

    def _learn(self) -> None:
        self._order = list(self._trace)
        if self.cfg.prefetch_depth is not None:
            self.depth = self.cfg.prefetch_depth
            return
        depth = 2
        if self._accel and self._learn_events and self.h2d_bandwidth:
            self._dm.synchronize(self.device)
            times, by_phase = [], {}
            for evs in self._learn_events.values():
                starts = {ph: e for ph, w, e in evs if w == "start"}
                for ph, w, e in evs:
                    if w == "end" and ph in starts:
                        times.append(starts[ph].elapsed_time(e) / 1e3)
                        by_phase.setdefault(ph, []).append(times[-1])
            t_compute = min(times) if times else 0.0
            if times:  # device compute per step for the auto device-step choice when no later step was measured:
                # median x count per phase kind (a backward phase, with its recompute, takes ~3 forward phases: one
                # median over both kinds would land on the boundary and overstate the total ~1.5x)
                self._t_compute_est = sum(sorted(v)[len(v) // 2] * len(v) for v in by_phase.values())
            t_copy = self.max_unit_bytes / self.h2d_bandwidth
            depth = math.ceil(t_copy / max(t_compute, 1e-6)) + 1
        budget = self.cfg.device_budget_bytes
        if budget is not None:
            depth = min(depth, max(1, budget // self.max_unit_bytes - 1))
        self.depth = max(1, min(MAX_PREFETCH_DEPTH, depth))
        self._learn_events = {}

    def synchronize(self) -> None:
        """Wait for every queued host step (call before reading master weights or saving)."""
        for u in self.units:
            if u.pending is not None:
                u.pending.result()
                u.pending = None
        self._check_worker()
        if self._accel:
            self._dm.synchronize(self.device)
            self._resolve_timing(block=True)

    def master_state_dict(self) -> dict[str, torch.Tensor]:
        """fp32 master weights by qualified parameter name (host tensors; waits for pending steps)."""
        self.synchronize()
        out: dict[str, torch.Tensor] = {}
        for u in self.units:
            prefix = f"{u.name}." if u.name else ""
            if u.n_train:  # the master only: no AdamW state read from disk for it
                with self._pinned_state(u, ("master",)) as got:
                    master = got["master"]
                    for j in range(u.n_train):
                        off, n = u.m_offsets[j], math.prod(u.shapes[j])
                        out[prefix + u.params[j][0]] = master[off : off + n].view(u.shapes[j]).clone()
            for j in range(u.n_train, len(u.params)):  # frozen: only the working copy exists
                out[prefix + u.params[j][0]] = u.view(u.work_host.tensor, j).to(torch.float32).clone()
        names = {id(p): n for n, p in self.model.named_parameters()}
        for p in self.resident:
            out[names.get(id(p), f"resident{id(p)}")] = p.detach().to("cpu", torch.float32).clone()
        return out

    def memory_summary(self) -> dict[str, Any]:
        return {
            "units": len(self.units),
            "streamed_params": sum(u.train_numel for u in self.units),
            "max_unit_bytes": self.max_unit_bytes,
            "prefetch_depth": self.depth,
            "peak_resident_weight_bytes": self.peak_resident_bytes,
            "host_pool": self.pool.describe(),
            "activation_pool": self.act_pool.describe(),
            "pinned_bytes": self.pool.pinned_bytes + self.act_pool.pinned_bytes,
            "master_bytes": sum(u.train_numel * 4 for u in self.units),
            "state_stack": None if self.state_stack is None else {
                t.name: t.used_bytes for t in self.state_stack.tiers},
            "h2d_bandwidth": self.h2d_bandwidth,
            "mispredictions": self.mispredictions,
            "host_step": self.host_step_note,
            "host_step_chunk": HOST_STEP_CHUNK,
            "host_step_cpus": None if self.host_cpus is None else len(self.host_cpus),
            "compile_wait_s": self.compile_wait_s,
            "deferred_steps": self._defer,
            "gpu_step": {
                "fraction": getattr(self, "gpu_step_fraction", 0.0) if self._gpu_units is not None else None,
                "units": sorted(self._gpu_units) if self._gpu_units is not None else None,
                "note": self.gpu_step_note,
                "auto": self.gpu_step_auto,
                "piece": self._piece if self._ring is not None else None,
                "ring_slots": len(self._ring) if self._ring is not None else 0,
                "ring_bytes": sum(r["p"].numel() * 16 + r["w"].numel() for r in self._ring) if self._ring else 0,
                "pinned_state_bytes": self.state_pool.pinned_bytes,
                "d2h_bandwidth": self.d2h_bandwidth,
            },
            "keep_plan": self.keep_plan,
            "last_step": self.step_breakdown(),
        }

    def step_breakdown(self, steps: int = 1) -> dict[str, float] | None:
        """Where the time of the last `steps` steps went (means): step s, host AdamW busy s, device AdamW s
        (device span of the device steps, waits for their state uploads included), stall s (the device waiting
        for the host), host->device / device->host GB/s (all traffic: weights, activations, gradients, state), and
        the host AdamW's seconds per 1e9 host-stepped parameters (the figure to watch when the host bounds the step;
        session 9's H100: 0.29-0.37 with the compiled step on 15 threads, 1.33-1.38 while it ran on one core)."""
        rows = self.stats.steps[-steps:]
        if not rows:
            return None
        mean = lambda k: sum(r.get(k, 0.0) for r in rows) / len(rows)
        t = max(mean("step_s"), 1e-9)
        out = {"step_s": mean("step_s"), "host_step_s": mean("l1_busy"), "gpu_step_s": mean("gpu_step_s"),
               "stall_s": mean("l1_stall"), "h2d_GBps": mean("l0_in") / t / 1e9, "d2h_GBps": mean("l0_out") / t / 1e9,
               "h2d_GB": mean("l0_in") / 1e9, "d2h_GB": mean("l0_out") / 1e9, "gpu_step_units": mean("gpu_step_units"),
               "gpu_step_fraction": getattr(self, "gpu_step_fraction", 0.0) if self._gpu_units else 0.0}
        n_host = sum(u.train_numel for u in self.units if u.n_train and not u.gpu_step)
        out["host_s_per_Bparams"] = out["host_step_s"] / n_host * 1e9 if n_host else None
        # Device time split (resolved a step late, or at synchronize()), traffic by kind, allocator events.
        for k in ("dev_compute_s", "dev_fwd_s", "dev_bwd_s", "dev_wait_w_s", "dev_wait_act_s", "dev_idle_s", "dev_span_s",
                  "alloc_retries", "device_mallocs", "kept_bytes"):
            have = [r[k] for r in rows if k in r]
            if have:
                out[k] = sum(have) / len(have)
        for kind in _BYTE_KINDS:
            out[f"{kind}_GB"] = mean(f"bytes_{kind}") / 1e9
        return out

    def close(self) -> None:
        self.synchronize()
        self._worker.shutdown()
        if self.host_cpus is not None:  # the process-wide count the host step's thread lowered (reserve_cores)
            torch.set_num_threads(self._threads_at_start)
        if self.state_stack is not None:
            self.state_stack.close()


def _layout_difference(saved: dict, mine: dict) -> str | None:
    """The first difference between two layout fingerprints (see OffloadEngine._fingerprint), in words."""
    def flat(fp: dict) -> list[tuple[str, Any]]:
        out = [(f"unit '{u}' parameter '{pn}'", (list(sh), bool(tr))) for u, ps in fp["units"] for pn, sh, tr in ps]
        return out + [(f"resident parameter '{n}'", (list(sh), bool(tr))) for n, sh, tr in fp["resident"]]

    a, b = flat(saved), flat(mine)
    names_a, names_b = [n for n, _ in a], [n for n, _ in b]
    missing = [n for n in names_a if n not in set(names_b)]
    extra = [n for n in names_b if n not in set(names_a)]
    if missing or extra:
        return (f"{missing[:3]} only in the saved state" if missing else "") + ("; " if missing and extra else "") + \
               (f"{extra[:3]} only in this model" if extra else "")
    for (n, (sh_a, tr_a)), (_, (sh_b, tr_b)) in zip(a, b):
        if sh_a != sh_b:
            return f"{n} has shape {sh_a} in the saved state but {sh_b} in this model"
        if tr_a != tr_b:
            return f"{n} is {'trainable' if tr_a else 'frozen'} in the saved state but not in this model"
    if names_a != names_b:
        return "the same parameters are grouped into units in a different order"
    return None


def _disk_capacity(root: str | None) -> int:
    try:
        from pathlib import Path

        from vbhal._sysinfo import disk_free

        return int(disk_free(Path(root) if root else None) * 0.9)
    except ImportError:
        return 1 << 40


def apply_offload(
    model: nn.Module,
    *,
    stack: Any = None,
    config: Any = None,
    report: Any = None,
    device: str | torch.device | None = None,
    **options: Any,
) -> OffloadEngine:
    """Stream `model`'s weights through `device` and train them with AdamW on the host; returns the engine.

    `config` is an :class:`OffloadConfig` (or any object with its field names as attributes, such as
    vbhal's ``OptimizeConfig``); keyword `options` override single fields (``lr=``, ``work_dtype=`` ...).
    `stack` (a TierStack) is accepted for the optimize pipeline: its device decides the compute device.
    The engine is also stored as ``model.vbhal_offload``.
    """
    base = OffloadConfig()
    if isinstance(config, OffloadConfig):
        base = config
    elif config is not None:
        for f in OffloadConfig.__dataclass_fields__:
            v = getattr(config, f, None) if not isinstance(config, dict) else config.get(f)
            if v is not None:
                setattr(base, f, v)
    import dataclasses

    cfg = dataclasses.replace(base)
    for k, v in options.items():
        if k not in OffloadConfig.__dataclass_fields__:
            raise TypeError(f"apply_offload got an unknown option {k!r}; valid: {sorted(OffloadConfig.__dataclass_fields__)}")
        setattr(cfg, k, v)
    mp = getattr(config, "mixed_precision", None)
    if cfg.work_dtype is None and mp in ("none", "fp16"):  # vbhal's OptimizeConfig: follow its precision
        cfg.work_dtype = torch.float16 if mp == "fp16" else torch.float32
    if device is not None:
        cfg.device = device
    elif stack is not None and getattr(stack, "device", None) is not None:
        cfg.device = stack.device
    if stack is not None and cfg.state_budget_bytes is None:
        _budget_from_stack(model, stack, cfg, report)
    engine = OffloadEngine(model, cfg, report)
    model.vbhal_offload = engine  # type: ignore[attr-defined]
    model._vbhal_tier_stack = engine  # what vbhal.print_stats() shows  # type: ignore[attr-defined]
    return engine


#: Host bytes per streamed parameter besides masters and AdamW state: pinned working copy + gradient (bf16).
_PINNED_BYTES_PER_PARAM = 4
#: fp32 master + AdamW exp_avg + exp_avg_sq.
_STATE_BYTES_PER_PARAM = 12


def _budget_from_stack(model: nn.Module, stack: Any, cfg: OffloadConfig, report: Any) -> None:
    """When the host tier of `stack` cannot hold every master and AdamW state, put the excess on its disk tier."""
    host = next((t for t in getattr(stack, "tiers", []) if t.kind == "host"), None)
    disk = next((t for t in getattr(stack, "tiers", []) if t.kind == "disk"), None)
    if host is None:
        return
    n = sum(p.numel() for p in model.parameters())
    need = n * (_STATE_BYTES_PER_PARAM + _PINNED_BYTES_PER_PARAM)
    if need <= host.capacity_bytes:
        return
    if disk is None:
        raise TierError(
            f"offloaded training of {n} parameters needs about {need} bytes of host memory but the host tier has "
            f"{host.capacity_bytes} and there is no disk tier: use a smaller model or add a disk tier"
        )
    cfg.state_budget_bytes = max(0, host.capacity_bytes - n * _PINNED_BYTES_PER_PARAM)
    if getattr(stack, "spill", None) is not None and cfg.spill_root is None:
        cfg.spill_root = str(stack.spill.base.parent)
    if report is not None:
        report.add("offload", "", f"masters + AdamW state need {need} bytes > host tier {host.capacity_bytes}: "
                   f"{cfg.state_budget_bytes} bytes in RAM, the rest on disk ({disk.name})")
