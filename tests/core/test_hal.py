"""The HAL runtime: device selection, guarded plug-ins, kernel resolution and fallback."""

import sys
import types

import pytest
import torch

import vbhal
from vbhal import hal
from vbhal.errors import DeviceNotFoundError, KernelError, PluginError
from vbhal.hookspecs import DeviceInfo, Kernel, hookimpl


class FakeBackend:
    """A plug-in device ('fakedev') living in host memory, with its own attention kernel."""

    name = "fakedev"

    def __init__(self, priority=60, raise_in_probe=False, raise_in_kernel=False):
        self.priority = priority
        self.raise_in_probe = raise_in_probe
        self.raise_in_kernel = raise_in_kernel

    @hookimpl
    def vbhal_probe(self, registry):
        if self.raise_in_probe:
            raise RuntimeError("driver exploded")
        registry.add(DeviceInfo(name="fakedev:0", kind="fakedev", backend=self.name, priority=self.priority,
                                torch_device=torch.device("cpu")))

    @hookimpl
    def vbhal_get_kernel(self, name, device):
        if self.raise_in_kernel:
            raise RuntimeError("kernel table broken")
        if device.kind == "fakedev" and name == "attention":
            return Kernel(name, lambda *a, **k: "fake", self.name, "fake attention")
        return None


def test_cpu_is_always_found(fresh_hal):
    names = [d.name for d in fresh_hal.devices]
    assert "cpu" in names
    cpu = fresh_hal.find("cpu")
    assert cpu.total_memory > 0 and cpu.device == torch.device("cpu")


def test_absent_backends_say_why(fresh_hal):
    kinds = {kind: reason for _, kind, reason in fresh_hal.absent}
    if not torch.cuda.is_available():
        assert "cuda" in kinds and kinds["cuda"]
    assert "npu" in kinds  # no NPU on any machine these tests run on


def test_selection_order_argument_env_priority(monkeypatch):
    h = hal.build_hal(autoload=False, extra_plugins=(FakeBackend(priority=60),))
    assert h.select().device.name == "fakedev:0"  # plug-in above cpu
    assert "probe order" in h.select().reason
    monkeypatch.setenv("VBHAL_DEVICE", "cpu")
    sel = h.select()
    assert sel.device.name == "cpu" and sel.reason == "environment variable VBHAL_DEVICE"
    sel = h.select("fakedev")
    assert sel.device.name == "fakedev:0" and sel.reason == "argument"


def test_lower_priority_plugin_stays_below_cpu_only_if_it_says_so():
    h = hal.build_hal(autoload=False, extra_plugins=(FakeBackend(priority=-5),))
    assert h.select().device.name == "cpu"


def test_absent_device_error_lists_what_was_found(monkeypatch):
    h = hal.build_hal(autoload=False)
    with pytest.raises(DeviceNotFoundError, match=r"'cuda:3'.*Devices found: cpu \(cpu\)"):
        h.select("cuda:3")
    monkeypatch.setenv("VBHAL_DEVICE", "npu")
    with pytest.raises(DeviceNotFoundError, match="environment variable VBHAL_DEVICE"):
        h.select()


def test_probe_that_raises_is_skipped_and_reported():
    h = hal.build_hal(autoload=False, extra_plugins=(FakeBackend(raise_in_probe=True),))
    assert [d.name for d in h.devices] == ["cpu"]
    assert any(f.name == "fakedev" and f.stage == "probe" and "driver exploded" in f.error for f in h.failures)


def test_strict_mode_turns_failures_into_errors():
    with pytest.raises(PluginError, match="fakedev.*probe.*driver exploded"):
        hal.build_hal(autoload=False, strict=True, extra_plugins=(FakeBackend(raise_in_probe=True),))


def test_kernel_resolution_plugin_first_then_cpu_reference():
    h = hal.build_hal(autoload=False, extra_plugins=(FakeBackend(),))
    dev = h.find("fakedev")
    assert h.get_kernel("attention", dev).backend == "fakedev"
    k = h.get_kernel("attention", h.find("cpu"))
    assert k.backend == "cpu"
    # fakedev has no fp4 kernel: the CPU reference serves it, and says it is the CPU's
    assert h.get_kernel("dequantize_fp4", dev).backend == "cpu"


def test_kernel_hook_that_raises_falls_back_and_is_recorded():
    h = hal.build_hal(autoload=False, extra_plugins=(FakeBackend(raise_in_kernel=True),))
    k = h.get_kernel("attention", h.find("fakedev"))
    assert k.backend == "cpu"
    assert any(f.stage == "kernel" and f.name == "fakedev" for f in h.failures)


def test_unknown_kernel_name_is_a_clear_error():
    h = hal.build_hal(autoload=False)
    with pytest.raises(KernelError, match="no backend provides kernel 'warp_drive'.*known kernels"):
        h.get_kernel("warp_drive", h.find("cpu"))


def test_autoload_off_by_environment(monkeypatch):
    calls = []
    monkeypatch.setattr(hal, "_entry_points", lambda: calls.append(1) or [])
    monkeypatch.setenv("VBHAL_DISABLE_PLUGIN_AUTOLOAD", "1")
    hal.build_hal()
    assert calls == []
    monkeypatch.setenv("VBHAL_DISABLE_PLUGIN_AUTOLOAD", "0")
    hal.build_hal()
    assert calls == [1]


def test_entry_point_that_fails_to_load_is_skipped(monkeypatch):
    class EP:
        name, value, dist = "broken", "broken_mod:plugin", None

        def load(self):
            raise ImportError("libbroken.so: cannot open shared object file")

    monkeypatch.setattr(hal, "_entry_points", lambda: [EP()])
    h = hal.build_hal(autoload=True)
    assert any(f.name == "broken" and f.stage == "load" and "libbroken" in f.error for f in h.failures)
    assert "cpu" in [d.name for d in h.devices]


def test_register_plugin_in_code(fresh_hal):
    hal.register_plugin(FakeBackend(), name="fakedev")
    assert "fakedev:0" in [d.name for d in vbhal.detect()]
    hal.reset()


# ------------------------------------------------------------------------------------------------ NPU probe
def _npu_probe():
    from vbhal.backends.npu import NPUBackend

    h = hal.build_hal(autoload=False)
    return h, NPUBackend


def test_npu_probe_without_package(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "torch_npu" else real(name, *a))
    from vbhal.backends.npu import import_torch_npu

    mod, reason = import_torch_npu()
    assert mod is None and "not installed" in reason


def test_npu_probe_with_missing_runtime_restores_environment(monkeypatch, tmp_path):
    # A stand-in torch_npu that fails like the real one without the CANN toolkit, and that (like the real
    # one) sets TORCH_DEVICE_BACKEND_AUTOLOAD=0 before failing.
    pkg = tmp_path / "torch_npu"
    pkg.mkdir()
    (pkg / "__init__.py").write_text(
        "import os\nos.environ['TORCH_DEVICE_BACKEND_AUTOLOAD'] = '0'\n"
        "raise ImportError('libhccl.so: cannot open shared object file: No such file or directory')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delenv("TORCH_DEVICE_BACKEND_AUTOLOAD", raising=False)
    sys.modules.pop("torch_npu", None)
    from vbhal.backends.npu import import_torch_npu

    mod, reason = import_torch_npu()
    assert mod is None
    assert "libhccl.so" in reason and "CANN" in reason
    import os

    assert "TORCH_DEVICE_BACKEND_AUTOLOAD" not in os.environ
    sys.modules.pop("torch_npu", None)


def test_npu_probe_with_package_but_no_device(monkeypatch):
    fake = types.ModuleType("torch_npu")
    monkeypatch.setitem(sys.modules, "torch_npu", fake)
    monkeypatch.setattr(torch, "npu", types.SimpleNamespace(is_available=lambda: False, device_count=lambda: 0),
                        raising=False)
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: object() if name == "torch_npu" else real(name, *a))
    h = hal.build_hal(autoload=False)
    reasons = {kind: r for _, kind, r in h.absent}
    assert "no NPU device" in reasons["npu"]
    assert [d.kind for d in h.devices if d.kind == "npu"] == []
