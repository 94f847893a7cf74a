"""Fused FP4 dequantize-matmul for the CUDA backend: ``y = x @ dequant(W)^T + bias``.

Kernels in ``fp4_kernels.py``. Paths (``PATHS``); which one runs is measured, not guessed: the first
call for an (M bucket, N, K, format, dtype, bias, device) times every candidate path for that M
(CUDA-graph replays, so Python launch overhead does not decide) and caches a *plan* -- the path and
each kernel's launch configuration, itself picked by timing the path's config list -- in ``_PLANS``
(the choices in ``PATH_CHOICES``). A path or config that fails to compile is skipped. The paths:

- ``gemv_pf``/``gemv_w32``/``gemv`` (M <= 4): one program column per activation row (int32 words
  with register double buffering / int32 words / bytes). ``gemv_mr`` (timed at M = 1 only; forced
  paths take any M): split-K GEMV, BLOCK_M activation rows per program.
- Split-K (any kernel with SPLIT_K > 1): the splits add float32 parts into a workspace that is zero at
  rest, then torch ops stream-ordered after them add the bias, write y and zero the workspace
  (``_workspace``, ``_finalize``). R5: the one-launch "last split finalizes" variant raced on the H100
  (wrong results); session 3: a Triton finalize kernel went wrong at M >= ~512 (see ``_finalize``).
- ``mm_t`` (bf16/fp16, any M): the "swap-AB" tensor-core kernel, y^T = W x^T with the decoded weight
  tile as the MMA's first operand (wgmma on Hopper) so the weight rows fill its 64-row side and the
  batch only the narrow one; split-K for small M so a few row tiles still fill every SM; large tiles
  (each weight element decoded once per 128-256 activation rows) for large M. ``mm_w32``: the x @ W^T
  form (triton 3.6 cannot compile it with BLOCK_M >= 64). Both decode through float32 and serve float16.
- ``mm_pt`` / ``mm_p`` (bfloat16): the same two forms with the packed decode -- each code pair becomes a
  bfloat16 pair by shifts and masks and is scaled by two exact bfloat16 multiplies, with no conversion
  instruction (5.8 instead of 8.0-8.4 instructions per weight element in the K loop, sm_90 SASS) -- and
  a K loop without row masks (clamped loads) or, when the splits are whole steps, K masks. They take
  mm_t / mm_w32's place among the bfloat16 candidates.
- ``dequant`` (Triton dequantize to x's dtype + cuBLAS) and ``dequant_pipelined`` (the dequantize of
  weight chunk i+1 on a side stream under the cuBLAS GEMM of chunk i), for large M.
- float32 activations: the GEMV kernels or ``dequant`` (tl.dot on fp32 would be TF32).

``VBHAL_FP4_LINEAR_PATH`` (read when a plan is made) forces a path.

Host time per call (eager): the entry points validate, then ``_apply`` runs the plan directly -- an
``autograd.Function`` when a gradient is needed, a plain call otherwise -- and only a traced call
(``torch.compile``, a dispatch mode) goes through the custom op ``vbhal::fp4_linear_cuda`` (which a
Python custom op makes cost tens of microseconds). A launcher keeps, per M, the split, grid and
constexprs, and after the first launch calls Triton's compiled kernel directly (``_DirectLauncher``, with
its measured saving). The op has a fake (meta) implementation and autograd w.r.t. x and bias:
grad_x = grad_y @ dequant(W) (Triton dequantize + cuBLAS); the FP4 weight is frozen. ``KERNELS`` is what
the CUDA plugin binds: quantize_fp4, dequantize_fp4, fp4_linear (which carries
``fp4_linear.from_operands`` for FP4Linear's buffers).

Native FP4 (compute capability 10.x, Blackwell): ``native_fp4_linear`` hands the same code and scale
bytes to ``torch._scaled_mm`` with ``float4_e2m1fn_x2`` operands. That is W4A4 (the activations are
quantized too), so it is opt-in (``VBHAL_FP4_NATIVE=1``) and **has never run** (no Blackwell GPU was
available to us); the Triton path is the default on every GPU.

triton is imported on first use, never at module import.
"""

from __future__ import annotations

import importlib.util
import os

import torch

from vbhal.errors import KernelError
from vbhal.formats import BLOCK_SIZES, FORMATS, QuantizedWeight

from . import fp4_quantize as _q
from .fp4_quantize import dequantize_fp4, is_interpreter, kernels_module, quantize_fp4, qw_operands, triton_cdiv

if importlib.util.find_spec("triton") is None:  # the KernelTable reports this and falls back to CPU kernels
    raise ImportError("the CUDA FP4 kernels need triton (pip install triton); the CPU reference kernels serve instead")

__all__ = ["KERNELS", "PATHS", "fp4_linear", "native_fp4_linear"]

#: Paths of the fused linear; "auto" picks by measurement (``_choose_path``). VBHAL_FP4_LINEAR_PATH overrides.
PATHS = ("auto", "gemv", "gemv_w32", "gemv_pf", "gemv_mr", "mm_w32", "mm_t", "mm_p", "mm_pt", "dequant",
         "dequant_pipelined")
_GEMV_PATHS = ("gemv", "gemv_w32", "gemv_pf", "gemv_mr")
_MM_PATHS = ("mm_w32", "mm_t", "mm_p", "mm_pt")
#: the packed-decode kernels (bfloat16 arithmetic on the GPU); their launches add EVEN_K and PACKED
_PACKED_PATHS = ("mm_p", "mm_pt")
_ACT_DTYPES = (torch.bfloat16, torch.float16, torch.float32)

#: Largest M for the one-row-per-program GEMVs / the multi-row GEMV / the split-K tensor-core tiles.
GEMV_MAX_M = 4
GEMV_MR_MAX_M = 16
MM_T_SMALL_M = 64
#: Rows of activations one gemv_mr program handles at most (more rows: more program rows).
GEMV_MR_BLOCK_M = 16


def _m_bucket(m: int) -> int:
    """M rounded up to a power of two (the plans' and autotuning key)."""
    return 1 << max(0, (m - 1).bit_length())


def _candidates(m: int, dtype: torch.dtype) -> tuple[str, ...]:
    """Paths worth timing for M activation rows (the rest lose by construction: see the module doc).

    gemv_mr only at M = 1: at M = 8..16 it measured 730-1370 us on the H100 (R5, K = N = 8192), 13-25x
    slower than cuBLAS, so it is never worth the time of timing it there."""
    if dtype == torch.float32:  # tl.dot on fp32 would be TF32: FMA GEMVs or cuBLAS
        if m == 1:
            return ("gemv_pf", "gemv_w32", "gemv_mr", "dequant")
        if m <= GEMV_MAX_M:
            return ("gemv_pf", "gemv_w32", "dequant")
        return ("dequant",)
    # bfloat16: the packed-decode kernels replace mm_t / mm_w32 (session 6, H100, K = N = 8192, graph us,
    # best packed config vs the shipped plan in one run: M = 16 37.9 vs 40.7, M = 64 50.7 vs 56.2, M = 256
    # 112.8 vs 117.5; at M >= 1024 dequantize + cuBLAS still wins); float16 keeps the float32-decode kernels
    t, w = ("mm_pt", "mm_p") if dtype == torch.bfloat16 else ("mm_t", "mm_w32")
    if m == 1:
        return ("gemv_pf", "gemv_w32", "gemv_mr", t)
    if m <= GEMV_MAX_M:
        return ("gemv_pf", "gemv_w32", t, w)
    if m <= MM_T_SMALL_M:
        return (t, w)
    return (t, "dequant", "dequant_pipelined")


def _static_path(m: int, dtype: torch.dtype) -> str:
    """The path when none can be measured (CPU interpreter, CUDA-graph capture): by shape only (the
    R5 H100 winners: gemv_pf at M = 1, mm_t -- for bfloat16 now mm_pt -- at M = 16..256, dequant + cuBLAS at
    large M)."""
    if m <= GEMV_MAX_M and (m == 1 or dtype == torch.float32):
        return "gemv_pf"
    if dtype == torch.float32 or m > 512:
        return "dequant"
    return "mm_pt" if dtype == torch.bfloat16 else "mm_t"


# ---------------------------------------------------------------------------------------------------
# timing (GPU)
# ---------------------------------------------------------------------------------------------------
_FLUSH_BYTES_MIN = 64 << 20


def _flush_buffer(device: torch.device) -> torch.Tensor:
    """A buffer twice the GPU's L2 (at least 64 MiB) whose memset evicts everything from L2. Taken from
    the caching allocator for a timing and released by the caller (dropped with the last reference)."""
    idx = device.index if device.index is not None else torch.cuda.current_device()
    l2 = getattr(torch.cuda.get_device_properties(idx), "L2_cache_size", 0) or (50 << 20)
    return torch.empty(max(2 * l2, _FLUSH_BYTES_MIN), dtype=torch.uint8, device=device)


def _gpu_time(fn, device: torch.device, reps: int = 8) -> float:
    """GPU time (ms) of one ``fn()`` with its operands coming from HBM, as in a model whose other
    layers evict them from L2: run twice (compile), then ``reps`` calls captured in a CUDA graph, each
    after a memset that flushes L2, minus a graph of the memsets alone (median of 3 replays each).

    - CUDA graphs, so that Python launch overhead does not decide (R2: eager back-to-back timing
      picked the path with the least CPU work, not the fastest kernels);
    - L2 flushed (R4: a 35 MB weight stays in the H100's 50 MB L2 when the same call is replayed
      back to back, which made the plans pick configs fast from L2 and slow from HBM -- M=1 33 us vs
      the 29 us of the cold-L2 autotuner before).
    Eager timing (still flushed) where ``fn`` cannot be captured. Never call it during a capture."""
    for _ in range(2):
        fn()
    torch.cuda.synchronize(device)
    flush = _flush_buffer(device)
    events = [torch.cuda.Event(enable_timing=True) for _ in range(2)]

    def _elapsed(run) -> float:
        events[0].record()
        run()
        events[1].record()
        events[1].synchronize()
        return events[0].elapsed_time(events[1])

    try:
        side = torch.cuda.Stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):
            fn()  # warm on the capture stream
        torch.cuda.current_stream(device).wait_stream(side)
        g1, g0 = torch.cuda.CUDAGraph(), torch.cuda.CUDAGraph()
        with torch.cuda.graph(g1):
            for _ in range(reps):
                flush.zero_()
                fn()
        with torch.cuda.graph(g0):
            for _ in range(reps):
                flush.zero_()
        g1.replay()
        t1, t0 = [], []
        for _ in range(3):
            t1.append(_elapsed(g1.replay))
            t0.append(_elapsed(g0.replay))
        t1.sort()
        t0.sort()
        return max(t1[1] - t0[1], 1e-4 * reps) / reps
    except Exception:  # noqa: BLE001 - not capturable: timed eagerly instead (flushed too)
        torch.cuda.synchronize(device)

        def _eager(with_fn):
            for _ in range(reps):
                flush.zero_()
                if with_fn:
                    fn()

        t1, t0 = _elapsed(lambda: _eager(True)), _elapsed(lambda: _eager(False))
        return max(t1 - t0, 1e-4 * reps) / reps


def _short_error(e: BaseException) -> str:
    s = str(e).strip()
    return f"{type(e).__name__}: {s.splitlines()[-1][:200] if s else ''}"


# ---------------------------------------------------------------------------------------------------
# split-K workspace: float32 partial sums, zero at rest
# ---------------------------------------------------------------------------------------------------
_WORKSPACES: dict[tuple, torch.Tensor] = {}


def _raw_stream(device: torch.device) -> int:
    return torch._C._cuda_getCurrentRawStream(device.index if device.index is not None else
                                              torch.cuda.current_device())


def _workspace(m: int, n: int, device: torch.device) -> torch.Tensor:
    """A float32 buffer of >= m*n zeros for a split-K kernel's partial sums.

    The split kernels add into it; ``_finalize``, right after them on the same stream, reads it,
    writes y and zeroes it again, so one buffer per (device, stream) serves
    every call in stream order without a memset. Inside CUDA-graph capture each call gets its own
    (zeroed by a memset recorded in the graph), so graphs replayed on different streams never share one."""
    if device.type == "cuda":
        if torch.cuda.is_current_stream_capturing():
            return torch.zeros(m * n, dtype=torch.float32, device=device)
        key = (device.index, _raw_stream(device))
    else:
        key = (device.type, 0)
    cur = _WORKSPACES.get(key)
    if cur is None or cur.numel() < m * n:
        cur = _WORKSPACES[key] = torch.zeros(max(m * n, 2 * cur.numel() if cur is not None else 0),
                                             dtype=torch.float32, device=device)
    return cur


# ---------------------------------------------------------------------------------------------------
# direct launches: Triton's compiled kernel called without the JIT front end on repeat calls
# ---------------------------------------------------------------------------------------------------
#: VBHAL_FP4_DIRECT_LAUNCH=0 turns the direct launches off (every launch through ``kernel[grid](...)``)
_DIRECT = os.environ.get("VBHAL_FP4_DIRECT_LAUNCH", "1") != "0"


def _spec_key(args: tuple) -> tuple:
    """Everything Triton may specialize a compiled kernel on, for the runtime arguments ``args``: a
    tensor's dtype and 16-byte alignment; an integer's equality to 1, divisibility by 16 and width
    (a superset of what triton >= 3.3 specializes on, so one key never maps to two compiled kernels)."""
    return tuple([(a.dtype, a.data_ptr() & 15 == 0) if isinstance(a, torch.Tensor)
                  else (a == 1, a & 15 == 0, -2147483648 <= a < 2147483648) if type(a) is int else a
                  for a in args])


def _idle(hook) -> bool:
    """No launch hook installed: None (triton < 3.5) or an empty HookChain (3.5+, never None)."""
    return hook is None or (hasattr(hook, "calls") and not hook.calls)


class _DirectLauncher:
    """Launches one ``@triton.jit`` kernel with fixed constexprs. The first launch per specialization
    key goes through ``kernel[grid](...)`` (compiling if needed) and keeps the compiled kernel it
    returns, with the constexpr values in parameter order; later launches call that compiled kernel's
    ``run`` directly -- what ``JITFunction.run`` does after its binder, cache-key and launch-metadata
    work (triton >= 3.3 convention: every bound argument, constexprs included, in the kernel's
    parameter order). Session 3, H100 host: FP4Linear host time per call at M=1 52 -> 38 us (min of 7
    interleaved rounds). Off under the interpreter, with a launch hook set (profilers see every
    launch), when the first direct call raises (another triton), and with VBHAL_FP4_DIRECT_LAUNCH=0."""

    __slots__ = ("compiled", "direct", "kernel", "runtime")

    def __init__(self, kernel):
        import triton

        self.kernel = kernel
        self.compiled: dict = {}  # (specialization, constexprs) -> (compiled kernel, constexpr values)
        self.direct = not is_interpreter()
        self.runtime = getattr(getattr(triton, "knobs", None), "runtime", None)  # launch hooks live here

    def __call__(self, grid: tuple, args: tuple, consts: dict, stream: int | None) -> None:
        rt = self.runtime
        if (not (self.direct and _DIRECT and stream is not None)
                or (rt is not None and not (_idle(rt.launch_enter_hook) and _idle(rt.launch_exit_hook)))):
            self.kernel[grid](*args, **consts)
            return
        key = (_spec_key(args), tuple(consts.items()))
        hit = self.compiled.get(key)
        if hit is not None:
            ck, tail = hit
            try:
                ck.run(grid[0], grid[1] if len(grid) > 1 else 1, grid[2] if len(grid) > 2 else 1, stream,
                       ck.function, ck.packed_metadata, None, None, None, *args, *tail)
                return
            except TypeError:  # another launcher convention: use the JIT front end from now on
                self.direct = False
        ck = self.kernel[grid](*args, **consts)
        names = self.kernel.arg_names[len(args):]
        if ck is not None and all(n in consts for n in names):
            self.compiled[key] = (ck, tuple(consts[n] for n in names))


def _finalize(ws: torch.Tensor, bias: torch.Tensor | None, y: torch.Tensor) -> None:
    """Second step of split-K: y = ws (+ bias, added in float32) in y's dtype, then ws zeroed, as torch
    ops on the current stream -- after the split kernel, so every split's part is in. Session 3, H100: a
    Triton kernel doing the same (load ws, store y, store zeros to ws; flat or per-row grid, with or
    without the direct launch) gave wrong rows from M ~ 512 (rel. error 1-6e-2, different each run)
    while the workspace was verified right just before it ran, and these ops were right every time
    (gpu/splitk_diag2.py). Two ops (session 6: the four before -- bias cast, add, copy, zero -- took 44-60 us
    of host time per call on the H100 machine's host, gpu/eager_m.py, more than the M = 16 kernel's 44 us)."""
    m, n = y.shape
    part = ws[: m * n].view(m, n)
    try:
        if bias is None:
            y.copy_(part)
        else:  # float32 + bias in float32 (type promotion), rounded once into y: one kernel, not three
            torch.add(part, bias.detach(), out=y)  # detach: an out= op refuses a bias that requires grad
    finally:
        part.zero_()  # whatever happened, the shared workspace is zero for the next split-K call


# ---------------------------------------------------------------------------------------------------
# kernel launchers: configuration picked once, then launched directly
# ---------------------------------------------------------------------------------------------------
def _tile_configs(cands, m: int, nv: int, nblocks: int, fallback: bool = True) -> list[dict]:
    """Tensor-core launch configs from (BLOCK_M, BLOCK_N, NBK, SPLIT_K[, warps, stages]) tuples (4 warps, 4 stages
    unless given): BLOCK_M at most M's bucket (16 at least) and at least two NBK steps per split; when none is
    left, one small tile (``fallback``) or none."""
    bmax = max(16, _m_bucket(m))
    out = [{"BLOCK_M": c[0], "BLOCK_N": c[1], "NBK": c[2] * nv, "GROUP_M": 8, "SPLIT_K": c[3],
            "num_warps": c[4] if len(c) > 4 else 4, "num_stages": c[5] if len(c) > 5 else 4}
           for c in cands if c[0] <= bmax and nblocks // (c[3] * c[2] * nv) >= 2]
    if out or not fallback:
        return out
    return [{"BLOCK_M": 16, "BLOCK_N": 64, "NBK": 2 * nv, "GROUP_M": 8, "SPLIT_K": 1, "num_warps": 4, "num_stages": 3}]


def _configs(kind: str, m: int, fmt: str, nblocks: int) -> list[dict]:
    """Launch configurations worth timing for a kernel at M rows (``num_warps``/``num_stages`` included).

    NBK counts blocks: nvfp4's are half as long, so its NBK doubles to keep the same bytes per step.
    """
    nv = 2 if fmt == "nvfp4" else 1
    if kind in ("gemv", "gemv_w32", "gemv_pf"):
        # Bytes in flight ~ N * NBK * 16 per sweep: NBK large enough to cover HBM latency; BLOCK_N large
        # enough that each thread reuses its x values across rows. SPLIT_K from _gemv_split unless given.
        # Session 3's M=1 sweep (K=N=8192, 66 configs x 4 kernels, H100): gemv_pf (16, 32, 4 warps) 24.8 us,
        # (16, 16, 2 warps, split 2) 25.8, (16, 32, 2) 26.4, (8, 16, 2) 26.7; the old first choice 27.1.
        tried = [(16, 32, 4, None), (16, 16, 2, 2), (16, 32, 2, None), (8, 16, 2, None), (8, 32, 2, None),
                 (16, 16, 4, None), (16, 8, 4, None), (32, 8, 4, None), (64, 8, 8, None)]
        out = []
        for bn, nbk, warps, split in tried:
            cfg = {"BLOCK_N": bn, "NBK": nbk * nv, "num_warps": warps, "num_stages": 3}
            if split is not None:
                cfg["SPLIT_K"] = split
            out.append(cfg)
        return out
    if kind == "gemv_mr":
        # many programs in flight, a few K steps each: (BLOCK_N, NBK, SPLIT_K, warps)
        bm = min(_m_bucket(m), GEMV_MR_BLOCK_M)
        shapes = [(32, 4, 16, 4), (16, 8, 16, 4), (64, 4, 8, 4), (32, 8, 8, 4), (64, 8, 4, 8), (16, 4, 32, 2)]
        if bm >= 8:  # registers grow with BLOCK_M: narrower weight tiles
            shapes = [(16, 4, 16, 4), (32, 2, 16, 4), (16, 2, 32, 2), (32, 4, 8, 4), (64, 2, 8, 4)]
        out = []
        for bn, nbk, split, warps in shapes:
            nbk *= nv
            while split > 1 and nblocks < split * nbk:  # every split gets at least one step
                split //= 2
            cfg = {"BLOCK_N": bn, "NBK": nbk, "BLOCK_M": bm, "SPLIT_K": split, "num_warps": warps, "num_stages": 2}
            if cfg not in out:
                out.append(cfg)
        return out
    if kind == "mm_w32":
        # (BLOCK_M, BLOCK_N, NBK, SPLIT_K): BLOCK_M < 64 only (triton 3.6); split-K (R5) because
        # N / BLOCK_N row tiles alone (128 at N = 8192) do not fill 132 SMs at M <= 32
        cands = [(16, 64, 4, 1), (16, 128, 2, 1), (32, 64, 4, 1), (16, 64, 4, 4), (32, 64, 4, 2), (32, 128, 2, 4)]
        return _tile_configs(cands, m, nv, nblocks, fallback=False)
    if kind == "mm_p":
        # x @ W^T, BLOCK_M < 64 (triton 3.6); session 6 sweep at K = N = 8192 (graph us): (16, 128, 4, 2) 37.9 at
        # M = 16, (16, 128, 2, 8) 37.5 at M = 1; (BLOCK_M, BLOCK_N, NBK, SPLIT_K)
        cands = [(16, 128, 4, 2), (16, 128, 2, 8), (16, 128, 4, 4), (16, 64, 8, 2), (16, 64, 4, 4), (32, 128, 4, 2),
                 (32, 128, 2, 4), (16, 128, 4, 1)]
        return _tile_configs(cands, m, nv, nblocks)
    if kind == "mm_pt":
        # swap-AB; session 6 sweep at K = N = 8192: (64, 128, 4, 4) 50.7 us at M = 64, (128, 128, 2, 1, 8 warps)
        # 112.8 at M = 256, (256, 128, 2, 1, 8 warps) 255 at M = 1024;
        # (BLOCK_M, BLOCK_N, NBK, SPLIT_K, warps, stages)
        if m <= MM_T_SMALL_M:
            cands = [(64, 128, 4, 4, 4, 4), (64, 128, 2, 4, 4, 4), (64, 64, 4, 2, 4, 4), (32, 128, 4, 4, 4, 4),
                     (16, 128, 4, 4, 4, 4), (16, 64, 4, 4, 4, 4), (64, 128, 4, 8, 4, 4), (32, 64, 4, 4, 4, 4)]
        else:
            cands = [(128, 128, 2, 1, 8, 3), (256, 128, 2, 1, 8, 3), (128, 128, 4, 1, 8, 3), (64, 128, 4, 1, 4, 4)]
        return _tile_configs(cands, m, nv, nblocks)
    if kind == "mm_t":
        if m <= MM_T_SMALL_M:
            # split K so that the few row tiles of a small batch fill every SM; BLOCK_M <= M's bucket
            cands = [(16, 64, 4, 4, 4, 4), (16, 64, 4, 8, 4, 4), (16, 128, 2, 4, 4, 4), (16, 128, 4, 8, 4, 3),
                     (16, 128, 2, 16, 4, 4), (32, 128, 2, 4, 4, 4), (64, 128, 2, 2, 4, 3), (64, 128, 2, 4, 4, 3),
                     # R5, for M = 64: two warpgroups decoding (8 warps), and 64-row weight tiles (more programs)
                     (64, 128, 2, 4, 8, 3), (64, 64, 4, 4, 4, 3), (64, 64, 2, 8, 4, 4), (32, 64, 4, 4, 4, 4)]
            return _tile_configs(cands, m, nv, nblocks)
        # large M: Hopper-sized tiles, grouped order (BLOCK_N = weight rows, BLOCK_M = activation rows)
        cands = [(128, 128, 2, 8, 3), (256, 128, 2, 8, 3), (128, 256, 2, 8, 3), (128, 256, 2, 8, 4),
                 (256, 128, 4, 8, 3), (128, 128, 4, 8, 4)]
        return [{"BLOCK_M": bm, "BLOCK_N": bn, "NBK": nbk * nv, "GROUP_M": 8, "SPLIT_K": 1, "num_warps": w, "num_stages": st}
                for bm, bn, nbk, w, st in cands if bm <= max(16, _m_bucket(m))]
    raise KeyError(kind)


#: the interpreter (CPU) runs one small configuration per kernel
_INTERP_CONFIGS = {
    "gemv": {"BLOCK_N": 4, "NBK": 2}, "gemv_w32": {"BLOCK_N": 4, "NBK": 2}, "gemv_pf": {"BLOCK_N": 4, "NBK": 2},
    "gemv_mr": {"BLOCK_N": 8, "NBK": 2, "BLOCK_M": 4, "SPLIT_K": 2},
    "mm_w32": {"BLOCK_M": 16, "BLOCK_N": 16, "NBK": 2, "GROUP_M": 2, "SPLIT_K": 1},
    "mm_t": {"BLOCK_M": 16, "BLOCK_N": 16, "NBK": 2, "GROUP_M": 2, "SPLIT_K": 2},
    "mm_p": {"BLOCK_M": 16, "BLOCK_N": 16, "NBK": 2, "GROUP_M": 2, "SPLIT_K": 2},
    "mm_pt": {"BLOCK_M": 16, "BLOCK_N": 16, "NBK": 2, "GROUP_M": 2, "SPLIT_K": 1},
}


def _gemv_split(m: int, n: int, nblocks: int, sms: int) -> int:
    """Split K only when the row tiles (at BLOCK_N = 16, the largest tried) cannot fill the GPU twice."""
    split = 1
    while triton_cdiv(n, 16) * m * split < 2 * sms and nblocks // (split * 2) >= 64:
        split *= 2
    return split


_SM_COUNT: dict[int, int] = {}


def _sm_count(device: torch.device) -> int:
    if device.type != "cuda":
        return 4
    idx = device.index if device.index is not None else torch.cuda.current_device()
    if idx not in _SM_COUNT:
        _SM_COUNT[idx] = torch.cuda.get_device_properties(idx).multi_processor_count
    return _SM_COUNT[idx]


class _KernelLaunch:
    """One Triton linear kernel (``kind``) for fixed N, K, format, dtype and bias, with a fixed launch
    configuration: ``config`` if given, else the fastest of ``_configs`` (timed at the first call with
    that call's tensors; a config that fails to compile is skipped). A call allocates y (and takes the
    split-K workspace), computes the grid from M and launches: no autotuner, no dictionary of options
    rebuilt per call."""

    __slots__ = ("cfg", "consts", "fmt", "k", "kernel", "kind", "launch", "launch_kw", "mm", "n", "per_m",
                 "split_override", "words")

    def __init__(self, kind: str, n: int, k: int, fmt: str, has_bias: bool, config: dict | None = None,
                 split: int | None = None):
        self.kind, self.n, self.k, self.fmt = kind, n, k, fmt
        self.words = kind != "gemv"  # int32 view of the codes: 8 codes per word
        self.mm = kind.startswith("mm")
        self.kernel = getattr(kernels_module(), f"fp4_{kind}_kernel")
        self.launch = _DirectLauncher(self.kernel)
        self.per_m: dict = {}  # (M, blocks, device, dtype) -> (split, grid, constexprs): what a call at that M launches
        self.consts = {"IS_NV": fmt == "nvfp4", "HAS_BIAS": has_bias, "BLOCK": BLOCK_SIZES[fmt]}
        self.split_override = split
        self.cfg = None
        if config is not None:
            self._fix(dict(config))

    def _fix(self, cfg: dict) -> None:
        cfg = dict(cfg)
        warps, stages = cfg.pop("num_warps", 4), cfg.pop("num_stages", 3)
        if self.kind in ("gemv", "gemv_w32", "gemv_pf") and ("SPLIT_K" not in cfg or self.split_override):
            # per call: split_override if given (it wins over a config's own split: session 7 review),
            # else _gemv_split
            cfg["SPLIT_K"] = None
        cfg.setdefault("SPLIT_K", 1)
        self.cfg = cfg
        self.per_m = {}
        kw = dict(self.consts)
        if not is_interpreter():
            kw.update(num_warps=warps, num_stages=stages)
        self.launch_kw = kw

    def _split(self, m: int, nblocks: int, device: torch.device) -> int:
        s = self.cfg.get("SPLIT_K", 1)
        if s is None:
            s = self.split_override or _gemv_split(m, self.n, nblocks, _sm_count(device))
        return s

    def _grid(self, m: int, split: int) -> tuple:
        c, n = self.cfg, self.n
        if self.mm:
            return (triton_cdiv(m, c["BLOCK_M"]) * triton_cdiv(n, c["BLOCK_N"]), split)
        if self.kind == "gemv_mr":
            return (triton_cdiv(n, c["BLOCK_N"]), triton_cdiv(m, c["BLOCK_M"]), split)
        return (triton_cdiv(n, c["BLOCK_N"]), m, split)

    def __call__(self, x2, codes, scales, ts, bias):
        if self.cfg is None:
            self._tune(x2, codes, scales, ts, bias)
        m, n = x2.shape[0], self.n
        nblocks = scales.shape[1]
        dev = x2.device
        if self.words:
            codes = codes.view(torch.int32)
        plan = self.per_m.get((m, nblocks, dev, x2.dtype))
        if plan is None:
            if len(self.per_m) >= 256:  # many distinct M (varying lengths): start over rather than grow
                self.per_m.clear()
            split = self._split(m, nblocks, dev)
            cfg = self.cfg if self.cfg.get("SPLIT_K", 1) is not None else {**self.cfg, "SPLIT_K": split}
            consts = {**cfg, **self.launch_kw}
            if self.kind in _PACKED_PATHS:
                # _k_range gives every split a multiple of NBK blocks (the last one the rest): all whole
                # steps exactly when NBK divides the block count; and K must fill the last block
                consts["EVEN_K"] = nblocks % cfg["NBK"] == 0 and self.k == nblocks * BLOCK_SIZES[self.fmt]
                consts["PACKED"] = x2.dtype == torch.bfloat16 and not is_interpreter()
            plan = self.per_m[(m, nblocks, dev, x2.dtype)] = (split, self._grid(m, split), consts)
        split, grid, consts = plan
        y = _q.new_output((m, n), x2.dtype, dev)
        ws = _workspace(m, n, dev) if split > 1 else y
        args = (x2, codes, scales, ts, bias if bias is not None else x2, y, ws,
                m, n, self.k, nblocks, x2.stride(0), codes.stride(0), scales.stride(0), y.stride(0))
        if self.mm:
            args += (_m_bucket(m),)
        self.launch(grid, args, consts, _raw_stream(dev) if dev.type == "cuda" else None)
        if split > 1:
            _finalize(ws, bias, y)
        return y

    def _tune(self, x2, codes, scales, ts, bias) -> None:
        m = x2.shape[0]
        if is_interpreter() or x2.device.type != "cuda":
            self._fix(_INTERP_CONFIGS[self.kind])
            return
        cands = _configs(self.kind, m, self.fmt, scales.shape[1])
        if torch.cuda.is_current_stream_capturing():
            # Nothing can be timed (or synchronized) inside a capture: the first config, untimed. (R4:
            # timing here broke the capture -- the sweep's "device-side assertion" and dead context.)
            self._fix(cands[0])
            return
        times, errors = {}, []
        for i, cfg in enumerate(cands):
            self._fix(cfg)
            try:
                times[i] = _gpu_time(lambda: self(x2, codes, scales, ts, bias), x2.device)
            except Exception as e:  # noqa: BLE001 - reported, not fatal
                errors.append(f"{cfg}: {_short_error(e)}")
        if not times:
            self.cfg = None
            raise KernelError(f"fp4_linear {self.kind}: no launch configuration works for M={m}, N={self.n}, "
                              f"K={self.k}: {errors}")
        best = cands[min(times, key=times.get)]
        self._fix(best)
        TUNED_CONFIGS[(self.kind, _m_bucket(m), self.n, self.k, self.fmt, x2.dtype)] = (best, min(times.values()))


#: (kind, M bucket, N, K, format, dtype) -> (the config measured fastest, its time in ms): a report.
TUNED_CONFIGS: dict[tuple, tuple] = {}


def _dequant_linear(x2, codes, scales, ts, bias, fmt, k):
    w = _q.new_output((codes.shape[0], k), x2.dtype, x2.device)
    _q.dequantize_into(w, codes, scales, ts, fmt)
    return torch.nn.functional.linear(x2, w, bias)


_SIDE_STREAMS: dict[int, torch.cuda.Stream] = {}
#: Weight rows per chunk of the pipelined dequantize + cuBLAS path (a multiple of cuBLAS's tiles).
DEQUANT_CHUNK_ROWS = 2048


def _dequant_pipelined(x2, codes, scales, ts, bias, fmt, k, chunk_rows=None):
    """Dequantize + cuBLAS in chunks of weight rows, the dequantize of chunk i+1 (side stream) running
    under the GEMM of chunk i (current stream), two chunk buffers in rotation. Each GEMM writes its
    column slice of y in place (cuBLAS takes the row stride), so nothing is copied afterwards."""
    chunk_rows = chunk_rows or DEQUANT_CHUNK_ROWS
    n = codes.shape[0]
    if x2.device.type != "cuda" or n <= chunk_rows:
        return _dequant_linear(x2, codes, scales, ts, bias, fmt, k)
    m = x2.shape[0]
    dev = x2.device.index if x2.device.index is not None else torch.cuda.current_device()
    side = _SIDE_STREAMS.get(dev)
    if side is None:
        side = _SIDE_STREAMS[dev] = torch.cuda.Stream(x2.device)
    main = torch.cuda.current_stream(x2.device)
    y = _q.new_output((m, n), x2.dtype, x2.device)
    bufs = [torch.empty((chunk_rows, k), dtype=x2.dtype, device=x2.device) for _ in range(2)]
    starts = list(range(0, n, chunk_rows))
    ready = [torch.cuda.Event() for _ in starts]
    done = [torch.cuda.Event() for _ in starts]
    side.wait_stream(main)  # codes/scales/x written on the main stream are visible to the side stream

    def produce(i):
        n0 = starts[i]
        n1 = min(n, n0 + chunk_rows)
        with torch.cuda.stream(side):
            if i >= 2:
                side.wait_event(done[i - 2])  # the GEMM that read this buffer has finished
            _q.dequantize_into(bufs[i % 2][: n1 - n0], codes[n0:n1], scales[n0:n1], ts, fmt)
            ready[i].record(side)

    produce(0)
    for i, n0 in enumerate(starts):
        n1 = min(n, n0 + chunk_rows)
        if i + 1 < len(starts):
            produce(i + 1)
        main.wait_event(ready[i])
        w = bufs[i % 2][: n1 - n0]
        if bias is None:
            torch.mm(x2, w.t(), out=y[:, n0:n1])
        else:
            torch.addmm(bias[n0:n1], x2, w.t(), out=y[:, n0:n1])
        done[i].record(main)
    for b in bufs:  # freed on the main stream after the side stream's last use (the waits above)
        b.record_stream(side)
    return y


def _make_runner(path: str, n: int, k: int, fmt: str, has_bias: bool, *, config=None, split_k=None, chunk_rows=None):
    """A callable (x2, codes, scales, ts, bias) -> y for one path at fixed N, K, format and bias."""
    if path in _GEMV_PATHS or path in _MM_PATHS:
        if split_k is not None and config is None:
            config = {**_INTERP_CONFIGS[path], "SPLIT_K": split_k} if (is_interpreter() or path.startswith("mm")
                                                                     or path == "gemv_mr") else None
        return _KernelLaunch(path, n, k, fmt, has_bias, config=config, split=split_k)
    if path == "dequant":
        return lambda x2, codes, scales, ts, bias: _dequant_linear(x2, codes, scales, ts, bias, fmt, k)
    if path == "dequant_pipelined":
        return lambda x2, codes, scales, ts, bias: _dequant_pipelined(x2, codes, scales, ts, bias, fmt, k, chunk_rows)
    raise KernelError(f"unknown fp4_linear path {path!r}; use one of {PATHS}")


# ---------------------------------------------------------------------------------------------------
# plans: the path (measured) and its launch, cached per (M bucket, N, K, format, dtype, bias, device)
# ---------------------------------------------------------------------------------------------------
#: plan key -> runner; key = (M bucket, N, K, format id, dtype, no bias, device index (-1: CPU))
_PLANS: dict[tuple, object] = {}
#: plan key -> the path measured fastest there (a report: the benchmark prints it)
PATH_CHOICES: dict[tuple, str] = {}
_PATH_FAILURES: dict[tuple, str] = {}


def _choose_path(key, x2, codes, scales, ts, bias, fmt_id, n, k):
    """(path, runner) for this key: forced by VBHAL_FP4_LINEAR_PATH, else every candidate timed once."""
    m = x2.shape[0]
    fmt = FORMATS[fmt_id]
    forced = os.environ.get("VBHAL_FP4_LINEAR_PATH", "auto")
    if forced != "auto":
        if forced not in PATHS:
            raise KernelError(f"VBHAL_FP4_LINEAR_PATH={forced!r}; use one of {PATHS}")
        if not (forced.startswith("mm") and x2.dtype == torch.float32):
            return forced, _make_runner(forced, n, k, fmt, bias is not None)
    cands = _candidates(m, x2.dtype)
    if len(cands) == 1 or x2.device.type != "cuda" or torch.cuda.is_current_stream_capturing():
        path = cands[0] if len(cands) == 1 else _static_path(m, x2.dtype)
        return path, _make_runner(path, n, k, fmt, bias is not None)
    times, runners = {}, {}
    for cand in cands:
        run = _make_runner(cand, n, k, fmt, bias is not None)
        try:
            times[cand] = _gpu_time(lambda run=run: run(x2, codes, scales, ts, bias), x2.device)
            runners[cand] = run
        except Exception as e:  # noqa: BLE001 - reported, not fatal
            _PATH_FAILURES[key + (cand,)] = _short_error(e)
    if not times:
        raise KernelError(f"fp4_linear: no kernel path works for M={m}, N={n}, K={k}: {_PATH_FAILURES}")
    path = min(times, key=times.get)
    return path, runners[path]


def _forward_2d(x2, codes, scales, ts, bias, fmt_id, n, k):
    """y (M, N) from x (M, K) contiguous rows and the weight operands, by the cached plan."""
    key = (_m_bucket(x2.shape[0]), n, k, fmt_id, x2.dtype, bias is None, x2.get_device())
    run = _PLANS.get(key)
    if run is None:
        path, run = _choose_path(key, x2, codes, scales, ts, bias, fmt_id, n, k)
        if x2.device.type != "cuda" or not torch.cuda.is_current_stream_capturing():
            _PLANS[key] = run  # a plan made without measuring (capture) is not kept
            PATH_CHOICES[key] = path
    return run(x2, codes, scales, ts, bias)


def _linear_2d(x2, codes, scales, ts, bias, fmt_id, n, k, path="auto", *, split_k=None, config=None,
               chunk_rows=None):
    """y (M, N) from x (M, K) and the weight operands by ``path`` (``PATHS``); split_k/config/chunk_rows
    fix the launch (tests, sweeps). Runners are cached per (path, shape, launch, dtype, M bucket):
    made (and tuned, outside captures) at the first call."""
    if path == "auto":
        return _forward_2d(x2, codes, scales, ts, bias, fmt_id, n, k)
    key = (path, n, k, fmt_id, bias is not None, tuple(sorted(config.items())) if config else None, split_k,
           chunk_rows, x2.dtype, _m_bucket(x2.shape[0]), x2.get_device())
    run = _RUNNERS.get(key)
    if run is None:
        run = _make_runner(path, n, k, FORMATS[fmt_id], bias is not None, config=config, split_k=split_k,
                           chunk_rows=chunk_rows)
        if x2.device.type != "cuda" or not torch.cuda.is_current_stream_capturing():
            _RUNNERS[key] = run
    return run(x2, codes, scales, ts, bias)


#: runners of explicit paths (_linear_2d), so that a test or a sweep tunes each once, not per call
_RUNNERS: dict[tuple, object] = {}


# ---------------------------------------------------------------------------------------------------
# autograd: the custom op (traced calls) and an autograd.Function (eager calls)
# ---------------------------------------------------------------------------------------------------
def _grads(grad_y, codes, scales, ts, fmt_id, k, need_x, bias_dtype, need_b):
    """dL/dx = dL/dy @ dequant(W) (Triton dequantize + cuBLAS), dL/db = sum of dL/dy over rows."""
    grad_x = grad_bias = None
    if need_x:
        w = _q.new_output((codes.shape[0], k), grad_y.dtype, grad_y.device)
        _q.dequantize_into(w, codes, scales, ts, FORMATS[fmt_id])
        grad_x = grad_y @ w
    if bias_dtype is not None and need_b:
        grad_bias = grad_y.sum(0).to(bias_dtype)
    return grad_x, grad_bias


@torch.library.custom_op("vbhal::fp4_linear_cuda", mutates_args=())
def _fp4_linear_op(x: torch.Tensor, codes: torch.Tensor, scales: torch.Tensor, tensor_scale: torch.Tensor,
                   bias: torch.Tensor | None, fmt_id: int, n: int, k: int) -> torch.Tensor:
    """x (M, K) contiguous, codes uint8 (N, Kp/2), scale bytes uint8 (N, Kp/B) -> y (M, N) in x's dtype."""
    return _forward_2d(x, codes, scales, tensor_scale, bias, fmt_id, n, k)


@_fp4_linear_op.register_fake
def _(x, codes, scales, tensor_scale, bias, fmt_id, n, k):
    return x.new_empty((x.shape[0], n))


def _setup_context(ctx, inputs, output):
    _x, codes, scales, tensor_scale, bias, fmt_id, _n, k = inputs
    ctx.save_for_backward(codes, scales, tensor_scale)
    ctx.fmt_id, ctx.k = fmt_id, k
    ctx.bias_dtype = bias.dtype if bias is not None else None


def _backward(ctx, grad_y):
    codes, scales, tensor_scale = ctx.saved_tensors
    gx, gb = _grads(grad_y, codes, scales, tensor_scale, ctx.fmt_id, ctx.k, ctx.needs_input_grad[0],
                    ctx.bias_dtype, ctx.needs_input_grad[4])
    return gx, None, None, None, gb, None, None, None


_fp4_linear_op.register_autograd(_backward, setup_context=_setup_context)


class _FP4LinearFunction(torch.autograd.Function):
    """The custom op's forward and backward for eager calls (a fraction of the op's host time)."""

    @staticmethod
    def forward(ctx, x, codes, scales, tensor_scale, bias, fmt_id, n, k):
        ctx.save_for_backward(codes, scales, tensor_scale)
        ctx.fmt_id, ctx.k = fmt_id, k
        ctx.bias_dtype = bias.dtype if bias is not None else None
        return _forward_2d(x, codes, scales, tensor_scale, bias, fmt_id, n, k)

    @staticmethod
    def backward(ctx, grad_y):
        return _backward(ctx, grad_y)


def _tracing() -> bool:
    """True under torch.compile/export or an active dispatch mode (FakeTensor, make_fx): the op then."""
    return torch.compiler.is_compiling() or torch._C._len_torch_dispatch_stack() > 0


def _apply(x2, codes, scales, ts, bias, fmt_id, n, k):
    """Run on validated operands: the custom op when traced, else the plan directly (through the
    autograd.Function only when a gradient is wanted)."""
    if _tracing():
        return torch.ops.vbhal.fp4_linear_cuda(x2, codes, scales, ts, bias, fmt_id, n, k)
    if torch.is_grad_enabled() and (x2.requires_grad or (bias is not None and bias.requires_grad)):
        return _FP4LinearFunction.apply(x2, codes, scales, ts, bias, fmt_id, n, k)
    return _forward_2d(x2, codes, scales, ts, bias, fmt_id, n, k)


# ---------------------------------------------------------------------------------------------------
# public kernel
# ---------------------------------------------------------------------------------------------------
_FMT_IDS = {f: i for i, f in enumerate(FORMATS)}
_ZERO_TS: dict[int, torch.Tensor] = {}  # device index (-1: CPU) -> a 0-dim float32 zero (mxfp4's unused scale)


def _as_2d(x: torch.Tensor, k: int) -> torch.Tensor:
    x2 = x.reshape(-1, k)
    if x2.stride(-1) != 1 or (x2.shape[0] > 1 and x2.stride(0) != k):
        x2 = x2.contiguous()
    return x2


def fp4_linear(x: torch.Tensor, qw: QuantizedWeight, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``F.linear(x, dequantize_fp4(qw, x.dtype), bias)`` without materializing the weight (small M).

    x: (..., K) bfloat16 / float16 / float32 on the weight's GPU; bias: (N,) or None. Returns (..., N)
    in x's dtype. Differentiable w.r.t. x and bias.

    >>> y = fp4_linear(torch.randn(8, 4096, device="cuda", dtype=torch.bfloat16), qw)
    """
    if not isinstance(qw, QuantizedWeight):
        raise KernelError(f"fp4_linear takes a vbhal.formats.QuantizedWeight, got {type(qw).__name__}")
    n, k = qw.shape
    if not isinstance(x, torch.Tensor) or x.dim() < 1 or x.shape[-1] != k:
        got = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        raise KernelError(f"fp4_linear: x must be (..., {k}) for a weight of shape {qw.shape}, got {got}")
    if x.dtype not in _ACT_DTYPES:
        raise KernelError(f"fp4_linear takes bfloat16/float16/float32 activations, got {x.dtype}; cast x first")
    if x.device != qw.device:
        raise KernelError(f"fp4_linear: x is on {x.device} but the weight on {qw.device}; move one of them")
    if bias is not None and (bias.shape != (n,) or bias.device != x.device):
        raise KernelError(f"fp4_linear: bias must be ({n},) on {x.device}, got {tuple(bias.shape)} on {bias.device}")
    if os.environ.get("VBHAL_FP4_NATIVE") == "1" and native_fp4_available(x.device):
        return native_fp4_linear(x, qw, bias)
    codes, scales, ts, fmt_id = qw_operands(qw)
    lead = x.shape[:-1]
    x2 = _as_2d(x, k)
    if x2.shape[0] == 0:
        return x.new_empty((*lead, n))
    return _apply(x2, codes, scales, ts, bias, fmt_id, n, k).reshape(*lead, n)


def _from_operands(x: torch.Tensor, codes: torch.Tensor, scales: torch.Tensor, tensor_scale: torch.Tensor | None,
                   bias: torch.Tensor | None, fmt: str, in_features: int) -> torch.Tensor:
    """``fp4_linear`` on a QuantizedWeight's tensors as FP4Linear holds them (codes contiguous uint8,
    scales float8 or uint8, tensor_scale or None), for a caller that has already checked x's dtype,
    device and last dimension and the buffers' shapes (FP4Linear does): no QuantizedWeight is built,
    nothing is validated twice."""
    n = codes.shape[0]
    if tensor_scale is None:
        dev = codes.get_device()
        tensor_scale = _ZERO_TS.get(dev)
        if tensor_scale is None:
            tensor_scale = _ZERO_TS[dev] = torch.zeros((), dtype=torch.float32, device=codes.device)
    if scales.dtype != torch.uint8:
        scales = scales.view(torch.uint8)
    if x.dim() == 2 and x.stride(1) == 1 and (x.shape[0] == 1 or x.stride(0) == in_features):
        if x.shape[0] == 0:
            return x.new_empty((0, n))
        return _apply(x, codes, scales, tensor_scale, bias, _FMT_IDS[fmt], n, in_features)
    lead = x.shape[:-1]
    x2 = _as_2d(x, in_features)
    if x2.shape[0] == 0:
        return x.new_empty((*lead, n))
    return _apply(x2, codes, scales, tensor_scale, bias, _FMT_IDS[fmt], n, in_features).reshape(*lead, n)


fp4_linear.from_operands = _from_operands


# ---------------------------------------------------------------------------------------------------
# native FP4 (Blackwell, compute capability 10.x) -- UNRUN: no such GPU was available
# ---------------------------------------------------------------------------------------------------
def native_fp4_available(device: torch.device) -> bool:
    """True on a compute capability 10.x GPU with a torch that has float4_e2m1fn_x2 (the probe's fp4_native)."""
    if device.type != "cuda" or not hasattr(torch, "float4_e2m1fn_x2"):
        return False
    return torch.cuda.get_device_capability(device)[0] == 10


def _to_blocked(scales: torch.Tensor) -> torch.Tensor:
    """Rearrange (rows, cols) block scales into cuBLAS's 128x4 tiled ("swizzled") scale layout."""
    rows, cols = scales.shape
    rp, cp = triton_cdiv(rows, 128) * 128, triton_cdiv(cols, 4) * 4
    padded = torch.zeros((rp, cp), dtype=scales.dtype, device=scales.device)
    padded[:rows, :cols] = scales
    blocks = padded.view(rp // 128, 128, cp // 4, 4).permute(0, 2, 1, 3)
    return blocks.reshape(-1, 4, 32, 4).transpose(1, 2).reshape(-1, 32, 16).flatten()


def native_fp4_linear(x: torch.Tensor, qw: QuantizedWeight, bias: torch.Tensor | None = None) -> torch.Tensor:
    """W4A4 on Blackwell's FP4 tensor cores: quantize x to qw's format and call ``torch._scaled_mm``.

    The weight's code and scale bytes go to cuBLAS unchanged (viewed as float4_e2m1fn_x2 and
    swizzled scales). UNRUN: written against torch's documented _scaled_mm FP4 contract; no compute
    capability 10.x GPU was available, so it is opt-in (VBHAL_FP4_NATIVE=1) and untested.
    """
    if not native_fp4_available(x.device):
        raise KernelError("native FP4 needs a compute capability 10.x GPU and torch with float4_e2m1fn_x2")
    n, k = qw.shape
    x2 = x.reshape(-1, k)
    if qw.padded_k != k:
        x2 = torch.nn.functional.pad(x2, (0, qw.padded_k - k))
    xq = quantize_fp4(x2, qw.fmt, scale_rule="rceil" if qw.fmt == "mxfp4" else "floor")
    fp4 = torch.float4_e2m1fn_x2
    y = torch._scaled_mm(
        xq.codes.view(fp4), qw.codes.view(fp4).t(),
        _to_blocked(xq.scales), _to_blocked(qw.scales),
        out_dtype=torch.float32,
    )
    if qw.fmt == "nvfp4":  # the block scales are relative to each operand's tensor scale
        y = y * (xq.tensor_scale * qw.tensor_scale)
    y = y.to(x.dtype)
    if bias is not None:
        y = y + bias
    return y.reshape(*x.shape[:-1], n)


def _quantize_kernel(w: torch.Tensor, fmt: str, *, scale_rule: str = "floor") -> QuantizedWeight:
    """The ``quantize_fp4`` kernel of the HAL contract."""
    return quantize_fp4(w, fmt, scale_rule=scale_rule)


def _dequantize_kernel(qw: QuantizedWeight, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The ``dequantize_fp4`` kernel of the HAL contract."""
    return dequantize_fp4(qw, dtype)


KERNELS = {"quantize_fp4": _quantize_kernel, "dequantize_fp4": _dequantize_kernel, "fp4_linear": fp4_linear}
