"""The `vbhal` command line: info (text and JSON), demo, delegation and errors."""

import json
import subprocess
import sys

from vbhal.cli import main


def test_info_text(capsys):
    assert main(["info", "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    for fragment in ("vbhal info", "torch", "Devices found", "cpu", "Selected device: cpu", "Plug-ins",
                     "Memory tiers", "Kernels bound", "attention", "Modes"):
        assert fragment in out, fragment


def test_info_json(capsys):
    assert main(["info", "--json", "--device", "cpu"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["selected"]["device"] == "cpu"
    assert {"cuda", "npu", "cpu"} <= {p["name"] for p in info["plugins"]}
    assert set(info["kernels"]) == {"quantize_fp4", "dequantize_fp4", "fp4_linear", "attention"}
    assert all(k["backend"] == "cpu" for k in info["kernels"].values())
    assert info["tiers"][0]["level"] == 0


def test_info_for_absent_device_says_what_was_found(capsys):
    assert main(["info", "--device", "cuda:7"]) == 0
    assert "not found" in capsys.readouterr().out


def test_demo_runs(capsys):
    assert main(["demo", "--mode", "speed", "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert "mode=speed" in out and "backward ran" in out


def test_version_and_help():
    out = subprocess.run([sys.executable, "-m", "vbhal.cli", "--version"], capture_output=True, text=True)
    assert out.stdout.strip() == __import__("vbhal").__version__
    out = subprocess.run([sys.executable, "-m", "vbhal.cli", "--help"], capture_output=True, text=True)
    for cmd in ("info", "estimate", "train", "bench", "conformance", "run"):
        assert cmd in out.stdout


def test_bench_lists_and_rejects_unknown(capsys):
    assert main(["bench", "no_such_benchmark"]) == 2
    assert "available" in capsys.readouterr().err
