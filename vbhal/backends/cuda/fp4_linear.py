"""Fused FP4 dequantize-matmul for the CUDA backend: ``y = x @ dequant(W)^T + bias``.

Kernels in ``fp4_kernels.py``. Paths (``PATHS``); which one runs is measured, not guessed: the first
call for an (M bucket, N, K, format, dtype) times every candidate path for that M with CUDA events
and caches the fastest (``PATH_CHOICES``; a path that fails to compile is skipped). The candidates:

- M <= 4: the GEMV kernels -- weights streamed from HBM once, codes decoded in registers, float32
  FMA, the block scale applied once per block: ``gemv`` (bytes), ``gemv_w32`` (int32 words, two codes
  per bit operation, x read contiguously and split in registers), ``gemv_pf`` (gemv_w32 with the next
  step's loads in flight during this step's arithmetic) -- and ``mm_t``.
- M <= 64: ``mm_w32`` (x @ W^T form, mma.sync tiles of 16-32 rows) and ``mm_t``, the "swap-AB"
  tensor-core kernel: y^T = W x^T with the decoded weight tile as the MMA's first operand
  (registers; wgmma on Hopper) so the weight rows fill the 64-row MMA dimension and the batch only
  the narrow one; split-K into a float32 workspace so that a few row tiles still fill every SM.
- M > 64: ``mm_t`` with large tiles (each weight element decoded once per 128-256 activation rows),
  ``dequant`` (Triton dequantize to x's dtype + cuBLAS) and ``dequant_pipelined`` (the dequantize of
  weight chunk i+1 on a side stream under the cuBLAS GEMM of chunk i).
- float32 activations: the GEMV kernels or ``dequant`` (tl.dot on fp32 would be TF32).
``mm``/``mm_w32`` (x @ W^T form) only get BLOCK_M < 64 tiles: triton 3.6 cannot compile them with
BLOCK_M >= 64 (the wgmma path), the swap-AB form compiles there. ``VBHAL_FP4_LINEAR_PATH`` forces a
path.

The op is ``vbhal::fp4_linear_cuda`` (torch.library.custom_op) with a fake (meta) implementation and
autograd w.r.t. x and bias: grad_x = grad_y @ dequant(W) (Triton dequantize + cuBLAS); the FP4 weight
is frozen. ``KERNELS`` is what the CUDA plugin binds: quantize_fp4, dequantize_fp4, fp4_linear.

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
from .fp4_quantize import dequantize_fp4, is_interpreter, kernels_module, qw_operands, quantize_fp4, triton_cdiv

if importlib.util.find_spec("triton") is None:  # the KernelTable reports this and falls back to CPU kernels
    raise ImportError("the CUDA FP4 kernels need triton (pip install triton); the CPU reference kernels serve instead")

__all__ = ["fp4_linear", "native_fp4_linear", "KERNELS", "PATHS"]

#: Paths of the fused linear; "auto" picks by shape (``_choose_path``). VBHAL_FP4_LINEAR_PATH overrides.
PATHS = ("auto", "gemv", "gemv_w32", "gemv_pf", "mm", "mm_w32", "mm_t", "dequant", "dequant_pipelined")
_ACT_DTYPES = (torch.bfloat16, torch.float16, torch.float32)

# Shape thresholds for "auto", measured on the H100 (benchmarks/bench_fp4_linear.py; see its JSON).
GEMV_MAX_M = 4
MM_MAX_M = 512

_SM_COUNT: dict[int, int] = {}


def _sm_count(device: torch.device) -> int:
    if device.type != "cuda":
        return 4
    idx = device.index if device.index is not None else torch.cuda.current_device()
    if idx not in _SM_COUNT:
        _SM_COUNT[idx] = torch.cuda.get_device_properties(idx).multi_processor_count
    return _SM_COUNT[idx]


def _static_path(m: int, dtype: torch.dtype) -> str:
    """The path when none can be measured (CPU interpreter, CUDA-graph capture): by shape only."""
    if m <= GEMV_MAX_M:
        return "gemv_w32"
    if dtype == torch.float32:  # tl.dot on fp32 would be TF32; fp32 takes the FMA GEMV or cuBLAS
        return "dequant"
    return "mm_t" if m <= MM_MAX_M else "dequant"


def _candidates(m: int, dtype: torch.dtype) -> tuple[str, ...]:
    """Paths worth timing for M activation rows (the rest lose by construction: see the module doc)."""
    if dtype == torch.float32:
        return ("gemv_w32", "gemv_pf", "gemv") if m <= GEMV_MAX_M else ("dequant",)
    if m <= GEMV_MAX_M:
        return ("gemv_w32", "gemv_pf", "gemv", "mm_t")
    if m <= MM_T_SMALL_M:
        return ("mm_t", "mm_w32")
    return ("mm_t", "dequant", "dequant_pipelined")


#: (M bucket, N, K, format id, dtype, has bias, device) -> the path measured fastest there.
PATH_CHOICES: dict[tuple, str] = {}
_PATH_FAILURES: dict[tuple, str] = {}


def _choose_path(x2, codes, scales, ts, bias, fmt_id, n, k) -> str:
    """The fastest path for this shape, measured once per (M bucket, N, K, format, dtype) and cached.

    Each candidate runs twice (compiling and autotuning its kernels), then is timed with CUDA events;
    a candidate that fails to compile is skipped (and remembered). VBHAL_FP4_LINEAR_PATH forces one.
    """
    m = x2.shape[0]
    forced = os.environ.get("VBHAL_FP4_LINEAR_PATH", "auto")
    if forced != "auto":
        if forced not in PATHS:
            raise KernelError(f"VBHAL_FP4_LINEAR_PATH={forced!r}; use one of {PATHS}")
        if not (forced.startswith("mm") and x2.dtype == torch.float32):
            return forced
    cands = _candidates(m, x2.dtype)
    if len(cands) == 1:
        return cands[0]
    key = (_m_bucket(m), n, k, fmt_id, x2.dtype, bias is not None, x2.device)
    path = PATH_CHOICES.get(key)
    if path is not None:
        return path
    if x2.device.type != "cuda" or torch.cuda.is_current_stream_capturing():
        return _static_path(m, x2.dtype)
    times = {}
    for cand in cands:
        try:
            times[cand] = _time_path(cand, x2, codes, scales, ts, bias, fmt_id, n, k)
        except Exception as e:  # noqa: BLE001 - a path that cannot compile here is skipped, not fatal
            _PATH_FAILURES[key + (cand,)] = f"{type(e).__name__}: {str(e).strip().splitlines()[-1][:200] if str(e).strip() else ''}"
    if not times:
        raise KernelError(f"fp4_linear: no kernel path works for M={m}, N={n}, K={k}: {_PATH_FAILURES}")
    path = PATH_CHOICES[key] = min(times, key=times.get)
    return path


def _time_path(cand, x2, codes, scales, ts, bias, fmt_id, n, k, reps: int = 10) -> float:
    """GPU time (ms) of one call of a path: run twice (compile, autotune), then replay ``reps`` calls
    captured in a CUDA graph, so that Python launch overhead does not decide the choice (R2: eager
    back-to-back timing picked the path with the least CPU work, not the fastest kernels). Falls back
    to eager timing where a path cannot be captured."""
    for _ in range(2):
        _run_path(cand, x2, codes, scales, ts, bias, fmt_id, n, k)
    torch.cuda.synchronize(x2.device)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    try:
        graph = torch.cuda.CUDAGraph()
        side = torch.cuda.Stream(x2.device)
        side.wait_stream(torch.cuda.current_stream(x2.device))
        with torch.cuda.stream(side):
            _run_path(cand, x2, codes, scales, ts, bias, fmt_id, n, k)  # warm on the capture stream
        torch.cuda.current_stream(x2.device).wait_stream(side)
        with torch.cuda.graph(graph):
            for _ in range(reps):
                _run_path(cand, x2, codes, scales, ts, bias, fmt_id, n, k)
        graph.replay()
        torch.cuda.synchronize(x2.device)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / reps
    except Exception:  # noqa: BLE001 - not capturable: time it eagerly instead
        torch.cuda.synchronize(x2.device)
        start.record()
        for _ in range(reps):
            _run_path(cand, x2, codes, scales, ts, bias, fmt_id, n, k)
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / reps


# ---------------------------------------------------------------------------------------------------
# launchers
# ---------------------------------------------------------------------------------------------------
_TUNED: dict[str, object] = {}


def _autotuned(name: str):
    """The autotuned wrapper of a kernel (GPU only; short config lists, results cached on disk)."""
    fn = _TUNED.get(name)
    if fn is not None:
        return fn
    import triton

    k4 = kernels_module()
    kw = {}
    try:  # cache_results persists the tuning across processes (triton >= 3.2)
        import inspect

        if "cache_results" in inspect.signature(triton.autotune).parameters:
            kw["cache_results"] = True
    except (TypeError, ValueError):
        pass
    C = triton.Config
    if name in ("gemv", "gemv_w32", "gemv_pf"):
        # Bytes in flight ~ N * NBK * 16 per sweep (every row tile co-resident): NBK large enough to
        # cover HBM latency; BLOCK_N large enough that each thread reuses its x values across rows.
        configs = [
            C({"BLOCK_N": 32, "NBK": 8}, num_warps=4, num_stages=3),
            C({"BLOCK_N": 16, "NBK": 16}, num_warps=4, num_stages=3),
            C({"BLOCK_N": 64, "NBK": 8}, num_warps=8, num_stages=3),
        ]
        kern = getattr(k4, f"fp4_{name}_kernel")
        fn = triton.autotune(configs, key=["M", "N", "K", "BLOCK", "SPLIT_K"], reset_to_zero=["y_ptr"], **kw)(kern)
    elif name.startswith("mm_t"):
        nv = 2 if name.endswith("nv") else 1  # NBK counts blocks: nvfp4's are half as long
        if "small" in name:
            # y is a float32 workspace here (atomics when SPLIT_K > 1): split K so that the few row tiles
            # of a small batch still fill every SM
            configs = [
                C({"BLOCK_M": 16, "BLOCK_N": 64, "NBK": 4 * nv, "GROUP_M": 8, "SPLIT_K": 2}, num_warps=4, num_stages=4),
                C({"BLOCK_M": 16, "BLOCK_N": 64, "NBK": 4 * nv, "GROUP_M": 8, "SPLIT_K": 4}, num_warps=4, num_stages=4),
                C({"BLOCK_M": 16, "BLOCK_N": 128, "NBK": 2 * nv, "GROUP_M": 8, "SPLIT_K": 4}, num_warps=4, num_stages=4),
                C({"BLOCK_M": 16, "BLOCK_N": 128, "NBK": 4 * nv, "GROUP_M": 8, "SPLIT_K": 8}, num_warps=4, num_stages=3),
                C({"BLOCK_M": 32, "BLOCK_N": 128, "NBK": 2 * nv, "GROUP_M": 8, "SPLIT_K": 4}, num_warps=4, num_stages=4),
                C({"BLOCK_M": 64, "BLOCK_N": 128, "NBK": 2 * nv, "GROUP_M": 8, "SPLIT_K": 2}, num_warps=4, num_stages=3),
            ]
        else:
            configs = [
                C({"BLOCK_M": 128, "BLOCK_N": 128, "NBK": 2 * nv, "GROUP_M": 8, "SPLIT_K": 1}, num_warps=8, num_stages=3),
                C({"BLOCK_M": 256, "BLOCK_N": 128, "NBK": 2 * nv, "GROUP_M": 8, "SPLIT_K": 1}, num_warps=8, num_stages=3),
                C({"BLOCK_M": 128, "BLOCK_N": 256, "NBK": 2 * nv, "GROUP_M": 8, "SPLIT_K": 1}, num_warps=8, num_stages=3),
            ]
        fn = triton.autotune(configs, key=["M_BUCKET", "N", "K", "BLOCK"], reset_to_zero=["y_ptr"],
                             prune_configs_by={"early_config_prune": _prune_mm}, **kw)(k4.fp4_mm_t_kernel)
    elif name.startswith("mm"):
        kern = k4.fp4_mm_kernel if name.startswith("mm_u8") else k4.fp4_mm_w32_kernel
        if name.endswith("small"):
            configs = [
                C({"BLOCK_M": 16, "BLOCK_N": 64, "NBK": 4, "GROUP_M": 8}, num_warps=4, num_stages=4),
                C({"BLOCK_M": 16, "BLOCK_N": 128, "NBK": 2, "GROUP_M": 8}, num_warps=4, num_stages=4),
                C({"BLOCK_M": 32, "BLOCK_N": 64, "NBK": 4, "GROUP_M": 8}, num_warps=4, num_stages=4),
            ]
        else:  # BLOCK_M >= 64 selects wgmma, which triton 3.6 cannot compile for this operand (R1)
            configs = [
                C({"BLOCK_M": 32, "BLOCK_N": 64, "NBK": 4, "GROUP_M": 8}, num_warps=4, num_stages=4),
            ]
        fn = triton.autotune(configs, key=["M_BUCKET", "N", "K", "BLOCK", "SPLIT_K"], reset_to_zero=["y_ptr"],
                             prune_configs_by={"early_config_prune": _prune_mm}, **kw)(kern)
    else:
        raise KeyError(name)
    _TUNED[name] = fn
    return fn


#: (kernel name, shape key) -> (JITFunction, best triton.Config): after the first (tuning) call the
#: kernel is launched directly with its config, skipping the autotuner's per-call Python work.
_BEST: dict[tuple, tuple] = {}


def _launch_tuned(name: str, key: tuple, grid, args: tuple, consts: dict) -> None:
    """Launch autotuned kernel ``name``; ``key`` must determine the autotuner's own key (shape, dtypes)."""
    best = _BEST.get((name,) + key)
    if best is not None:
        fn, cfg = best
        fn[grid({**consts, **cfg.kwargs})](*args, **consts, **cfg.all_kwargs())
        return
    tuned = _autotuned(name)
    tuned[grid](*args, **consts)
    cfg = getattr(tuned, "best_config", None)
    if cfg is not None and cfg.pre_hook is None:
        _BEST[(name,) + key] = (tuned.fn, cfg)


def _prune_mm(configs, named_args, **kwargs):
    """Drop configs whose BLOCK_M is above M rounded up to a power of two (wasted MMA columns) and
    split-K configs whose K share would be under 4 steps -- keep at least one."""
    m = named_args["M"]
    nblocks = named_args["NUM_BLOCKS"]
    keep = [c for c in configs if c.kwargs["BLOCK_M"] <= max(16, _m_bucket(m))
            and nblocks // (c.kwargs.get("SPLIT_K", 1) * c.kwargs["NBK"]) >= 4]
    return keep or configs[:1]


def _m_bucket(m: int) -> int:
    b = 1
    while b < m:
        b *= 2
    return b


def _gemv_split(m: int, n: int, nblocks: int, sms: int) -> int:
    """Split K only when the row tiles (at BLOCK_N = 16, the largest tried) cannot fill the GPU twice."""
    split = 1
    while triton_cdiv(n, 16) * m * split < 2 * sms and nblocks // (split * 2) >= 64:
        split *= 2
    return split


def _launch_gemv(x2, codes, scales, ts, bias, fmt, n, k, out_dtype, split=None, kind="gemv"):
    m = x2.shape[0]
    if kind != "gemv":  # int32 view: 8 codes per word (Kp/2 bytes is a multiple of 8 for both formats)
        codes = codes.view(torch.int32)
    block = BLOCK_SIZES[fmt]
    nblocks = scales.shape[1]
    if split is None:
        split = _gemv_split(m, n, nblocks, _sm_count(x2.device))
    y = torch.zeros((m, n), dtype=torch.float32, device=x2.device) if split > 1 else \
        _q.new_output((m, n), out_dtype, x2.device)
    args = (x2, codes, scales, ts, bias if bias is not None else x2, y,
            m, n, k, nblocks, x2.stride(0), codes.stride(0), scales.stride(0), y.stride(0))
    consts = dict(IS_NV=fmt == "nvfp4", HAS_BIAS=bias is not None, BLOCK=block, SPLIT_K=split)
    if is_interpreter() or x2.device.type != "cuda":
        kern = getattr(kernels_module(), f"fp4_{kind}_kernel")
        kern[(triton_cdiv(n, 4), m, split)](*args, BLOCK_N=4, NBK=2, **consts)
    else:
        _launch_tuned(kind, (m, n, k, block, split, x2.dtype, y.dtype, bias is not None),
                      lambda meta: (triton_cdiv(n, meta["BLOCK_N"]), m, split), args, consts)
    return y if split == 1 else y.to(out_dtype)


def _launch_mm(x2, codes, scales, ts, bias, fmt, n, k, out_dtype, config: dict | None = None, words=True):
    m = x2.shape[0]
    if words:
        codes = codes.view(torch.int32)
    block = BLOCK_SIZES[fmt]
    nblocks = scales.shape[1]
    split = 1
    y = _q.new_output((m, n), out_dtype, x2.device)
    args = (x2, codes, scales, ts, bias if bias is not None else x2, y,
            m, n, k, nblocks, x2.stride(0), codes.stride(0), scales.stride(0), y.stride(0), _m_bucket(m))
    consts = dict(IS_NV=fmt == "nvfp4", HAS_BIAS=bias is not None, BLOCK=block, SPLIT_K=split)
    k4 = kernels_module()
    kern = k4.fp4_mm_w32_kernel if words else k4.fp4_mm_kernel
    if is_interpreter() or x2.device.type != "cuda":
        cfg = config or {"BLOCK_M": 16, "BLOCK_N": 16, "NBK": 2, "GROUP_M": 2}
        grid = (triton_cdiv(m, cfg["BLOCK_M"]) * triton_cdiv(n, cfg["BLOCK_N"]), split)
        kern[grid](*args, **cfg, **consts)
        return y
    if config is not None:
        cfg = dict(config)
        warps = cfg.pop("num_warps", 4)
        stages = cfg.pop("num_stages", 3)
        grid = (triton_cdiv(m, cfg["BLOCK_M"]) * triton_cdiv(n, cfg["BLOCK_N"]), split)
        kern[grid](*args, **cfg, **consts, num_warps=warps, num_stages=stages)
        return y
    tuned = _autotuned(("mm_w32_" if words else "mm_u8_") + ("small" if m <= 128 else "large"))
    grid = lambda meta: (triton_cdiv(m, meta["BLOCK_M"]) * triton_cdiv(n, meta["BLOCK_N"]), split)  # noqa: E731
    tuned[grid](*args, **consts)
    return y


#: Largest M for the split-K (float32 workspace) tiles of the swap-AB kernel; above it, direct tiles.
MM_T_SMALL_M = 64


def _launch_mm_t(x2, codes, scales, ts, bias, fmt, n, k, out_dtype, config: dict | None = None):
    """Swap-AB tensor-core path (fp4_mm_t_kernel). Small M: float32 workspace, split-K by autotuning."""
    m = x2.shape[0]
    codes = codes.view(torch.int32)
    block = BLOCK_SIZES[fmt]
    nblocks = scales.shape[1]
    small = m <= MM_T_SMALL_M
    cfg = dict(config) if config is not None else None
    if cfg is None and (is_interpreter() or x2.device.type != "cuda"):
        cfg = {"BLOCK_M": 16, "BLOCK_N": 16, "NBK": 2, "GROUP_M": 2, "SPLIT_K": 2 if small else 1}
    split = cfg.get("SPLIT_K", 1) if cfg is not None else None
    use_ws = small or (split is not None and split > 1)
    y = torch.zeros((m, n), dtype=torch.float32, device=x2.device) if use_ws else \
        _q.new_output((m, n), out_dtype, x2.device)
    args = (x2, codes, scales, ts, bias if bias is not None else x2, y,
            m, n, k, nblocks, x2.stride(0), codes.stride(0), scales.stride(0), y.stride(0), _m_bucket(m))
    consts = dict(IS_NV=fmt == "nvfp4", HAS_BIAS=bias is not None, BLOCK=block)
    k4 = kernels_module()
    if cfg is not None:
        warps = cfg.pop("num_warps", 4)
        stages = cfg.pop("num_stages", 3)
        grid = (triton_cdiv(m, cfg["BLOCK_M"]) * triton_cdiv(n, cfg["BLOCK_N"]), cfg.get("SPLIT_K", 1))
        if is_interpreter() or x2.device.type != "cuda":
            k4.fp4_mm_t_kernel[grid](*args, **cfg, **consts)
        else:
            k4.fp4_mm_t_kernel[grid](*args, **cfg, **consts, num_warps=warps, num_stages=stages)
    else:
        name = "mm_t_" + ("small" if small else "large") + ("_nv" if fmt == "nvfp4" else "")
        grid = lambda meta: (triton_cdiv(m, meta["BLOCK_M"]) * triton_cdiv(n, meta["BLOCK_N"]),  # noqa: E731
                             meta["SPLIT_K"])
        _launch_tuned(name, (_m_bucket(m), n, k, block, x2.dtype, y.dtype, bias is not None), grid, args, consts)
    return y.to(out_dtype) if use_ws else y


def _launch_dequant(x2, codes, scales, ts, bias, fmt_id, n, k, out_dtype):
    w = torch.ops.vbhal.dequantize_fp4_cuda(codes, scales, ts, fmt_id, k, x2.dtype)
    return torch.nn.functional.linear(x2, w, bias).to(out_dtype)


_SIDE_STREAMS: dict[int, torch.cuda.Stream] = {}
#: Weight rows per chunk of the pipelined dequantize + cuBLAS path (a multiple of cuBLAS's tiles).
DEQUANT_CHUNK_ROWS = 2048


def _launch_dequant_pipelined(x2, codes, scales, ts, bias, fmt_id, n, k, chunk_rows=DEQUANT_CHUNK_ROWS):
    """Dequantize + cuBLAS in chunks of weight rows, the dequantize of chunk i+1 (side stream) running
    under the GEMM of chunk i (current stream), two bf16 chunk buffers in rotation. Each GEMM writes
    its column slice of y in place (cuBLAS takes the row stride), so nothing is copied afterwards."""
    if x2.device.type != "cuda" or n <= chunk_rows:
        return _launch_dequant(x2, codes, scales, ts, bias, fmt_id, n, k, x2.dtype)
    fmt = FORMATS[fmt_id]
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


def _run_path(path, x2, codes, scales, ts, bias, fmt_id, n, k, *, split_k=None, config=None):
    fmt = FORMATS[fmt_id]
    if path in ("gemv", "gemv_w32", "gemv_pf"):
        return _launch_gemv(x2, codes, scales, ts, bias, fmt, n, k, x2.dtype, split=split_k, kind=path)
    if path in ("mm", "mm_w32"):
        return _launch_mm(x2, codes, scales, ts, bias, fmt, n, k, x2.dtype, config=config, words=path == "mm_w32")
    if path == "mm_t":
        return _launch_mm_t(x2, codes, scales, ts, bias, fmt, n, k, x2.dtype, config=config)
    if path == "dequant":
        return _launch_dequant(x2, codes, scales, ts, bias, fmt_id, n, k, x2.dtype)
    if path == "dequant_pipelined":
        return _launch_dequant_pipelined(x2, codes, scales, ts, bias, fmt_id, n, k)
    raise KernelError(f"unknown fp4_linear path {path!r}; use one of {PATHS}")


def _linear_2d(x2, codes, scales, ts, bias, fmt_id, n, k, path="auto", *, split_k=None, config=None):
    """y (M, N) from x (M, K) and the weight operands, by ``path`` (``PATHS``); split_k/config: tests."""
    if path == "auto":
        path = _choose_path(x2, codes, scales, ts, bias, fmt_id, n, k)
    return _run_path(path, x2, codes, scales, ts, bias, fmt_id, n, k, split_k=split_k, config=config)


# ---------------------------------------------------------------------------------------------------
# the custom op
# ---------------------------------------------------------------------------------------------------
@torch.library.custom_op("vbhal::fp4_linear_cuda", mutates_args=())
def _fp4_linear_op(x: torch.Tensor, codes: torch.Tensor, scales: torch.Tensor, tensor_scale: torch.Tensor,
                   bias: torch.Tensor | None, fmt_id: int, n: int, k: int) -> torch.Tensor:
    """x (M, K) contiguous, codes uint8 (N, Kp/2), scale bytes uint8 (N, Kp/B) -> y (M, N) in x's dtype."""
    return _linear_2d(x, codes, scales, tensor_scale, bias, fmt_id, n, k)


@_fp4_linear_op.register_fake
def _(x, codes, scales, tensor_scale, bias, fmt_id, n, k):
    return x.new_empty((x.shape[0], n))


def _setup_context(ctx, inputs, output):
    x, codes, scales, tensor_scale, bias, fmt_id, n, k = inputs
    ctx.save_for_backward(codes, scales, tensor_scale)
    ctx.fmt_id, ctx.k = fmt_id, k
    ctx.has_bias = bias is not None
    ctx.bias_dtype = bias.dtype if bias is not None else None


def _backward(ctx, grad_y):
    codes, scales, tensor_scale = ctx.saved_tensors
    grad_x = grad_bias = None
    if ctx.needs_input_grad[0]:
        w = torch.ops.vbhal.dequantize_fp4_cuda(codes, scales, tensor_scale, ctx.fmt_id, ctx.k, grad_y.dtype)
        grad_x = grad_y @ w
    if ctx.has_bias and ctx.needs_input_grad[4]:
        grad_bias = grad_y.sum(0).to(ctx.bias_dtype)
    return grad_x, None, None, None, grad_bias, None, None, None


_fp4_linear_op.register_autograd(_backward, setup_context=_setup_context)


# ---------------------------------------------------------------------------------------------------
# public kernel
# ---------------------------------------------------------------------------------------------------
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
    codes, scales, ts, fmt_id = qw_operands(qw)
    if os.environ.get("VBHAL_FP4_NATIVE") == "1" and native_fp4_available(x.device):
        return native_fp4_linear(x, qw, bias)
    lead = x.shape[:-1]
    x2 = x.reshape(-1, k)
    if x2.stride(-1) != 1 or (x2.shape[0] > 1 and x2.stride(0) != k):
        x2 = x2.contiguous()
    if x2.shape[0] == 0:
        return x.new_empty((*lead, n))
    y = torch.ops.vbhal.fp4_linear_cuda(x2, codes, scales, ts, bias, fmt_id, n, k)
    return y.reshape(*lead, n)


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
