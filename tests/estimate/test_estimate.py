"""The estimator: exact accounting on small models, trace vs a real CPU step, bad input, big models."""

from __future__ import annotations

import json
import sys
import time

import pytest
import torch
import torch.nn as nn

import vbhal.estimate  # noqa: F401  (the package attribute is the function; the module is below)
from vbhal.errors import EstimateError

E = sys.modules["vbhal.estimate"]
from vbhal.train.model import GPT, GPTConfig  # noqa: E402

MiB = 2**20


def tiny_cfg(**kw):
    base = dict(hidden_size=64, num_layers=2, num_heads=4, seq_length=64, vocab_size=320)
    base.update(kw)
    return GPTConfig(**base)


# ------------------------------------------------------------------------------------------------ sizes

@pytest.mark.parametrize("text,expected", [
    ("8GB", 8 * 10**9), ("8 GiB", 8 * 2**30), ("8G", 8 * 2**30), ("8gib", 8 * 2**30),
    ("512MiB", 512 * 2**20), ("1.5TB", 1.5e12), ("100", 100), (4096, 4096), ("0.5 GB", 5 * 10**8)])
def test_parse_bytes_units(text, expected):
    assert E.parse_bytes(text) == int(expected)


@pytest.mark.parametrize("bad", ["eight", "8 GX", "GB", "", "-1GB", "0", 0, -5, "1e400GB", True])
def test_parse_bytes_rejects_nonsense(bad):
    with pytest.raises(EstimateError, match="size"):
        E.parse_bytes(bad, what="gpu_mem")


# ------------------------------------------------------------------------------------------------ bad input

def test_unknown_preset_names_the_choices():
    with pytest.raises(EstimateError, match="unknown model preset 'gigantic'.*medium"):
        E.estimate("gigantic")


@pytest.mark.parametrize("kw,msg", [
    (dict(batch_size=0), "batch_size"), (dict(batch_size=-2), "batch_size"), (dict(seq_length=0), "seq_length"),
    (dict(batch_size=1.5), "batch_size"), (dict(precision="fp12"), "precision"), (dict(optimizer="lion"), "optimizer"),
    (dict(attention="sparse"), "attention"), (dict(fp4="int4"), "FP4"), (dict(world_size=0), "world_size"),
    (dict(gpu_mem="lots"), "gpu_mem"), (dict(seq_length=4096), "exceeds")])
def test_nonsense_arguments(kw, msg):
    with pytest.raises(EstimateError, match=msg):
        E.estimate("tiny", **kw)


def test_hidden_not_divisible_by_heads_in_hf_config(tmp_path):
    pytest.importorskip("transformers")
    p = tmp_path / "config.json"
    p.write_text(json.dumps({"model_type": "gpt2", "n_embd": 100, "n_head": 3, "n_layer": 2, "vocab_size": 50}))
    with pytest.raises(EstimateError, match="divisible"):
        E.estimate(str(p))


@pytest.mark.parametrize("text", ["{not json", "[1, 2]", json.dumps({"hidden_size": 8}),
                                  json.dumps({"model_type": "no-such-model"})])
def test_unparseable_config_files(tmp_path, text):
    pytest.importorskip("transformers")
    p = tmp_path / "config.json"
    p.write_text(text)
    with pytest.raises(EstimateError, match="config"):
        E.estimate(str(p))


def test_missing_config_file(tmp_path):
    with pytest.raises(EstimateError, match="does not exist"):
        E.estimate(str(tmp_path / "nope" / "config.json"))


def test_module_without_known_inputs_asks_for_example_inputs():
    with pytest.raises(EstimateError, match="example_inputs"):
        E.estimate(nn.Linear(4, 4))


# ------------------------------------------------------------------------------------------------ accounting

def _param_bytes(model, dtype_size=4):
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values()) * dtype_size


def test_fp32_adamw_sums_params_grads_and_state():
    """Parameters, gradients and AdamW's two moments are all counted (summed, not maxed)."""
    cfg = tiny_cfg()
    est = E.estimate(cfg, batch_size=2, seq_length=32, precision="fp32", device="cpu")
    n = GPT(cfg).num_parameters()
    assert est.num_parameters == n
    assert est.parameters == n * 4 + 0  # no buffers in the reference GPT
    assert est.gradients == n * 4
    # exp_avg + exp_avg_sq per parameter, plus one 4-byte step counter per tensor
    n_tensors = len({id(p) for p in GPT(cfg).parameters()})
    assert est.optimizer_state == n * 8 + n_tensors * 4
    assert est.peak_allocated >= est.parameters + est.optimizer_state + est.gradients


def test_sgd_without_momentum_has_no_state():
    est = E.estimate(tiny_cfg(), batch_size=2, seq_length=32, precision="fp32", optimizer="sgd", device="cpu")
    assert est.optimizer_state == 0


def test_foreach_adamw_temporary_and_fused_none():
    cfg = tiny_cfg()
    fe = E.estimate(cfg, batch_size=1, seq_length=16, precision="fp32", device="cpu")
    fu = E.estimate(cfg, batch_size=1, seq_length=16, precision="fp32", optimizer_impl="fused", device="cpu")
    assert fe.optimizer_temporaries == fe.gradients  # one parameter-sized sqrt(exp_avg_sq)
    assert fu.optimizer_temporaries == 0 and fu.optimizer_state == fe.optimizer_state


def test_bf16_true_halves_weights_and_state():
    cfg = tiny_cfg()
    a = E.estimate(cfg, batch_size=1, seq_length=16, precision="fp32", device="cpu")
    b = E.estimate(cfg, batch_size=1, seq_length=16, precision="bf16-true", device="cpu")
    assert b.parameters * 2 == a.parameters
    assert b.gradients * 2 == a.gradients


def test_mixed_precision_counts_autocast_weight_copies():
    cfg = tiny_cfg()
    est = E.estimate(cfg, batch_size=8, seq_length=64, precision="bf16-mixed", device="cpu")
    assert est.peak_phase != "optimizer"
    # every block's Linear weights are cast once to bf16 and saved for backward (2 bytes/elt);
    # at the start of backward they are all live (the lm_head's copy may already be gone)
    lin = sum(m.weight.numel() for n, m in GPT(cfg).named_modules() if isinstance(m, nn.Linear)
              and n.startswith("blocks"))
    assert est.autocast_copies >= lin * 2
    assert any("autocast" in n for n in est.notes)


@pytest.mark.parametrize("fmt", ["mxfp4", "nvfp4"])
def test_fp4_weight_bytes_match_quantized_weight(fmt):
    """The packed size the estimator uses is what vbhal.formats really stores."""
    from vbhal.formats import quantize

    for n, k in [(96, 200), (64, 64), (7, 33)]:
        qw = quantize(torch.randn(n, k), fmt)
        assert E._fp4_nbytes(n, k, fmt) == qw.nbytes
    assert E.FP4_BITS_PER_ELEMENT == {"mxfp4": 4.25, "nvfp4": 4.5}


def test_fp4_freezes_linear_weights():
    cfg = tiny_cfg(hidden_size=128)
    full = E.estimate(cfg, batch_size=1, seq_length=16, device="cpu")
    q = E.estimate(cfg, batch_size=1, seq_length=16, fp4="mxfp4", device="cpu")
    lin = sum(m.weight.numel() for _, m in E._fp4_linears(GPT(cfg)))
    assert q.num_trainable == full.num_trainable - lin
    assert full.gradients - q.gradients == lin * 4
    # 4.25 bits instead of 32 for the swapped weights
    assert full.parameters - q.parameters == lin * 4 - sum(
        E._fp4_nbytes(*m.weight.shape, "mxfp4") for _, m in E._fp4_linears(GPT(cfg)))


def test_flash_attention_is_linear_in_seq_and_math_quadratic():
    cfg = tiny_cfg(seq_length=512)

    def act(attn, s):
        return E.estimate(cfg, batch_size=1, seq_length=s, attention=attn, precision="fp32",
                          device="cpu").activations_total_saved

    flash = act("flash", 512) / act("flash", 256)
    math_ = act("math", 512) / act("math", 256)
    assert 1.9 < flash < 2.1
    assert math_ > 2.5
    assert act("math", 512) > act("flash", 512)


def test_checkpointing_keeps_block_inputs_only():
    cfg = tiny_cfg()
    b, s = 2, 32
    plain = E.estimate(cfg, batch_size=b, seq_length=s, precision="fp32", device="cpu")
    ck = E.estimate(cfg, batch_size=b, seq_length=s, precision="fp32", gradient_checkpointing=True, device="cpu")
    blocks = [la for la in ck.layers if la.checkpointed_bytes is not None]
    assert len(blocks) == cfg.num_layers
    for la in blocks:  # the fp32 residual stream entering each block
        assert la.checkpointed_bytes == b * s * cfg.hidden_size * 4
        assert la.saved_bytes > 4 * la.checkpointed_bytes
    assert ck.activations_total_saved < plain.activations_total_saved


def test_user_module_is_not_touched():
    model = GPT(tiny_cfg())
    before = {k: v.clone() for k, v in model.state_dict().items()}
    est = E.estimate(model, batch_size=2, seq_length=16, gradient_checkpointing=True, device="cpu")
    assert est.num_parameters == model.num_parameters()
    for k, v in model.state_dict().items():
        assert v.device.type == "cpu" and torch.equal(v, before[k])
    assert all(p.grad is None for p in model.parameters())
    assert not model.gradient_checkpointing
    assert "forward" not in model.blocks[0].__dict__


def test_generic_module_with_example_inputs():
    model = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 8))
    est = E.estimate(model, batch_size=4, example_inputs=lambda b, s: (torch.empty(b, 32),), precision="fp32",
                     device="cpu")
    n = sum(p.numel() for p in model.parameters())
    assert est.parameters == n * 4 and est.gradients == n * 4


def test_per_tier_totals_and_capacities():
    est = E.estimate("tiny", batch_size=2, seq_length=64, gpu_mem="1GB", cpu_mem="2GB", disk="3GB")
    dev, host, disk = est.tiers
    assert (dev.name, host.name, disk.name) == ("device", "host", "disk")
    assert dev.total == est.device_need == est.peak_allocated + est.allocator_overhead
    assert dev.capacity == 10**9 and dev.fits
    assert host.total == 0  # nothing offloaded


def test_offload_moves_model_states_to_host():
    """vbhal.nn.offload's layout: host = fp32 master (4) + AdamW state (8) + bf16 working copy (2)
    + bf16 gradient buffer (2) per parameter; the device holds two units and activations."""
    cfg = tiny_cfg(num_layers=6)
    on = E.estimate(cfg, batch_size=1, seq_length=16, offload=True)
    off = E.estimate(cfg, batch_size=1, seq_length=16, gradient_checkpointing=True)
    n = on.num_parameters
    host, dev = on.tier("host"), on.tier("device")
    assert (host.parameters, host.gradients, host.optimizer_state) == (n * 6, n * 2, n * 8)
    assert dev.optimizer_state == 0 and dev.parameters < off.tier("device").parameters / 2
    plain = E.estimate(cfg, batch_size=1, seq_length=16)
    # unit-level recomputation: fewer live activations than without checkpointing
    assert 0 < dev.activations < plain.activations_total_saved


def test_offload_spills_to_disk_when_host_is_small():
    """fp32 masters and AdamW state spill to disk; the pinned bf16 buffers cannot."""
    cfg = tiny_cfg(num_layers=4, hidden_size=128)
    n = E.estimate(cfg, batch_size=1, seq_length=16).num_parameters
    big = E.estimate(cfg, batch_size=1, seq_length=16, offload=True, cpu_mem=n * 8)
    assert big.tier("host").total == n * 8 and big.tier("host").fits
    assert big.tier("disk").total == n * 8
    tiny = E.estimate(cfg, batch_size=1, seq_length=16, offload=True, cpu_mem=200_000)
    assert tiny.tier("host").total == n * 4 and tiny.tier("host").fits is False
    assert tiny.tier("disk").total == n * 12


def test_ddp_counts_gradient_buckets_and_fsdp_shards():
    cfg = tiny_cfg()
    one = E.estimate(cfg, batch_size=1, seq_length=16, precision="fp32")
    ddp = E.estimate(cfg, batch_size=1, seq_length=16, precision="fp32", world_size=4)
    fsdp = E.estimate(cfg, batch_size=1, seq_length=16, precision="fp32", world_size=4, distributed="fsdp")
    assert ddp.tier("device").gradients == one.tier("device").gradients + one.gradients
    assert fsdp.tier("device").optimizer_state == -(-one.optimizer_state // 4)


# ------------------------------------------------------------------------------------------------ vs reality

def _profiled_peak(fn):
    """Peak of live CPU bytes while fn() runs, from the profiler's allocator events (independent
    of the estimator's own tracking), relative to the start."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    # raw allocator records: one "[memory]" event per allocation (+bytes) and free (-bytes)
    events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events()
                    if e.name() == "[memory]")
    cur = peak = 0
    for _, d in events:
        cur += d
        peak = max(peak, cur)
    return peak


@pytest.mark.parametrize("ckpt", [False, True])
def test_prediction_matches_a_real_cpu_step(ckpt):
    """Predicted peak (device='cpu', fp32) vs the allocator's real peak during a training step."""
    torch.manual_seed(0)
    cfg = tiny_cfg(hidden_size=128, num_layers=3, seq_length=128)
    b, s = 4, 128
    model = GPT(cfg)
    if ckpt:
        model.gradient_checkpointing_enable()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, foreach=True)
    idx = torch.randint(0, cfg.vocab_size, (b, s))
    tgt = torch.randint(0, cfg.vocab_size, (b, s))

    def step():
        _, loss = model(idx, tgt)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    step()  # optimizer state now exists, as in every later step
    resident = sum(t.untyped_storage().nbytes() for t in list(model.parameters()) + [idx, tgt])
    resident += sum(v.untyped_storage().nbytes() for st in opt.state.values() for v in st.values()
                    if isinstance(v, torch.Tensor))
    measured = resident + _profiled_peak(step)
    est = E.estimate(model, batch_size=b, seq_length=s, precision="fp32", device="cpu",
                     gradient_checkpointing=ckpt)
    assert est.peak_allocated == pytest.approx(measured, rel=0.05), (est.peak_allocated, measured)


def _vm_hwm() -> int:
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self (Linux)")
def test_predicted_vs_measured_resident_memory_cpu():
    """Resident-set growth of a real fp32 training step on CPU vs the prediction (glibc keeps some
    freed memory and the interpreter allocates too, hence the wider band)."""
    import gc

    torch.manual_seed(0)
    cfg = tiny_cfg(hidden_size=256, num_layers=4, seq_length=256, vocab_size=320)
    b, s = 16, 256
    est = E.estimate(cfg, batch_size=b, seq_length=s, precision="fp32", device="cpu")
    gc.collect()
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset VmHWM to the current RSS
    except OSError:
        pytest.skip("cannot reset the RSS high-water mark here")
    from vbhal._sysinfo import psutil  # noqa: F401  (psutil is a core dependency)
    import psutil as _ps
    base = _ps.Process().memory_info().rss
    model = GPT(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, foreach=True)
    idx = torch.randint(0, cfg.vocab_size, (b, s))
    for _ in range(2):
        _, loss = model(idx, idx)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        del loss
    grown = _vm_hwm() - base
    assert 0.85 * est.peak_allocated < grown < 1.35 * est.peak_allocated, (grown / MiB, est.peak_allocated / MiB)


def test_70b_estimate_is_fast_and_allocates_no_parameters():
    transformers = pytest.importorskip("transformers")
    import psutil

    cfg = transformers.LlamaConfig(hidden_size=8192, intermediate_size=28672, num_hidden_layers=80,
                                   num_attention_heads=64, num_key_value_heads=8, vocab_size=32000,
                                   max_position_embeddings=4096)
    proc = psutil.Process()
    rss0 = proc.memory_info().rss
    t = time.perf_counter()
    est = E.estimate(cfg, batch_size=1, seq_length=4096, gradient_checkpointing=True)
    dt = time.perf_counter() - t
    grown = proc.memory_info().rss - rss0
    assert 68e9 < est.num_parameters < 71e9
    assert est.parameters == pytest.approx(est.num_parameters * 4, rel=1e-3)  # 276 GB, never allocated
    assert dt < 10.0, f"estimating 70B took {dt:.1f} s"
    assert grown < 1 * 2**30, f"RSS grew by {grown / MiB:.0f} MiB"


# ------------------------------------------------------------------------------------------------ report

def test_format_estimate_is_a_readable_table():
    est = E.estimate("tiny", batch_size=2, seq_length=64, gpu_mem="8GB")
    text = E.format_estimate(est)
    for word in ("parameters", "gradients", "optimizer state", "activations", "workspace", "peak allocated",
                 "blocks.0 .. blocks.1", "device", "capacity"):
        assert word in text
    json.dumps(est.to_dict(), default=str)


@pytest.mark.parametrize("kw", [dict(), dict(gradient_checkpointing=True), dict(precision="fp32", attention="math"),
                                dict(fp4="nvfp4"), dict(batch_size=1, precision="fp32")])
def test_many_blocks_are_extrapolated_exactly(kw, monkeypatch):
    """A 12-block model is traced with 2 and 3 blocks; the result equals the full trace."""
    cfg = tiny_cfg(hidden_size=64, num_layers=12, seq_length=128)
    kw = {"batch_size": 4, "seq_length": 128, **kw}
    fast = E.estimate(cfg, **kw)
    monkeypatch.setattr(E, "_EXTRAPOLATE_ABOVE", 1000)
    full = E.estimate(cfg, **kw)
    for key in ("num_parameters", "num_trainable", "parameters", "gradients", "optimizer_state", "activations",
                "temporaries", "peak_allocated", "peak_phase", "activations_total_saved"):
        assert getattr(fast, key) == getattr(full, key), key
    assert [(la.name, la.saved_bytes, la.checkpointed_bytes) for la in fast.layers] == \
        [(la.name, la.saved_bytes, la.checkpointed_bytes) for la in full.layers]


def test_format_estimate_with_measured_peak():
    est = E.estimate("tiny", batch_size=2, seq_length=64)
    text = E.format_estimate(est, measured={"peak_allocated": est.peak_allocated * 2})
    assert "peak allocated: predicted" in text and "(-50.0%)" in text


def _hf_tiny(kind):
    transformers = pytest.importorskip("transformers")
    if kind == "gpt2":
        cfg = transformers.GPT2Config(n_layer=2, n_embd=64, n_head=4, vocab_size=500, n_positions=128)
    else:
        cfg = transformers.LlamaConfig(hidden_size=64, intermediate_size=160, num_hidden_layers=2,
                                       num_attention_heads=4, num_key_value_heads=2, vocab_size=500,
                                       max_position_embeddings=128)
    return cfg, transformers.AutoModelForCausalLM.from_config(cfg)


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
@pytest.mark.parametrize("ckpt", [False, True])
def test_prediction_matches_a_real_cpu_step_hf(kind, ckpt):
    """Hugging Face models (their masks, loss and attention code) traced on meta vs a real CPU step."""
    torch.manual_seed(0)
    cfg, model = _hf_tiny(kind)
    model.train()
    if ckpt:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    b, s = 4, 128
    ids, labels = torch.randint(0, 500, (b, s)), torch.randint(0, 500, (b, s))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, foreach=True)

    def step():
        loss = model(input_ids=ids, labels=labels, use_cache=False).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    step()
    resident = sum(t.untyped_storage().nbytes() for t in list(model.parameters()) + list(model.buffers())
                   + [ids, labels])
    resident += sum(v.untyped_storage().nbytes() for st in opt.state.values() for v in st.values()
                    if isinstance(v, torch.Tensor))
    measured = resident + _profiled_peak(step)
    est = E.estimate(model, batch_size=b, seq_length=s, precision="fp32", device="cpu",
                     gradient_checkpointing=ckpt)
    assert est.peak_allocated == pytest.approx(measured, rel=0.05), (est.peak_allocated, measured)


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
@pytest.mark.parametrize("fmt", ["mxfp4", "nvfp4"])
def test_fp4_weight_bytes_match_swap_linears(kind, fmt):
    """The layers the estimate quantizes, and their bytes, are what vbhal's FP4 swap really does
    (GPT-2's Conv1D included)."""
    from vbhal.nn.fp4_linear import swap_linears

    cfg, model = _hf_tiny(kind)
    est = E.estimate(model, batch_size=1, seq_length=16, fp4=fmt, device="cpu")
    expected = sorted(n for n, _ in E._fp4_linears(model, fmt))
    swapped = sorted(swap_linears(model, fmt=fmt))
    assert swapped == expected
    real = sum(t.untyped_storage().nbytes() for t in {id(p): p for p in model.parameters()}.values())
    real += sum(b.untyped_storage().nbytes() for b in model.buffers())
    assert est.parameters == real
    assert est.num_trainable == sum(p.numel() for p in model.parameters() if p.requires_grad)


# ------------------------------------------------------------------------------------------------ allocator model

def test_allocator_model_releases_cached_segments_under_a_cap():
    MiB = 2**20
    ok, sim = E._replay([("a", 1, 100 * MiB), ("f", 1, 0), ("a", 2, 120 * MiB)], cap=150 * MiB)
    assert ok and sim.reserved == 120 * MiB  # the free 100 MiB segment was given back first
    ok, sim = E._replay([("a", 1, 100 * MiB), ("f", 1, 0), ("a", 2, 120 * MiB)], cap=None)
    assert ok and sim.peak_reserved == 220 * MiB  # without a cap it stays cached


def test_allocator_model_fragmentation_from_state_carved_out_of_a_cached_block():
    """A big transient freed, small persistent tensors split its cached block, the big one again:
    it needs a second segment -- allocated bytes fit the cap, the step does not."""
    MiB = 2**20
    ev = [("a", "logits", 100 * MiB), ("f", "logits", 0)]
    ev += [("a", ("state", i), 4 * MiB) for i in range(5)]
    ev += [("a", "logits2", 100 * MiB)]
    ok, sim = E._replay(ev, cap=150 * MiB)
    assert not ok and sim.allocated == 20 * MiB
    ok, sim = E._replay(ev, cap=None)
    assert ok and sim.peak_allocated == 120 * MiB and sim.peak_reserved == 200 * MiB


def test_allocator_model_rounding_pools_and_coalescing():
    MiB = 2**20
    ok, sim = E._replay([("a", 1, 100), ("a", 3, 13 * MiB + 1), ("a", 2, 3 * MiB)], cap=None)
    # 512 B minimum; a large block keeps its 2 MiB-rounded segment when the rest is <= 1 MiB
    assert sim.allocated == 512 + 14 * MiB + 3 * MiB
    assert sim.reserved == 2 * MiB + 14 * MiB + 20 * MiB  # small / large / mid-size segments
    ok, sim = E._replay([("a", 1, 3 * MiB), ("a", 2, 13 * MiB)], cap=None)
    assert sim.reserved == 20 * MiB  # the 13 MiB block is cut from the 20 MiB segment's free rest
    ok, sim = E._replay([("a", 1, 30 * MiB), ("f", 1, 0), ("a", 2, 10 * MiB), ("a", 3, 10 * MiB),
                         ("f", 2, 0), ("f", 3, 0), ("a", 4, 30 * MiB)], cap=None)
    assert sim.reserved == 30 * MiB  # the split pieces coalesced back into one block
