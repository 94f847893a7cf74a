"""benchmarks/bench_offload.py --smoke: every part's code path on CPU at toy sizes (no timing is read), so a
benchmark that would crash or hang on the GPU machine fails here first."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_offload_benchmark_parts_run_on_cpu(tmp_path):
    out = tmp_path / "offload-smoke.json"
    parts = ["check", "capacity", "largest", "peers", "hoststep"]
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "bench_offload.py"), *parts, "--smoke", "--steps", "2",
         "--hoststep-params", "1000000", "--out", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    res = json.loads(out.read_text())
    for p in parts:
        assert p in res and "error" not in res[p], (p, res.get(p))
    assert res["check"]["pass"] is True
    cap = res["capacity"]
    assert cap["rows"][-1]["peer"] == "vbhal offload" and cap["rows"][-1]["status"] == "ok"
    lg = res["largest"]
    assert lg["status"] == "ok" and len(lg["rows"]) == 2
    assert all(math.isfinite(r["loss"]) for r in lg["rows"])
    # the toy plan keeps one block's state in RAM: the rest went through the disk tier and back
    assert sum(r["disk_read_GB"] for r in lg["rows"]) > 0
