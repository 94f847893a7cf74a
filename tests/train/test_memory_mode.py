"""`vbhal train --mode memory`: the offload engine (vbhal.nn.offload) drives the optimizer step.

On CPU the engine streams the blocks through the "device" (the CPU itself) with fp32 working copies, so
its arithmetic is torch's AdamW: exact resume is checked to the last bit, and the launcher's wiring (LR
schedule, accumulation, clipping) against the ordinary loop.
"""

from __future__ import annotations

import math

import pytest
import torch

from vbhal.train import checkpoint as C
from vbhal.train._errors import ConfigError, ResumeError
from vbhal.train.loop import run
from vbhal.train.model import GPT, GPTConfig

from train_helpers import micro_config, write_corpus

pytest.importorskip("vbhal.nn.offload")


def _engine_masters(path):
    sd = C.load_checkpoint(path)
    return [u["master"] for u in sd["engine"]["units"] if u["master"] is not None], sd


def test_memory_mode_resume_is_bit_exact(tmp_path):
    # accumulation 2, dropout (RNG state matters), clipping that bites (max norm 0.05), two epoch ends
    corpus = write_corpus(tmp_path / "small", n_docs=40, words=12)
    kw = dict(mode="memory", max_steps=20, dropout=0.1, gradient_accumulation_steps=2, save_steps=0,
              val_interval=5, max_grad_norm=0.05)
    straight = run(micro_config(tmp_path / "a", corpus, **kw))
    assert straight.step == 20 and straight.epoch >= 2 and straight.exit_code == 0
    first = run(micro_config(tmp_path / "b", corpus, stop_after_steps=10, **kw))
    assert first.step == 10
    second = run(micro_config(tmp_path / "b", corpus, resume=str(tmp_path / "b" / "out"), **kw))
    assert second.step == 20
    assert first.losses + second.losses == straight.losses          # to the last bit
    assert first.val_losses + second.val_losses == straight.val_losses
    ma, a = _engine_masters(C.checkpoint_path(tmp_path / "a" / "out" / "checkpoints", 20))
    mb, b = _engine_masters(C.checkpoint_path(tmp_path / "b" / "out" / "checkpoints", 20))
    assert len(ma) == len(mb) > 0 and all(torch.equal(x, y) for x, y in zip(ma, mb))
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    assert a["engine"]["step_count"] == b["engine"]["step_count"] == 40   # micro-batches (backward + step)


def test_memory_mode_trains_like_the_ordinary_loop(tmp_path, corpus_dir):
    # Same schedule, accumulation and clipping; weight decay 0 because the engine decays every parameter
    # (one group) while the ordinary loop spares norms. Different AdamW implementations (fused on the
    # host vs foreach): equal up to rounding, far closer than any wiring mistake (e.g. a missing LR
    # schedule or clip) would leave them.
    kw = dict(max_steps=8, gradient_accumulation_steps=2, save_steps=0, val_batches=0, weight_decay=0.0,
              max_grad_norm=0.5, warmup_steps=4, learning_rate=1e-2)
    ref = run(micro_config(tmp_path / "ref", corpus_dir, **kw))
    mem = run(micro_config(tmp_path / "mem", corpus_dir, mode="memory", **kw))
    torch.testing.assert_close(torch.tensor(mem.losses), torch.tensor(ref.losses), rtol=2e-5, atol=2e-5)
    assert abs(ref.losses[-1] - ref.losses[0]) > 0.1   # the comparison has something to see
    # a constant LR (schedule not handed to the engine) would not match: the check can fail
    const = run(micro_config(tmp_path / "const", corpus_dir, mode="memory", **dict(kw, warmup_steps=0,
                                                                                  lr_schedule="constant")))
    assert max(abs(a - b) for a, b in zip(const.losses, ref.losses)) > 1e-3


def test_memory_mode_nan_stops_with_last_good_state(tmp_path, corpus_dir, monkeypatch):
    calls = {"n": 0}
    original = GPT.forward

    def poisoned(self, idx, targets=None):
        logits, loss = original(self, idx, targets)
        if self.training and targets is not None:
            calls["n"] += 1
            if calls["n"] == 4:
                loss = loss * float("nan")
        return logits, loss
    monkeypatch.setattr(GPT, "forward", poisoned)
    kw = dict(mode="memory", max_steps=8, save_steps=0, val_batches=0, log_interval=5)
    res = run(micro_config(tmp_path / "nan", corpus_dir, **kw))
    assert res.stopped == "nan" and res.exit_code == 3 and res.step == 3 and len(res.losses) == 3
    monkeypatch.setattr(GPT, "forward", original)
    ref = run(micro_config(tmp_path / "ref", corpus_dir, stop_after_steps=3, **kw))
    assert ref.losses == res.losses
    saved, s = _engine_masters(C.checkpoint_path(tmp_path / "nan" / "out" / "checkpoints", 3))
    good, g = _engine_masters(ref.last_checkpoint)
    assert all(torch.equal(x, y) for x, y in zip(saved, good))
    assert s["scheduler"]["last_epoch"] == g["scheduler"]["last_epoch"] == 3


def test_cli_memory_mode_end_to_end_then_generate(tmp_path, capsys):
    from vbhal.train.__main__ import main
    from vbhal.train.generate import load_model

    out = tmp_path / "out"
    code = main(["--config", "tiny", "--mode", "memory", "--max-steps", "6", "--warmup-steps", "2",
                 "--val-interval", "3", "--val-batches", "2", "--save-steps", "3", "--output-dir", str(out),
                 "--no-progress", "--no-tensorboard", "--device", "cpu", "--num-workers", "0"])
    err = capsys.readouterr().err
    assert code == 0, err
    assert "offload engine:" in err and "validation loss" in err
    ck = C.load_checkpoint(C.list_checkpoints(out / "checkpoints")[-1])
    assert ck["step"] == 6 and ck["engine"]["format"] == "vbhal-offload-1"
    # best_model.pt holds ordinary GPT weights (the engine's masters): it loads and reproduces its loss
    best = C.load_checkpoint(out / "best_model.pt")
    model = load_model(out / "best_model.pt")
    assert isinstance(model, GPT) and model.config == GPTConfig(**best["model_config"])
    assert model.lm_head.weight is model.wte.weight
    ids = model.generate(torch.tensor([[105, 109]]), 5, temperature=0)
    assert ids.shape == (1, 7)
    assert math.isfinite(best["val_loss"]) and best["val_loss"] < math.log(256)


def test_memory_mode_refusals(tmp_path, corpus_dir):
    with pytest.raises(ConfigError, match="--compile"):
        run(micro_config(tmp_path, corpus_dir, mode="memory", compile=True, max_steps=2))
    with pytest.raises(ConfigError, match="FP4"):
        run(micro_config(tmp_path, corpus_dir, mode="memory", use_fp4=True, max_steps=2))
    assert not (tmp_path / "out").exists()
    # a checkpoint of the ordinary loop does not resume in memory mode (and the other way round)
    run(micro_config(tmp_path, corpus_dir, max_steps=2))
    with pytest.raises(ResumeError, match="same --mode"):
        run(micro_config(tmp_path, corpus_dir, mode="memory", max_steps=4, resume=str(tmp_path / "out")))


def test_memory_mode_refused_under_ddp(tmp_path, corpus_dir):
    from vbhal.train import distributed as D
    from vbhal.train.loop import _check_offload

    info = D.DistInfo(rank=0, world_size=2, local_rank=0, local_world_size=2, device=torch.device("cpu"))
    cfg = micro_config(tmp_path, corpus_dir, mode="memory").with_preset_defaults()
    with pytest.raises(ConfigError, match="DDP/FSDP"):
        _check_offload(cfg, info, "no", None)
