"""The `vbhal` command: info | estimate | train | generate | bench | conformance | run | demo."""

from __future__ import annotations

import argparse
import json
import os
import platform
import runpy
import sys
from pathlib import Path
from typing import Any, Sequence

from vbhal._table import format_table, human_bytes

_DELEGATED = {
    # subcommand -> (module, help); the module's main(argv) parses its own arguments
    "train": ("vbhal.train.__main__", "train the reference GPT (presets, checkpoints, resume, torchrun)"),
    "generate": ("vbhal.train.generate", "sample text from a trained checkpoint"),
    "estimate": ("vbhal._estimate_cli", "predict memory for a model and plan batch size, optimizations and tiers"),
    "bench": ("vbhal._bench_cli", "run a benchmark script from benchmarks/"),
}


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(prog="vbhal", description="vbhal: Blackwell-class features on your accelerator")
    parser.add_argument("--version", action="store_true", help="print the version and exit")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p_info = sub.add_parser("info", help="versions, devices, plug-ins, tiers and bound kernels")
    p_info.add_argument("--json", action="store_true", help="machine-readable output")
    p_info.add_argument("--device", help="show tiers and kernels for this device (default: the selected one)")

    p_conf = sub.add_parser("conformance", help="run the conformance suite for a device")
    p_conf.add_argument("--device", default=None, help="device to check (default: the selected one)")
    p_conf.add_argument("--report", default=None, help="write a Markdown report of kernel x check to this file")
    p_conf.add_argument("pytest_args", nargs=argparse.REMAINDER, help="extra arguments for pytest (e.g. -k attention)")

    p_run = sub.add_parser("run", help="run an unmodified script with vbhal enabled globally")
    p_run.add_argument("--mode", default=None, help="optimize mode for models built or loaded by the script")
    p_run.add_argument("script", help="the Python script to run")
    p_run.add_argument("args", nargs=argparse.REMAINDER, help="arguments for the script")

    p_demo = sub.add_parser("demo", help="optimize a small built-in model and show the report")
    p_demo.add_argument("--mode", default="balanced")
    p_demo.add_argument("--device", default=None)

    for name, (_module, help_text) in _DELEGATED.items():
        sub.add_parser(name, help=help_text, add_help=False)

    if argv and argv[0] in _DELEGATED:
        return _delegate(argv[0], argv[1:])
    args, unknown = parser.parse_known_args(argv)
    if unknown and args.command != "conformance":
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    if args.version:
        from vbhal import __version__

        print(__version__)
        return 0
    if args.command == "info":
        return cmd_info(as_json=args.json, device=args.device)
    if args.command == "conformance":
        return cmd_conformance(args.device, args.report, unknown + [a for a in args.pytest_args if a != "--"])
    if args.command == "run":
        return cmd_run(args.script, args.args, args.mode)
    if args.command == "demo":
        return cmd_demo(args.mode, args.device)
    parser.print_help()
    return 0


def _delegate(command: str, argv: list[str]) -> int:
    import importlib

    module_name, _ = _DELEGATED[command]
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as e:
        if e.name and e.name.startswith("vbhal"):
            print(f"vbhal {command}: not available in this version ({module_name} is missing)", file=sys.stderr)
            return 2
        raise
    result = module.main(argv)
    return int(result or 0)


# --------------------------------------------------------------------------------------------------- info
def collect_info(device: str | None = None) -> dict[str, Any]:
    """Everything `vbhal info` shows, as data."""
    import torch

    from vbhal import __version__, _sysinfo, hal
    from vbhal.config import mode_table
    from vbhal.errors import VbhalError
    from vbhal.hookspecs import KERNEL_NAMES

    h = hal.get_hal()
    info: dict[str, Any] = {
        "versions": {
            "vbhal": __version__,
            "python": platform.python_version(),
            "torch": torch.__version__,
            "triton": _sysinfo.package_version("triton"),
            "torch_npu": _sysinfo.package_version("torch-npu") or _sysinfo.package_version("torch_npu"),
            "transformers": _sysinfo.package_version("transformers"),
        },
        "devices": [
            {"name": d.name, "backend": d.backend, "description": d.description, "memory": d.total_memory,
             "priority": d.priority, "capabilities": {k: _jsonable(v) for k, v in d.capabilities.items()}}
            for d in h.devices
        ],
        "unavailable": [{"backend": b, "kind": k, "reason": r} for b, k, r in h.absent],
        "plugins": [{"name": n, "origin": o} for n, o in h.loaded],
        "plugin_failures": [f.__dict__ for f in h.failures],
        "modes": mode_table(),
    }
    try:
        sel = h.select(device)
    except VbhalError as e:
        info["selected"] = None
        info["selection_error"] = str(e)
        return info
    info["selected"] = {"device": sel.device.name, "reason": sel.reason}
    info["tiers"] = [
        {"level": t.level, "name": t.name, "kind": t.kind, "capacity": t.capacity_bytes, "pinned": t.pinned,
         "backend": t.backend, "note": t.note}
        for t in h.get_tiers(sel.device)
    ]
    kernels = {}
    for name in KERNEL_NAMES:
        try:
            k = h.get_kernel(name, sel.device)
            entry = {"backend": k.backend, "description": k.description}
            if k.backend != sel.device.backend:
                plugin = h.pm.get_plugin(sel.device.backend)
                reason = getattr(getattr(plugin, "table", None), "unavailable", {}).get(name)
                entry["fallback"] = f"{sel.device.backend} has no own kernel" + (f" ({reason})" if reason else "")
        except VbhalError as e:
            entry = {"backend": None, "description": str(e)}
        kernels[name] = entry
    info["kernels"] = kernels
    info["plugin_failures"] = [f.__dict__ for f in h.failures]
    return info


def _jsonable(v: Any) -> Any:
    return list(v) if isinstance(v, tuple) else v


def cmd_info(as_json: bool = False, device: str | None = None) -> int:
    info = collect_info(device)
    if as_json:
        print(json.dumps(info, indent=2, default=str))
        return 0
    print(format_table(["package", "version"], [(k, v or "not installed") for k, v in info["versions"].items()],
                       title="vbhal info"))
    print()
    rows = [(d["name"], d["backend"], d["description"], human_bytes(d["memory"]), d["priority"],
             ", ".join(f"{k}={v}" for k, v in d["capabilities"].items())) for d in info["devices"]]
    print(format_table(["device", "backend", "description", "memory", "priority", "capabilities"], rows,
                       title="Devices found"))
    if info["unavailable"]:
        print()
        print(format_table(["kind", "backend", "why not available"],
                           [(u["kind"], u["backend"], u["reason"]) for u in info["unavailable"]]))
    print()
    if info.get("selected"):
        print(f"Selected device: {info['selected']['device']} (chosen by {info['selected']['reason']})")
    else:
        print(f"Selected device: none — {info.get('selection_error')}")
    print()
    print(format_table(["plug-in", "origin"], [(p["name"], p["origin"]) for p in info["plugins"]], title="Plug-ins"))
    if info["plugin_failures"]:
        print()
        print(format_table(["plug-in", "stage", "error"],
                           [(f["name"], f["stage"], f["error"]) for f in info["plugin_failures"]],
                           title="Plug-ins skipped (failed)"))
    if "tiers" in info:
        print()
        print(format_table(["level", "tier", "kind", "capacity", "pinned", "backend", "note"],
                           [(t["level"], t["name"], t["kind"], human_bytes(t["capacity"]), t["pinned"], t["backend"],
                             t["note"]) for t in info["tiers"]], title="Memory tiers"))
    if "kernels" in info:
        print()
        print(format_table(["kernel", "backend", "implementation", "fallback"],
                           [(n, k["backend"], k["description"], k.get("fallback", "")) for n, k in
                            info["kernels"].items()], title="Kernels bound for the selected device"))
    print()
    print("Modes (vbhal.optimize(model, mode=...)):")
    print(info["modes"])
    return 0


# --------------------------------------------------------------------------------------------- conformance
def cmd_conformance(device: str | None, report: str | None, extra: list[str]) -> int:
    import pytest

    from vbhal import hal

    name = hal.select_device(device).device.name
    import vbhal.conformance

    suite = Path(vbhal.conformance.__file__).resolve().parent
    # The suite's own pytest.ini, not the caller's configuration, so that it runs the same from any directory.
    args = ["-q", "-c", str(suite / "pytest.ini"), "--rootdir", str(suite), str(suite), f"--vbhal-device={name}"]
    if report:
        args.append(f"--vbhal-report={report}")
    print(f"vbhal conformance: checking device {name}")
    return int(pytest.main(args + extra))


# ---------------------------------------------------------------------------------------------------- run
def cmd_run(script: str, args: list[str], mode: str | None) -> int:
    import vbhal

    path = Path(script)
    if not path.is_file():
        print(f"vbhal run: no such script: {script}", file=sys.stderr)
        return 2
    vbhal.enable(mode=mode)
    old_argv, old_path = sys.argv, list(sys.path)
    sys.argv = [str(path)] + (args[1:] if args[:1] == ["--"] else args)
    sys.path.insert(0, str(path.resolve().parent))
    try:
        runpy.run_path(str(path), run_name="__main__")
    except SystemExit as e:
        code = e.code
        return code if isinstance(code, int) else (0 if code is None else 1)
    finally:
        sys.argv, sys.path[:] = old_argv, old_path
        vbhal.disable()
    return 0


# --------------------------------------------------------------------------------------------------- demo
def cmd_demo(mode: str, device: str | None) -> int:
    """Optimize the tiny reference GPT, run forward and backward, and print the report."""
    import torch

    import vbhal
    from vbhal.train.model import GPT, GPTConfig

    torch.manual_seed(0)
    sel = vbhal.select_device(device)
    model = GPT(GPTConfig.from_preset("tiny")).to(sel.device.device)
    tokens = torch.randint(0, model.config.vocab_size, (2, 64), device=sel.device.device)
    with torch.no_grad():
        before, _ = model(tokens)
    vbhal.optimize(model, mode=mode, device=sel.device)
    logits, loss = model(tokens, tokens)
    loss.backward()
    err = ((logits.detach().float() - before.float()).norm() / before.float().norm()).item()
    print(vbhal.stats(model).format())
    print(f"tiny GPT on {sel.device.name}, mode={mode}: relative difference of the logits to the original model "
          f"{err:.2e}; loss {loss.item():.4f}; backward ran")
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
