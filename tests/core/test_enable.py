"""Global enabling: HuggingFace models and registered classes come back optimized; disable() undoes it."""

import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn as nn

import vbhal
from vbhal.optimize import REPORT_ATTR


@pytest.fixture(autouse=True)
def _always_disable():
    yield
    vbhal.disable()


class Blocks(nn.Module):
    def __init__(self, n=2):
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(8, 8) for _ in range(n))

    def forward(self, x):
        for layer in self.layers:
            x = layer(x)
        return x


class MoreBlocks(Blocks):
    def __init__(self):
        super().__init__(n=3)


def test_enable_disable_state():
    assert not vbhal.is_enabled()
    cfg = vbhal.enable(mode="speed", device="cpu")
    assert vbhal.is_enabled() and vbhal.get_config() is cfg and cfg.mode == "speed"
    vbhal.disable()
    assert not vbhal.is_enabled()


def test_registered_class_is_optimized_at_construction_once():
    original = Blocks.__dict__["__init__"]
    vbhal.autopatch(Blocks)
    vbhal.enable(mode="balanced", device="cpu", mixed_precision="none")
    m = MoreBlocks()  # subclass: the outermost __init__ finishes, then optimize runs once
    assert getattr(m, REPORT_ATTR).count("checkpoint") == 3
    vbhal.disable()
    assert not hasattr(Blocks(), REPORT_ATTR)
    assert Blocks.__dict__["__init__"] is original


def test_hf_models_built_from_config_are_optimized_after_construction():
    transformers = pytest.importorskip("transformers")
    vbhal.enable(mode="speed", device="cpu")
    cfg = transformers.GPT2Config(vocab_size=64, n_embd=32, n_layer=2, n_head=2, n_positions=32)
    model = transformers.GPT2LMHeadModel(cfg)
    report = getattr(model, REPORT_ATTR)
    assert report.mode == "speed"
    assert not hasattr(model.transformer, REPORT_ATTR)  # the inner model is left to the outer one
    model(torch.randint(0, 64, (1, 8)))
    vbhal.disable()
    assert not hasattr(transformers.GPT2LMHeadModel(cfg), REPORT_ATTR)


def test_hf_from_pretrained_is_optimized_after_loading(tmp_path):
    transformers = pytest.importorskip("transformers")
    cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=32)
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(cfg).save_pretrained(tmp_path)
    vbhal.enable(mode="full", device="cpu")
    model = transformers.LlamaForCausalLM.from_pretrained(tmp_path)
    report = getattr(model, REPORT_ATTR)
    assert report.count("fp4") > 0  # quantized after the saved weights were loaded
    plain = transformers.LlamaForCausalLM.from_pretrained(tmp_path) if False else None
    assert plain is None


def test_vbhal_run_runs_an_unmodified_script(tmp_path):
    script = tmp_path / "train_script.py"
    script.write_text(textwrap.dedent("""
        import sys, torch, torch.nn as nn
        import vbhal

        class Net(nn.Module):
            def __init__(self):
                super().__init__()
                self.layers = nn.ModuleList(nn.Linear(4, 4) for _ in range(2))
            def forward(self, x):
                for l in self.layers:
                    x = l(x)
                return x

        vbhal.autopatch(Net)
        net = Net()
        print("optimized:", hasattr(net, "_vbhal_report"), "args:", sys.argv[1:])
    """))
    out = subprocess.run([sys.executable, "-m", "vbhal.cli", "run", "--mode", "speed", str(script), "--", "a", "b"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "optimized: True args: ['a', 'b']" in out.stdout


def test_environment_variable_enables_at_import():
    code = "import vbhal; print(vbhal.is_enabled(), vbhal.get_config().mode)"
    env = {**__import__("os").environ, "ENABLE_VIRTUAL_BLACKWELL": "1", "VB_MODE": "memory"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert out.stdout.split() == ["True", "memory"], out.stderr
