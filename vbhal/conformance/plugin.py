"""pytest plug-in behind ``vbhal conformance``: the device option, fixtures, and the Markdown report.

``vbhal conformance`` loads it through the suite's own ``conftest.py``. A backend author who wants the
fixtures in their own suite adds ``-p vbhal.conformance.plugin`` (or ``pytest_plugins = ["vbhal.conformance.plugin"]``
in their root conftest).
"""

from __future__ import annotations

import datetime
import platform
from dataclasses import dataclass
from pathlib import Path

import pytest


@dataclass
class CheckResult:
    kernel: str
    check: str
    measured: str
    tolerance: str
    passed: bool


_RESULTS: list[CheckResult] = []


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("vbhal", "vbhal conformance")
    group.addoption("--vbhal-device", default=None, help="device the conformance suite checks (default: selected)")
    group.addoption("--vbhal-report", default=None, help="write a Markdown table of kernel x check to this file")


@pytest.fixture(scope="session")
def vbhal_device(request: pytest.FixtureRequest):
    """The DeviceInfo under test."""
    from vbhal import hal

    return hal.select_device(request.config.getoption("--vbhal-device")).device


@pytest.fixture(scope="session")
def vbhal_kernel(vbhal_device):
    """A function name -> the Kernel bound for the device under test."""
    from vbhal import hal

    return lambda name: hal.get_hal().get_kernel(name, vbhal_device)


@pytest.fixture
def record():
    """Record a measured check for the report: record(kernel, check, measured, tolerance, passed)."""

    def _record(kernel: str, check: str, measured: float | str, tolerance: float | str, passed: bool) -> None:
        m = f"{measured:.3g}" if isinstance(measured, float) else str(measured)
        t = f"{tolerance:.3g}" if isinstance(tolerance, float) else str(tolerance)
        _RESULTS.append(CheckResult(kernel, check, m, t, bool(passed)))

    return _record


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    path = session.config.getoption("--vbhal-report", default=None)
    if not path:
        return
    Path(path).write_text(format_report(session, exitstatus))


def format_report(session: pytest.Session, exitstatus: int) -> str:
    import torch

    from vbhal import __version__, hal

    device = session.config.getoption("--vbhal-device")
    try:
        info = hal.select_device(device).device
        desc = f"{info.name} — {info.description} (backend {info.backend})"
    except Exception as e:  # report even when selection failed
        desc = f"{device}: {e}"
    passed = sum(r.passed for r in _RESULTS)
    lines = [
        f"# vbhal conformance report: {desc}",
        "",
        f"- vbhal {__version__}, torch {torch.__version__}, Python {platform.python_version()}",
        f"- generated {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M UTC} by "
        f"`vbhal conformance --device {device} --report ...`",
        f"- {passed} of {len(_RESULTS)} measured checks passed; pytest exit status {int(exitstatus)}",
        "",
        "| kernel | check | measured error | tolerance | result |",
        "|---|---|---|---|---|",
    ]
    for r in _RESULTS:
        lines.append(f"| {r.kernel} | {r.check} | {r.measured} | {r.tolerance} | {'pass' if r.passed else 'FAIL'} |")
    return "\n".join(lines) + "\n"
