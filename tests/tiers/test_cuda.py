"""The tier stack and offloaded training on a real accelerator (streams, events, pinned memory).

Run with pytest, or directly (``python tests/tiers/test_cuda.py``) where pytest is missing: one line per
case, non-zero exit on failure.
"""

from __future__ import annotations

import copy
import random
import threading

import torch
from torch import nn

from vbhal.conformance._reference import autocast_loss, split_adamw_reference
from vbhal.tiers import Tier, TierStack

try:
    import pytest

    pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (streams, pinned memory)")
    _parametrize = pytest.mark.parametrize
except ImportError:  # the GPU image may lack pytest: __main__ below runs the cases
    pytest = None

    def _parametrize(name, values):
        def deco(fn):
            fn.cases = values
            return fn

        return deco

MB = 1 << 20


def _val(i: int, n: int) -> torch.Tensor:
    return torch.randn(n, generator=torch.Generator().manual_seed(i))


def test_cuda_stack_stress_prefetch_and_compute(tmp_path):
    n_keys, numel = 24, 256 * 1024  # 1 MiB each
    tiers = [
        Tier("gpu", 0, torch.device("cuda"), 6 * MB),
        Tier("pinned host", 1, torch.device("cpu"), 10 * MB, kind="host", pinned=True),
        Tier("disk", 2, torch.device("cpu"), 1 << 30, kind="disk"),
    ]
    st = TierStack(tiers, spill_root=tmp_path, workers=3)
    expected = {}
    for i in range(n_keys):
        expected[i] = _val(i, numel)
        st.register(i, expected[i])
    stop = threading.Event()
    errors = []

    def prefetcher(seed):
        rng = random.Random(seed)
        while not stop.is_set():
            try:
                st.prefetch(rng.randrange(n_keys))
            except Exception as e:  # noqa: BLE001
                if "nothing in it can move down" not in str(e):
                    errors.append(e)

    threads = [threading.Thread(target=prefetcher, args=(s,)) for s in range(2)]
    for t in threads:
        t.start()
    rng = random.Random(0)
    try:
        for _ in range(200):
            k = rng.randrange(n_keys)
            t = st.access(k, pin=True)
            # long-running kernel on the compute stream reading and writing the tensor
            t.mul_(1.0).add_(1.0)
            for _ in range(3):
                t.copy_(torch.sin(t) * 0 + t)
            expected[k] = expected[k] + 1.0
            st.unpin(k)
    finally:
        stop.set()
        for t in threads:
            t.join()
    assert not errors, errors[:3]
    torch.cuda.synchronize()
    for k in range(n_keys):
        torch.testing.assert_close(st.access(k).cpu(), expected[k], rtol=0, atol=1e-5)
    st.check_consistency()
    assert st.pool.pinned_bytes > 0
    st.close()


class _Net(nn.Module):
    def __init__(self, d=256, n=5):
        super().__init__()
        self.blocks = nn.ModuleList([nn.Sequential(nn.LayerNorm(d), nn.Linear(d, 4 * d), nn.GELU(), nn.Linear(4 * d, d)) for _ in range(n)])
        self.head = nn.Linear(d, 1)

    def forward(self, x):
        for b in self.blocks:
            x = x + b(x)
        return self.head(x).float().pow(2).mean()


@_parametrize("mode", [{}, {"checkpoint": False}, {"offload_activations": True, "chunks": 2}])
def test_cuda_offload_bf16_autocast_matches_plain(mode):
    from vbhal.nn.offload import apply_offload

    torch.manual_seed(0)
    base = _Net()
    xs = [torch.randn(64, 256, device="cuda") for _ in range(8)]
    # ordinary GPU training whose AdamW runs on fp32 CPU copies with torch's fused CPU kernel: the engine's
    # arithmetic, so the losses must agree exactly
    lp, _ = split_adamw_reference(base, xs, autocast_loss("cuda"), "cuda", 1e-3)
    off = copy.deepcopy(base)
    eng = apply_offload(off, device="cuda", lr=1e-3, work_dtype=torch.bfloat16, poison=True, **mode)
    lo = []
    for x in xs:
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = off(x)
        loss.backward()
        eng.step()
        lo.append(loss.item())
    if mode.get("chunks", 1) > 1:
        # two row chunks: the weight gradient is two bf16 matmuls summed in fp32 instead of one
        torch.testing.assert_close(torch.tensor(lo), torch.tensor(lp), rtol=2e-2, atol=1e-3)
    else:
        assert lo == lp, (lo, lp)
    assert eng.pool.pinned_bytes > 0
    eng.close()


def main() -> int:
    import tempfile
    import time
    import traceback
    from pathlib import Path

    if not torch.cuda.is_available():
        print("SKIP: needs a CUDA device")
        return 0
    failed = 0
    cases = [("stack stress", lambda: test_cuda_stack_stress_prefetch_and_compute(Path(tempfile.mkdtemp())))]
    for mode in [{}, {"checkpoint": False}, {"offload_activations": True, "chunks": 2}]:
        cases.append((f"offload {mode}", lambda mode=mode: test_cuda_offload_bf16_autocast_matches_plain(mode)))
    for name, fn in cases:
        t0 = time.perf_counter()
        try:
            fn()
            print(f"PASS {name} ({time.perf_counter() - t0:.1f} s)", flush=True)
        except Exception as e:  # noqa: BLE001 - one line per case: the round's log keeps only its tail
            failed += 1
            where = traceback.extract_tb(e.__traceback__)[-1]
            msg = " ".join(str(e).split())[:400]
            print(f"FAIL {name}: {type(e).__name__} at {where.filename.split('/')[-1]}:{where.lineno}: {msg}", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
