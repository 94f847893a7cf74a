"""vbhal's Triton attention on a real GPU, bf16 at real sizes, against a float64 reference.

Each case compares output and dQ, dK, dV with float64 math on the same inputs. The tolerance is
relative to what bf16 itself costs: our error may be at most ``ERR_FACTOR`` x the error of PyTorch
SDPA run in the same dtype on the same inputs (plus a small floor), so the check is tight where
SDPA is exact and fair where bf16 rounding dominates. Every output buffer of the kernels is allocated
filled with NaN (``POISON_OUTPUTS``), so an unwritten element shows up as NaN.

Run with pytest, or directly (``python tests/backends/cuda/test_attention_gpu.py``) on a machine
without pytest: it prints one line per case and exits non-zero on failure.
"""

from __future__ import annotations

import sys
import zlib
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[3]))

try:
    import pytest
except ImportError:  # the GPU image may lack pytest; __main__ below runs the cases
    pytest = None

ERR_FACTOR = 2.0
ERR_FLOOR = {torch.bfloat16: 2e-3, torch.float16: 3e-4}

# (name, B, Hq, Hkv, Sq, Sk, D, causal, dtype)
DENSE_CASES = [
    ("hd128 causal S4096", 2, 16, 16, 4096, 4096, 128, True, torch.bfloat16),
    ("hd128 full S4096", 2, 16, 16, 4096, 4096, 128, False, torch.bfloat16),
    ("hd64 causal S2048 H32", 2, 32, 32, 2048, 2048, 64, True, torch.bfloat16),
    ("hd64 full S2048 H32", 1, 32, 32, 2048, 2048, 64, False, torch.bfloat16),
    ("hd128 GQA4 causal S3001", 2, 16, 4, 3001, 3001, 128, True, torch.bfloat16),
    ("hd64 MQA full S1537", 1, 16, 1, 1537, 1537, 64, False, torch.bfloat16),
    ("hd128 causal Sq1000 Sk3000", 1, 8, 8, 1000, 3000, 128, True, torch.bfloat16),
    ("hd128 full Sq3000 Sk1000", 1, 8, 2, 3000, 1000, 128, False, torch.bfloat16),
    ("hd128 causal fp16 S2048", 1, 16, 16, 2048, 2048, 128, True, torch.float16),
    ("hd64 causal S17", 3, 4, 2, 17, 17, 64, True, torch.bfloat16),
]
# (name, lengths, Hq, Hkv, D, causal)
PACKED_CASES = [
    ("packed hd128 GQA2 causal", [1, 127, 1000, 2049, 4096, 333], 16, 8, 128, True),
    ("packed hd64 full", [64, 3, 1500, 777], 8, 8, 64, False),
]


def _errors(got, ref, base):
    """Max abs error of got and of the SDPA baseline, each against the float64 reference."""
    return (got.double() - ref).abs().max().item(), (base.double() - ref).abs().max().item()


def _poison():
    """Make the kernels allocate every output (O, LSE, delta, dQ, dK, dV) filled with NaN."""
    from vbhal.backends.cuda import attention

    attention.POISON_OUTPUTS = True


def _check(name, got, ref, base, dtype):
    rows = []
    for label, g, r, b in zip(("out", "dq", "dk", "dv"), got, ref, base):
        assert not torch.isnan(g).any(), f"{name}: {label} has NaN (unwritten or wrong)"
        e, eb = _errors(g, r, b)
        scale = r.abs().max().item()
        tol = ERR_FACTOR * eb + ERR_FLOOR[dtype] * max(scale, 1.0)
        rows.append((label, e, eb, tol))
        assert e <= tol, f"{name}: {label} max error {e:.3g} > {tol:.3g} (SDPA {dtype} error {eb:.3g})"
    return rows


def run_dense(name, b, hq, hkv, sq, sk, d, causal, dtype, impl="vbhal", atomic_dq=None):
    from vbhal.backends.cpu.attention import reference_attention
    from vbhal.backends.cuda.attention import flash_attention
    from vbhal.backends.cuda.attention_dispatch import attention as dispatch
    import torch.nn.functional as F

    fn = flash_attention if impl == "vbhal" else dispatch
    _atomic(atomic_dq)
    g = torch.Generator(device="cuda").manual_seed(zlib.crc32(name.encode()))
    q = torch.randn(b, hq, sq, d, device="cuda", dtype=dtype, generator=g)
    k = torch.randn(b, hkv, sk, d, device="cuda", dtype=dtype, generator=g)
    v = torch.randn(b, hkv, sk, d, device="cuda", dtype=dtype, generator=g)
    do = torch.randn(b, hq, sq, d, device="cuda", dtype=dtype, generator=g)
    results = []
    for args in ((q, k, v),):
        leaves = [t.clone().requires_grad_() for t in args]
        _poison()
        out = fn(*leaves, causal=causal)
        out.backward(do)
        got = [out.detach()] + [t.grad for t in leaves]
        ref_leaves = [t.double().requires_grad_() for t in args]
        ref = reference_attention(*ref_leaves, causal=causal)
        ref.backward(do.double())
        ref_all = [ref.detach()] + [t.grad for t in ref_leaves]
        base_leaves = [t.clone().requires_grad_() for t in args]
        kw = {"enable_gqa": True} if hq != hkv else {}
        base = F.scaled_dot_product_attention(*base_leaves, is_causal=causal, **kw)
        base.backward(do)
        base_all = [base.detach()] + [t.grad for t in base_leaves]
        results = _check(name, got, ref_all, base_all, dtype)
        del ref_all, ref_leaves, ref
    return results


def _atomic(flag, var="VBHAL_ATTN_ATOMIC_DQ"):
    import os

    if flag is None:
        os.environ.pop(var, None)
    else:
        os.environ[var] = "1" if flag else "0"


def run_tma(*case):
    """The TMA-descriptor forward (sm_90+) on the same checks."""
    _atomic(True, "VBHAL_ATTN_TMA")
    try:
        return run_dense(*case)
    finally:
        _atomic(None, "VBHAL_ATTN_TMA")


def run_pipe(*case, tma=False):
    """The forward whose unmasked loop overlaps the next q @ k^T with the softmax (VBHAL_ATTN_PIPE=1)."""
    import os

    _atomic(True, "VBHAL_ATTN_PIPE")
    _atomic(tma, "VBHAL_ATTN_TMA")
    # 128x64 blocks: the sweep's pipe candidate (128x128 with pipe needs more shared memory than sm_90 has)
    os.environ["VBHAL_ATTN_CONFIG"] = "fwd=128,64,8,3;fwd_tma=128,64,8,3"
    try:
        return run_dense(*case)
    finally:
        _atomic(None, "VBHAL_ATTN_PIPE")
        _atomic(None, "VBHAL_ATTN_TMA")
        os.environ.pop("VBHAL_ATTN_CONFIG", None)


def run_packed(name, lens, hq, hkv, d, causal, dtype=torch.bfloat16, atomic_dq=None):
    from vbhal.backends.cpu.attention import attention as per_document, reference_attention
    from vbhal.backends.cuda.attention import flash_attention

    _atomic(atomic_dq)
    t = sum(lens)
    cu = torch.tensor([0] + torch.tensor(lens).cumsum(0).tolist(), dtype=torch.int32, device="cuda")
    g = torch.Generator(device="cuda").manual_seed(len(name))
    q = torch.randn(t, hq, d, device="cuda", dtype=dtype, generator=g)
    k = torch.randn(t, hkv, d, device="cuda", dtype=dtype, generator=g)
    v = torch.randn(t, hkv, d, device="cuda", dtype=dtype, generator=g)
    do = torch.randn(t, hq, d, device="cuda", dtype=dtype, generator=g)
    leaves = [x.clone().requires_grad_() for x in (q, k, v)]
    _poison()
    out = flash_attention(*leaves, causal=causal, cu_seqlens=cu)
    out.backward(do)
    got = [out.detach()] + [x.grad for x in leaves]
    ref_leaves = [x.double().requires_grad_() for x in (q, k, v)]
    ref = reference_attention(*ref_leaves, causal=causal, cu_seqlens=cu)
    ref.backward(do.double())
    base_leaves = [x.clone().requires_grad_() for x in (q, k, v)]
    base = per_document(*base_leaves, causal=causal, cu_seqlens=cu)
    base.backward(do)
    return _check(name, got, [ref.detach()] + [x.grad for x in ref_leaves],
                  [base.detach()] + [x.grad for x in base_leaves], dtype)


def run_nan():
    """A NaN in one key of one document poisons exactly the rows that see it, as in the reference."""
    from vbhal.backends.cuda.attention import flash_attention

    q, k, v = (torch.randn(1, 2, 300, 128, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    k[0, 0, 150, 3] = float("nan")
    out = flash_attention(q, k, v, causal=True)
    rows_nan = torch.isnan(out[0, 0]).any(-1)
    assert rows_nan[150:].all() and not rows_nan[:150].any(), "NaN in key 150 must reach rows >= 150 only"
    assert not torch.isnan(out[0, 1]).any()
    return [("nan", 0.0, 0.0, 0.0)]


def run_compile():
    """torch.compile(fullgraph=True) traces the custom op, forward and backward."""
    from vbhal.backends.cuda.attention import flash_attention

    def f(q, k, v):
        return flash_attention(q, k, v, causal=True).float().square().sum()

    q, k, v = (torch.randn(2, 8, 512, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
    compiled = torch.compile(f, fullgraph=True)
    lc = compiled(q, k, v)
    lc.backward()
    gc = [t.grad.clone() for t in (q, k, v)]
    for t in (q, k, v):
        t.grad = None
    le = f(q, k, v)
    le.backward()
    assert torch.allclose(lc, le, rtol=1e-3)
    for a, b in zip(gc, (q.grad, k.grad, v.grad)):
        # the compiled graph may round the incoming gradient differently (bf16), nothing more
        assert (a.float() - b.float()).abs().max() <= 1e-2 * b.float().abs().max()
    return [("compile", 0.0, 0.0, 0.0)]


if pytest is not None:
    gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (bf16 checks at real sizes)")

    @gpu
    @pytest.mark.parametrize("case", DENSE_CASES, ids=[c[0] for c in DENSE_CASES])
    def test_dense_matches_float64(case):
        run_dense(*case)

    @gpu
    @pytest.mark.parametrize("case", [DENSE_CASES[i] for i in (0, 1, 4)], ids=[DENSE_CASES[i][0] for i in (0, 1, 4)])
    def test_dispatcher_matches_float64(case):
        run_dense(*case, impl="dispatch")

    @gpu
    @pytest.mark.parametrize("case", PACKED_CASES, ids=[c[0] for c in PACKED_CASES])
    def test_packed_matches_float64(case):
        run_packed(*case)

    @gpu
    @pytest.mark.parametrize("atomic", [False, True])
    def test_both_dq_schemes_match_float64(atomic):
        run_dense(*DENSE_CASES[4], atomic_dq=atomic)
        run_packed(*PACKED_CASES[0], atomic_dq=atomic)

    @gpu
    @pytest.mark.parametrize("case", [DENSE_CASES[0], DENSE_CASES[4], DENSE_CASES[6]], ids=["causal", "gqa-odd", "sq<sk"])
    def test_tma_forward_matches_float64(case):
        run_tma(*case)

    @gpu
    @pytest.mark.parametrize("tma", [False, True])
    @pytest.mark.parametrize("case", [DENSE_CASES[0], DENSE_CASES[2], DENSE_CASES[4]], ids=["causal", "hd64", "gqa-odd"])
    def test_pipelined_forward_matches_float64(case, tma):
        run_pipe(*case, tma=tma)

    @gpu
    def test_nan_in_key_propagates_to_rows_that_see_it():
        run_nan()

    @gpu
    def test_torch_compile_fullgraph():
        run_compile()


def _with_env(env: dict, fn, *args):
    """Run fn with environment overrides (the launcher reads VBHAL_ATTN_* at each call), then restore."""
    import os

    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        return fn(*args)
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    quick = "--quick" in argv or "--minimal" in argv  # skip the off-by-default variants
    if not torch.cuda.is_available():
        print("no CUDA device")
        return 0
    print(f"# attention correctness on {torch.cuda.get_device_name(0)}: max abs error vs float64 "
          f"(ours | SDPA same dtype | tolerance)")
    jobs = [(c[0], run_dense, c) for c in DENSE_CASES]
    jobs += [("dispatch " + c[0], lambda *a: run_dense(*a, impl="dispatch"), c) for c in DENSE_CASES[:2]]
    jobs += [(c[0], run_packed, c) for c in PACKED_CASES]
    jobs += [("dispatch " + DENSE_CASES[4][0], lambda *a: run_dense(*a, impl="dispatch"), DENSE_CASES[4])]
    if not quick:
        jobs += [("tma " + c[0], run_tma, c) for c in (DENSE_CASES[0], DENSE_CASES[4], DENSE_CASES[6])]
    for flag in (() if quick else (False, True)):
        jobs += [(f"atomic_dq={flag} " + DENSE_CASES[4][0], lambda *a, f=flag: run_dense(*a, atomic_dq=f), DENSE_CASES[4]),
                 (f"atomic_dq={flag} " + PACKED_CASES[0][0], lambda *a, f=flag: run_packed(*a, atomic_dq=f),
                  PACKED_CASES[0]),
                 (f"atomic_dq={flag} " + DENSE_CASES[0][0], lambda *a, f=flag: run_dense(*a, atomic_dq=f), DENSE_CASES[0])]
    # forward variants the tuning sweep times (tune_attention.py): they must be right to be worth timing
    jobs += [("pipe " + DENSE_CASES[0][0], run_pipe, DENSE_CASES[0]),
             ("pipe " + DENSE_CASES[2][0], run_pipe, DENSE_CASES[2]),
             ("pipe tma " + DENSE_CASES[4][0], lambda *a: run_pipe(*a, tma=True), DENSE_CASES[4]),
             ("tma " + DENSE_CASES[0][0], run_tma, DENSE_CASES[0])]
    # L2 sections of one (batch, head) pair each (the default 32 MiB makes 2 sections of 16 here)
    jobs += [("l2 1pair " + DENSE_CASES[0][0], lambda *a: _with_env({"VBHAL_ATTN_L2_MB": "1"}, run_dense, *a),
              DENSE_CASES[0])]
    jobs += [("nan propagation", lambda: run_nan(), ()), ("torch.compile", lambda: run_compile(), ())]
    if "--minimal" in argv:  # the final round: one case of each kind, the full set ran in earlier rounds
        keep = {DENSE_CASES[0][0], DENSE_CASES[3][0], DENSE_CASES[4][0], DENSE_CASES[9][0], PACKED_CASES[0][0],
                "dispatch " + DENSE_CASES[4][0], "nan propagation", "pipe " + DENSE_CASES[0][0],
                "pipe tma " + DENSE_CASES[4][0], "l2 1pair " + DENSE_CASES[0][0]}
        jobs = [j for j in jobs if j[0] in keep]
    failed = 0
    for name, fn, case in jobs:
        try:
            rows = fn(*case)
            cells = "  ".join(f"{l}:{e:.2e}|{eb:.2e}|{t:.1e}" for l, e, eb, t in rows if l not in ("nan", "compile"))
            print(f"PASS {name:32s} {cells}", flush=True)
        except Exception as e:  # report every case, then fail
            failed += 1
            print(f"FAIL {name:32s} {type(e).__name__}: {str(e)[:300]}", flush=True)
        torch.cuda.empty_cache()
        _atomic(None)
    print(f"{len(jobs) - failed} passed, {failed} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
