"""The example third-party backend, installed for real with pip, is found through its entry point,
selectable with VBHAL_DEVICE, binds its kernel in optimize and passes the conformance suite; autoload
can be turned off; a broken plug-in is skipped and reported."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = ROOT / "examples"


def _pip_install(target: Path, *paths: Path) -> None:
    cmd = [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation", "--target", str(target)]
    out = subprocess.run(cmd + [str(p) for p in paths], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr


@pytest.fixture(scope="module")
def plugin_env(tmp_path_factory):
    target = tmp_path_factory.mktemp("site")
    _pip_install(target, EXAMPLES / "plugin-backend", EXAMPLES / "plugin-broken")
    env = {k: v for k, v in os.environ.items() if not k.startswith("VBHAL_")}
    env["PYTHONPATH"] = os.pathsep.join([str(target), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    return env


def _run(env, *args, timeout=300):
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, env=env, timeout=timeout)


def test_plugin_is_discovered_and_broken_one_reported(plugin_env):
    out = _run(plugin_env, "-m", "vbhal.cli", "info", "--json")
    assert out.returncode == 0, out.stderr
    info = json.loads(out.stdout)
    devices = [d["name"] for d in info["devices"]]
    assert devices.index("exampledev:0") < devices.index("cpu")  # plug-ins rank above the CPU (below cuda/npu)
    assert info["selected"]["device"] == devices[0]
    if devices[0] == "exampledev:0":
        assert info["kernels"]["attention"]["backend"] == "exampledev"
        assert info["kernels"]["fp4_linear"]["backend"] == "cpu" and "fallback" in info["kernels"]["fp4_linear"]
    failures = {f["name"]: f for f in info["plugin_failures"]}
    assert failures["broken"]["stage"] == "load" and "libexampledriver.so" in failures["broken"]["error"]
    text = _run(plugin_env, "-m", "vbhal.cli", "info").stdout
    assert "Plug-ins skipped (failed)" in text and "exampledev" in text


def test_plugin_selectable_and_its_kernel_bound_by_optimize(plugin_env):
    code = (
        "import torch, vbhal\n"
        "from vbhal.train.model import GPT, GPTConfig\n"
        "m = GPT(GPTConfig(vocab_size=64, hidden_size=32, num_layers=2, num_heads=2, seq_length=16))\n"
        "vbhal.optimize(m, mode='speed')\n"
        "r = vbhal.stats(m)\n"
        "m(torch.randint(0, 64, (1, 8)))\n"
        "print(r.device, r.device_reason, r.kernels['attention'])\n"
    )
    env = dict(plugin_env, VBHAL_DEVICE="exampledev")
    out = _run(env, "-c", code)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("exampledev:0 environment variable VBHAL_DEVICE exampledev:"), out.stdout


def test_autoload_can_be_turned_off(plugin_env):
    env = dict(plugin_env, VBHAL_DISABLE_PLUGIN_AUTOLOAD="1")
    info = json.loads(_run(env, "-m", "vbhal.cli", "info", "--json").stdout)
    names = [d["name"] for d in info["devices"]]
    assert "exampledev:0" not in names and "cpu" in names and not info["plugin_failures"]


def test_strict_mode_refuses_the_broken_plugin(plugin_env):
    env = dict(plugin_env, VBHAL_STRICT_PLUGINS="1")
    out = _run(env, "-m", "vbhal.cli", "info")
    assert out.returncode != 0 and "plug-in 'broken' failed during load" in out.stderr


@pytest.mark.slow
def test_plugin_passes_the_conformance_suite(plugin_env, tmp_path):
    report = tmp_path / "exampledev.md"
    out = _run(plugin_env, "-m", "vbhal.cli", "conformance", "--device", "exampledev", "--report", str(report),
               timeout=900)
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-2000:]
    text = report.read_text()
    assert "exampledev:0" in text and "FAIL" not in text and "| attention |" in text


@pytest.mark.slow
def test_conformance_runs_from_a_wheel_install(tmp_path):
    wheels = tmp_path / "wheels"
    out = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w",
                          str(wheels), str(ROOT)], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    (wheel,) = wheels.glob("vbhal-*.whl")
    site = tmp_path / "site"
    _pip_install(site, wheel)
    env = {k: v for k, v in os.environ.items() if not k.startswith("VBHAL_")}
    env["PYTHONPATH"] = str(site)
    where = subprocess.run([sys.executable, "-c", "import vbhal; print(vbhal.__file__)"], capture_output=True,
                           text=True, env=env, cwd=tmp_path)
    assert where.stdout.startswith(str(site)), where.stdout + where.stderr  # the wheel, not the source tree
    report = tmp_path / "cpu.md"
    out = subprocess.run([sys.executable, "-m", "vbhal.cli", "conformance", "--device", "cpu", "--report",
                          str(report)], capture_output=True, text=True, env=env, cwd=tmp_path, timeout=900)
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-2000:]
    assert "FAIL" not in report.read_text()
