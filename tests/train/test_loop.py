"""The training loop: exact resume, NaN stop, signals, schedule, outputs, refusals before work."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from vbhal.train import checkpoint as C
from vbhal.train._errors import ConfigError, DataError, ResumeError
from vbhal.train.loop import lr_at, run
from vbhal.train.model import GPT

from train_helpers import micro_config, write_corpus

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_lr_schedule_warmup_then_cosine_to_floor():
    f = dict(warmup=10, total=110, schedule="cosine", min_ratio=0.1)
    assert lr_at(0, **f) == pytest.approx(0.1) and lr_at(9, **f) == pytest.approx(1.0)
    assert lr_at(10, **f) == pytest.approx(1.0)
    assert lr_at(60, **f) == pytest.approx(0.1 + 0.9 * 0.5)
    assert lr_at(110, **f) == pytest.approx(0.1) and lr_at(500, **f) == pytest.approx(0.1)
    assert lr_at(60, **dict(f, schedule="linear")) == pytest.approx(0.55)
    assert lr_at(60, **dict(f, schedule="constant")) == 1.0


@pytest.mark.parametrize("deferred, workers", [(False, 0), (True, 0), (False, 1)],
                         ids=["sync-every-step", "deferred-sync", "loader-worker"])
def test_resume_is_bit_exact_across_epoch_boundaries(tmp_path, deferred, workers):
    # dropout > 0 makes the RNG state matter; accumulation 2; ~8 steps per epoch so 20 steps cross two
    # epoch ends and the stop at 10 is mid-epoch
    corpus_dir = write_corpus(tmp_path / "small", n_docs=40, words=12)
    kw = dict(max_steps=20, dropout=0.1, gradient_accumulation_steps=2, save_steps=0, val_interval=5,
              deferred_sync=deferred, num_workers=workers)
    straight = run(micro_config(tmp_path / "a", corpus_dir, **kw))
    assert straight.step == 20 and straight.epoch >= 2
    first = run(micro_config(tmp_path / "b", corpus_dir, stop_after_steps=10, **kw))
    assert first.step == 10 and first.exit_code == 0
    second = run(micro_config(tmp_path / "b", corpus_dir, resume=str(tmp_path / "b" / "out"), **kw))
    assert second.step == 20
    assert first.losses + second.losses == straight.losses          # to the last bit
    assert first.val_losses + second.val_losses == straight.val_losses
    a = C.load_checkpoint(C.checkpoint_path(tmp_path / "a" / "out" / "checkpoints", 20))
    b = C.load_checkpoint(C.checkpoint_path(tmp_path / "b" / "out" / "checkpoints", 20))
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    assert a["optimizer"]["state"][0]["step"] == b["optimizer"]["state"][0]["step"]


def test_resume_with_different_model_is_refused_before_training(tmp_path, corpus_dir):
    run(micro_config(tmp_path, corpus_dir, max_steps=3))
    cfg = micro_config(tmp_path, corpus_dir, max_steps=6, hidden_size=64, resume=str(tmp_path / "out"))
    with pytest.raises(ResumeError, match="hidden_size: checkpoint 32 vs now 64"):
        run(cfg)


def test_existing_checkpoints_need_resume_or_overwrite(tmp_path, corpus_dir):
    run(micro_config(tmp_path, corpus_dir, max_steps=2))
    with pytest.raises(ConfigError, match="--resume"):
        run(micro_config(tmp_path, corpus_dir, max_steps=2))
    r = run(micro_config(tmp_path, corpus_dir, max_steps=2), overwrite=True)
    assert r.step == 2


@pytest.mark.parametrize("deferred", [False, True], ids=["sync-every-step", "deferred-sync"])
def test_nan_loss_stops_with_last_good_state(tmp_path, corpus_dir, monkeypatch, deferred):
    # deferred: the fused AdamW skips updates on the device from the bad step on, the host finds out at
    # the next flush (here step 5, --log-interval 5) and rewinds to step 3
    calls = {"n": 0}
    original = GPT.forward

    def poisoned(self, idx, targets=None):
        logits, loss = original(self, idx, targets)
        if self.training and targets is not None:
            calls["n"] += 1
            if calls["n"] == 4:                      # the 4th optimizer step's forward
                loss = loss * float("nan")
        return logits, loss
    monkeypatch.setattr(GPT, "forward", poisoned)
    kw = dict(max_steps=8, save_steps=0, val_batches=0, deferred_sync=deferred, log_interval=5)
    res = run(micro_config(tmp_path / "nan", corpus_dir, **kw))
    assert res.stopped == "nan" and res.exit_code == 3 and res.step == 3 and len(res.losses) == 3
    saved = C.load_checkpoint(C.checkpoint_path(tmp_path / "nan" / "out" / "checkpoints", 3))
    # same data order and init -> the saved weights and optimizer state are exactly those after 3 good
    # steps of the same 8-step schedule
    monkeypatch.setattr(GPT, "forward", original)
    ref = run(micro_config(tmp_path / "ref", corpus_dir, stop_after_steps=3, **kw))
    ref_state = C.load_checkpoint(ref.last_checkpoint)
    assert ref.losses == res.losses
    for k in ref_state["model"]:
        assert torch.equal(saved["model"][k], ref_state["model"][k]), k
    for i, st in ref_state["optimizer"]["state"].items():
        assert torch.equal(saved["optimizer"]["state"][i]["exp_avg"], st["exp_avg"])
        assert float(saved["optimizer"]["state"][i]["step"]) == float(st["step"]) == 3.0
    assert saved["scheduler"]["last_epoch"] == 3
    assert saved["optimizer"]["param_groups"][0]["lr"] == ref_state["optimizer"]["param_groups"][0]["lr"]
    log = next((tmp_path / "nan" / "out").glob("training_*.log")).read_text()
    assert "NaN/Inf" in log and "Last good state saved" in log


def test_outputs_written_and_loss_falls(tmp_path, corpus_dir):
    res = run(micro_config(tmp_path, corpus_dir, epochs=3, val_interval=0))
    out = tmp_path / "out"
    assert res.exit_code == 0 and res.best_val_loss is not None
    assert res.val_losses[-1][1] < res.val_losses[0][1] and res.val_losses[0][1] < math.log(256)
    recs = [json.loads(line) for line in open(out / "metrics.jsonl")]
    train = [r for r in recs if r["kind"] == "train"]
    assert len(train) == res.step and all(r["tokens_per_s"] > 0 and "lr" in r for r in train)
    assert [r["step"] for r in recs if r["kind"] == "val"] == [s for s, _ in res.val_losses]
    png = (out / "loss_curve.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    best = C.load_checkpoint(out / "best_model.pt")
    assert best["val_loss"] == res.best_val_loss
    assert len(C.list_checkpoints(out / "checkpoints")) <= 3
    assert list(out.glob("training_*.log"))


def test_bad_input_fails_before_any_output(tmp_path, corpus_dir):
    with pytest.raises(DataError, match="not found"):
        run(micro_config(tmp_path, str(tmp_path / "missing"), max_steps=2))
    with pytest.raises(DataError, match="seq_length"):
        run(micro_config(tmp_path, corpus_dir, max_steps=2, seq_length=4096))
    with pytest.raises(ConfigError, match="--epochs and --max-steps"):
        run(micro_config(tmp_path, corpus_dir, max_steps=2, epochs=1))
    with pytest.raises(ConfigError, match="fp16 needs a CUDA"):
        run(micro_config(tmp_path, corpus_dir, max_steps=2, mixed_precision="fp16"))
    with pytest.raises(ConfigError, match="--strategy fsdp"):
        run(micro_config(tmp_path, corpus_dir, max_steps=2, strategy="fsdp"))
    with pytest.raises(ConfigError, match="unknown --config"):
        run(micro_config(tmp_path, corpus_dir, max_steps=2, config="giant"))
    with pytest.raises(DataError, match="fewer than one optimizer step"):
        run(micro_config(tmp_path, corpus_dir, max_steps=2, batch_size=10_000))
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("workers", [0, 2], ids=["to-the-process", "to-the-group-with-loader-workers"])
def test_sigterm_saves_and_resume_finishes(tmp_path, corpus_dir, workers):
    # with workers, the signal goes to the whole process group (as Ctrl-C, SLURM or `timeout` do)
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "vbhal.train", "--config", "tiny", "--hidden-size", "32", "--num-layers", "1",
           "--num-heads", "2", "--seq-length", "32", "--batch-size", "4", "--data", corpus_dir, "--device", "cpu",
           "--output-dir", str(out), "--no-progress", "--log-interval", "1", "--val-batches", "1",
           "--warmup-steps", "1", "--save-steps", "0", "--num-workers", str(workers)]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=REPO)
    proc = subprocess.Popen(cmd + ["--max-steps", "100000"], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    metrics = out / "metrics.jsonl"
    deadline = time.time() + 60
    while time.time() < deadline and not (metrics.exists() and metrics.read_text().count("\n") >= 3):
        time.sleep(0.2)
    if workers:
        os.killpg(proc.pid, signal.SIGTERM)
    else:
        proc.send_signal(signal.SIGTERM)
    text, _ = proc.communicate(timeout=60)
    assert proc.returncode == 128 + signal.SIGTERM, text
    assert "received SIGTERM" in text and "Continue with" in text
    ckpts = C.list_checkpoints(out / "checkpoints")
    assert len(ckpts) == 1
    stopped_at = C.load_checkpoint(ckpts[0])["step"]
    assert stopped_at >= 3
    done = subprocess.run(cmd + ["--max-steps", str(stopped_at + 2), "--resume", str(out)], env=env,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert f"resuming from {ckpts[0]}" in done.stderr
    assert C.load_checkpoint(C.list_checkpoints(out / "checkpoints")[-1])["step"] == stopped_at + 2


def test_deferred_sync_folds_clipping_into_fused_adamw(tmp_path, corpus_dir):
    # deferred sync (fused AdamW, on CUDA by default) divides the gradients by max(norm / max_norm, 1)
    # inside the optimizer kernel instead of clip_grad_norm_'s separate pass: same clip up to rounding
    kw = dict(max_steps=10, save_steps=0, val_batches=0, max_grad_norm=0.3, learning_rate=1e-2)
    sync = run(micro_config(tmp_path / "s", corpus_dir, deferred_sync=False, **kw))
    fused = run(micro_config(tmp_path / "f", corpus_dir, deferred_sync=True, **kw))
    unclipped = run(micro_config(tmp_path / "u", corpus_dir, deferred_sync=True, **dict(kw, max_grad_norm=0)))
    torch.testing.assert_close(torch.tensor(fused.losses), torch.tensor(sync.losses), rtol=1e-5, atol=1e-5)
    assert max(abs(a - b) for a, b in zip(unclipped.losses, sync.losses)) > 1e-3   # the clip bites


def test_compile_mode_needs_compile(tmp_path, corpus_dir):
    with pytest.raises(ConfigError, match="--compile-mode max-autotune-no-cudagraphs without --compile"):
        run(micro_config(tmp_path, corpus_dir, max_steps=2, compile_mode="max-autotune-no-cudagraphs"))
    with pytest.raises(ConfigError, match="--compile-mode"):
        run(micro_config(tmp_path, corpus_dir, max_steps=2, compile=True, compile_mode="fastest"))
