"""benchmarks/bench_offload.py --smoke: every part's code path on CPU at toy sizes (no timing is read), so a
benchmark that would crash or hang on the GPU machine fails here first."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def test_offload_benchmark_parts_run_on_cpu(tmp_path):
    out = tmp_path / "offload-smoke.json"
    parts = ["check", "speed", "capacity", "largest", "peers", "hoststep"]
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "bench_offload.py"), *parts, "--smoke", "--steps", "2",
         "--hoststep-params", "1000000", "--tokens", "64", "--host-only-tokens", "", "--out", str(out)],
        check=False, cwd=ROOT, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    res = json.loads(out.read_text())
    for p in parts:
        assert p in res and "error" not in res[p], (p, res.get(p))
    assert res["check"]["pass"] is True
    vb = [r for r in res["speed"]["rows"] if r["peer"].startswith("vbhal")]
    assert vb and vb[0]["status"] == "ok" and vb[0]["schedule_bound"]["bound_s"] > 0
    cap = res["capacity"]
    assert cap["rows"][-1]["peer"] == "vbhal offload" and cap["rows"][-1]["status"] == "ok"
    lg = res["largest"]
    assert lg["status"] == "ok" and len(lg["rows"]) == 2
    assert all(math.isfinite(r["loss"]) for r in lg["rows"])
    # the toy plan keeps one block's state in RAM: the rest went through the disk tier and back
    assert sum(r["disk_read_GB"] for r in lg["rows"]) > 0


def _bench():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import bench_offload

    return bench_offload


def test_schedule_bound_arithmetic():
    b = _bench()
    rates = {"up": 50e9, "down": 50e9, "both": 100e9}
    # Host-bound machine: 2e9 params, all on the host at 1 s per 1e9 -> moving a share f to the device costs
    # 12 f N up and 14 f N down; the optimum balances the host against the copies.
    row = {"params": 2e9, "gpu_step_fraction": 0.0, "host_adamw_s_per_step": 2.0,
           "GB_by_kind": {"weights_up": 8.0, "acts_up": 1.0, "acts_down": 1.0}}
    r = b.schedule_bound(row, 0.5, rates)
    f = r["bound_fraction"]
    parts = r["bound_parts_s"]
    assert r["host_s_per_Bparams"] == pytest.approx(1.0)
    assert parts["host"] == pytest.approx((1 - f) * 2.0)
    assert parts["up"] == pytest.approx((9e9 + 12 * f * 2e9) / 50e9)
    assert parts["down"] == pytest.approx((1e9 + 2 * (1 - f) * 2e9 + 14 * f * 2e9) / 50e9)
    assert r["bound_s"] == max(parts.values())
    # the chosen share is optimal on the grid: one step either way is no better
    for g in (f - 0.01, f + 0.01):
        if 0 <= g <= 1:
            other = max((1 - g) * 2.0, 0.5, (9e9 + 24 * g * 1e9) / 50e9, (1e9 + 4 * (1 - g) * 1e9 + 28 * g * 1e9) / 50e9,
                        (10e9 + 4 * (1 - g) * 1e9 + 52 * g * 1e9) / 100e9)
            assert other >= r["bound_s"] - 1e-12
    assert r["ratio_bound"] == r["bound_s"] / 0.5
    # A fast host: the bound is the device compute itself (ratio 1)
    fast = dict(row, host_adamw_s_per_step=0.1)
    assert b.schedule_bound(fast, 0.5, rates)["bound_by"] == "compute"
    # Nothing stepped on the host, or nothing measured: no bound
    assert b.schedule_bound(dict(row, gpu_step_fraction=1.0), 0.5, rates) is None
    assert b.schedule_bound(dict(row, host_adamw_s_per_step=None), 0.5, rates) is None
