"""Run a test file again in a subprocess under TRITON_INTERPRET=1 (it must be set before triton is imported).

The interpreter tests of each kernel file skip themselves in the normal process; one wrapper test per file
calls :func:`run_file_under_interpreter` and fails with the subprocess's output if any of them fails.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

INTERP = os.environ.get("TRITON_INTERPRET") == "1"
ROOT = Path(__file__).resolve().parents[3]


def run_file_under_interpreter(test_file: str) -> None:
    if INTERP:
        pytest.skip("already inside the interpreter run")
    pytest.importorskip("triton", reason="triton is not installed")
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", test_file],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=1800)
    tail = (proc.stdout + proc.stderr)[-4000:]
    assert proc.returncode == 0, tail
    assert " passed" in tail and "failed" not in tail, tail
