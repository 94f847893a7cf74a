"""CONTRACT TESTS of the NPU probe (vbhal/backends/npu/__init__.py) with stand-in torch_npu modules.

Run in subprocesses: one renames torch's PrivateUse1 backend to "npu" (irreversible in a process, so never
in the test process, see shared/NPU.md), the other imports a torch_npu that fails as torch-npu does
without the CANN toolkit. They check what the probe reports, not an Ascend NPU.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[2]


def _run(code: str, extra_path: Path | None = None, env_extra: dict | None = None) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("TORCH_DEVICE_BACKEND_AUTOLOAD",)}
    paths = [str(REPO), str(HERE)] + ([str(extra_path)] if extra_path else [])
    env["PYTHONPATH"] = os.pathsep.join(paths + [env.get("PYTHONPATH", "")])
    env["VBHAL_DISABLE_PLUGIN_AUTOLOAD"] = "1"
    env.update(env_extra or {})
    out = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, env=env,
                         timeout=120, check=False)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])




def test_probe_reports_chip_and_fp4_native_with_a_working_torch_npu():
    res = _run("""
        import json, sys, torch
        import fake_torch_npu
        torch.utils.rename_privateuse1_backend("npu")      # what torch_npu does on import
        sys.modules["torch_npu"] = fake_torch_npu.make_module()
        import importlib.machinery
        sys.modules["torch_npu"].__spec__ = importlib.machinery.ModuleSpec("torch_npu", None)
        torch.npu = fake_torch_npu.make_torch_npu_namespace("Ascend950PR")
        torch.npu.mem_get_info = lambda i: (10 << 30, 64 << 30)
        from vbhal.backends.npu import plugin
        found, absent = [], []
        class R:
            add = staticmethod(found.append)
            absent = staticmethod(lambda kind, reason: absent.append(reason))
        plugin.vbhal_probe(R())
        d = found[0]
        print(json.dumps(dict(n=len(found), absent=absent, name=d.name, caps=d.capabilities, dev=str(d.torch_device),
                              mem=d.total_memory)))
    """)
    assert res["n"] == 1 and not res["absent"]
    assert res["name"] == "npu:0" and res["dev"] == "npu:0" and res["mem"] == 64 << 30
    assert res["caps"]["chip"] == "950" and res["caps"]["fp4_native"] is True


def test_probe_survives_torch_npu_without_cann(tmp_path):
    pkg = tmp_path / "torch_npu"
    pkg.mkdir()
    # What torch-npu 2.13 does without the Ascend toolkit: set autoload off, then fail on libhccl.so.
    (pkg / "__init__.py").write_text(
        "import os\n"
        "os.environ['TORCH_DEVICE_BACKEND_AUTOLOAD'] = '0'\n"
        "raise ImportError('libhccl.so: cannot open shared object file: No such file or directory')\n"
    )
    res = _run("""
        import json, os
        from vbhal.backends.npu import plugin
        absent = []
        class R:
            add = staticmethod(lambda d: (_ for _ in ()).throw(AssertionError("no device expected")))
            absent = staticmethod(lambda kind, reason: absent.append((kind, reason)))
        plugin.vbhal_probe(R())
        print(json.dumps(dict(absent=absent, autoload=os.environ.get("TORCH_DEVICE_BACKEND_AUTOLOAD"))))
    """, extra_path=tmp_path)
    (kind, reason), = res["absent"]
    assert kind == "npu" and "libhccl.so" in reason and "CANN" in reason
    assert res["autoload"] is None  # the failed import's TORCH_DEVICE_BACKEND_AUTOLOAD=0 was undone


def test_kernel_modules_import_without_torch_npu():
    res = _run("""
        import json, sys
        import vbhal.backends.npu.attention, vbhal.backends.npu.fp4
        print(json.dumps(dict(loaded="torch_npu" in sys.modules)))
    """)
    assert res["loaded"] is False


_REAL_SITE = os.environ.get("VBHAL_TEST_TORCH_NPU_SITE")


@pytest.mark.skipif(not _REAL_SITE, reason="optional: set VBHAL_TEST_TORCH_NPU_SITE to a folder holding the real "
                    "torch-npu wheel's files (unzipped, never installed into this venv) to check the CANN trap")
def test_real_torch_npu_wheel_without_cann():
    """The real torch-npu wheel beside this torch, no CANN toolkit: `import torch` fails through autoload,
    and with TORCH_DEVICE_BACKEND_AUTOLOAD=0 the probe reports the missing runtime."""
    env = {k: v for k, v in os.environ.items() if k != "TORCH_DEVICE_BACKEND_AUTOLOAD"}
    env["PYTHONPATH"] = os.pathsep.join([_REAL_SITE, str(REPO)])
    plain = subprocess.run([sys.executable, "-c", "import torch"], capture_output=True, text=True, env=env,
                           timeout=120, check=False)
    assert plain.returncode != 0 and "Failed to load the backend extension: torch_npu" in plain.stderr
    res = _run("""
        import json, os
        from vbhal.backends.npu import plugin
        absent = []
        class R:
            add = staticmethod(lambda d: (_ for _ in ()).throw(AssertionError("no device expected")))
            absent = staticmethod(lambda kind, reason: absent.append(reason))
        plugin.vbhal_probe(R())
        print(json.dumps(dict(absent=absent, autoload=os.environ.get("TORCH_DEVICE_BACKEND_AUTOLOAD"))))
    """, extra_path=Path(_REAL_SITE), env_extra={"TORCH_DEVICE_BACKEND_AUTOLOAD": "0"})
    (reason,) = res["absent"]
    assert "libhccl.so" in reason and "CANN" in reason and res["autoload"] == "0"
