"""`vbhal.optimize` on real models (the reference GPT, HuggingFace GPT-2 and Llama built from small configs),
in every mode, on CPU: outputs within the mode's tolerance, backward works, the report lists the changes."""

import pytest
import torch
import torch.nn as nn

import vbhal
from vbhal.errors import ConfigError, VbhalError
from vbhal.train.model import GPT, GPTConfig

#: Relative error of the logits allowed per mode: bf16 autocast (~1e-2), plus FP4 weights in "full".
MODE_TOLERANCE = {"speed": 3e-2, "balanced": 3e-2, "memory": 3e-2, "full": 0.3}
MODES = ["speed", "balanced", "memory", "full"]


def rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def small_gpt():
    torch.manual_seed(0)
    return GPT(GPTConfig(vocab_size=256, hidden_size=64, num_layers=3, num_heads=4, seq_length=64))


def hf_gpt2():
    transformers = pytest.importorskip("transformers")
    cfg = transformers.GPT2Config(vocab_size=256, n_embd=64, n_layer=2, n_head=4, n_positions=64, resid_pdrop=0.0,
                                  embd_pdrop=0.0, attn_pdrop=0.0)  # no dropout: outputs are comparable in train()
    torch.manual_seed(0)
    return transformers.GPT2LMHeadModel(cfg)


def hf_llama():
    transformers = pytest.importorskip("transformers")
    cfg = transformers.LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(cfg)


def logits_of(model, idx):
    out = model(idx)
    return out[0] if isinstance(out, tuple) else out.logits


MODELS = {"gpt": small_gpt, "gpt2": hf_gpt2, "llama": hf_llama}


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("which", list(MODELS))
def test_every_mode_on_real_models(which, mode):
    model = MODELS[which]()
    model.train()
    idx = torch.randint(0, 256, (2, 32))
    with torch.no_grad():
        ref = logits_of(model, idx)
    init = {n: p.detach().clone() for n, p in model.named_parameters()}
    out_model = vbhal.optimize(model, mode=mode, device="cpu")
    assert out_model is model
    logits = logits_of(model, idx)
    err = rel(logits, ref)
    assert err < MODE_TOLERANCE[mode], f"{which}/{mode}: logits differ by {err:.3g}"
    logits.float().logsumexp(-1).mean().backward()
    if mode == "memory":
        # Offloaded training: gradients go to the host as they are produced and AdamW steps there.
        engine = model.vbhal_offload
        engine.step()
        engine.synchronize()
        masters = engine.master_state_dict()
        assert masters and set(masters) <= set(init), set(masters) - set(init)
        assert all(torch.isfinite(v).all() for v in masters.values())
        assert any(not torch.equal(v.cpu(), init[k]) for k, v in masters.items())  # the host AdamW stepped
    else:
        trainable = [p for p in model.parameters() if p.requires_grad]
        assert trainable and all(p.grad is not None and torch.isfinite(p.grad).all() for p in trainable)
    report = vbhal.stats(model)
    kinds = {c.kind for c in report.changes}
    assert "mixed_precision" in kinds
    if mode != "speed":
        assert "checkpoint" in kinds
    if mode == "full":
        assert report.count("fp4") > 0
        assert report.param_bytes_after < report.param_bytes_before
    assert report.device == "cpu" and report.mode == mode


def test_optimizing_twice_changes_nothing_more():
    model = small_gpt()
    vbhal.optimize(model, mode="balanced", device="cpu")
    before = [type(m) for m in model.modules()], len(vbhal.stats(model).changes)
    vbhal.optimize(model, mode="balanced", device="cpu")
    after = [type(m) for m in model.modules()], len(vbhal.stats(model).changes)
    assert before == after
    vbhal.optimize(model, mode="speed", device="cpu")
    assert "already optimized" in vbhal.stats(model).warnings[-1]


def test_checkpointing_keeps_state_dict_keys_and_gradients():
    model = small_gpt()
    ref = small_gpt()
    keys = list(model.state_dict())
    vbhal.optimize(model, device="cpu", gradient_checkpointing=True, mixed_precision="none", attention=False)
    assert list(model.state_dict()) == keys
    idx = torch.randint(0, 256, (2, 16))
    model(idx, idx)[1].backward()
    ref(idx, idx)[1].backward()
    for (n, p), (_, q) in zip(model.named_parameters(), ref.named_parameters()):
        assert torch.allclose(p.grad, q.grad, rtol=1e-5, atol=1e-6), n


def test_generic_repeated_blocks_are_checkpointed():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.layers = nn.ModuleList(nn.Sequential(nn.Linear(8, 8), nn.GELU()) for _ in range(3))
            self.head = nn.Linear(8, 2)

        def forward(self, x):
            for layer in self.layers:
                x = layer(x)
            return self.head(x)

    net = Net()
    vbhal.optimize(net, device="cpu", mode="balanced", mixed_precision="none")
    names = [c.name for c in vbhal.stats(net).changes if c.kind == "checkpoint"]
    assert names == ["layers.0", "layers.1", "layers.2"]
    net(torch.randn(4, 8, requires_grad=True)).sum().backward()


def test_bad_input_is_a_clear_error():
    with pytest.raises(TypeError, match="expects a torch.nn.Module"):
        vbhal.optimize(small_gpt().state_dict())
    with pytest.raises(ConfigError, match="mode='warp' is not one of"):
        vbhal.optimize(small_gpt(), mode="warp")
    with pytest.raises(VbhalError, match="'tpu:0'.*not found"):
        vbhal.optimize(small_gpt(), device="tpu:0")
    meta = GPT(GPTConfig(vocab_size=64, hidden_size=32, num_layers=1, num_heads=2, seq_length=16)).to("meta")
    with pytest.raises(ConfigError, match="meta device"):
        vbhal.optimize(meta, device="cpu")


def test_model_on_another_device_than_selected():
    from vbhal.hookspecs import DeviceInfo

    gpu = DeviceInfo(name="cuda:0", kind="cuda", backend="cuda", torch_device=torch.device("cuda", 0))
    with pytest.raises(ConfigError, match=r"model is on cpu but vbhal selected cuda:0; move it first"):
        vbhal.optimize(small_gpt(), device=gpu)


def test_stats_before_optimize_is_a_clear_error():
    with pytest.raises(VbhalError, match="has not been optimized"):
        vbhal.stats(nn.Linear(2, 2))


def test_report_formats_and_print_stats(capsys):
    model = small_gpt()
    vbhal.optimize(model, mode="speed", device="cpu")
    vbhal.print_stats(model)
    out = capsys.readouterr().out
    assert "mode=speed" in out and "attention" in out and "parameter + buffer bytes" in out
    d = vbhal.stats(model).to_dict()
    assert d["kernels"]["attention"].startswith("cpu")
