"""Two real processes on CPU (torchrun, gloo): DDP matches one process with the same global batch;
FSDP2 trains, writes a distributed checkpoint and resumes from it."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from train_helpers import micro_config

from vbhal.train import checkpoint as C
from vbhal.train.distributed import scale_learning_rate
from vbhal.train.loop import run

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
ARGS = ["--config", "tiny", "--hidden-size", "32", "--num-layers", "1", "--num-heads", "2", "--seq-length", "32",
        "--batch-size", "4", "--device", "cpu", "--no-progress", "--log-interval", "1", "--max-steps", "6",
        "--warmup-steps", "2", "--learning-rate", "3e-3", "--val-batches", "2", "--lr-scaling", "none",
        "--no-tensorboard", "--num-workers", "0"]


def _torchrun(extra, timeout=90):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=REPO)
    return subprocess.run([sys.executable, "-m", "vbhal.train", *ARGS, *extra], env=env, capture_output=True,
                          text=True, timeout=timeout)


def _final_model(out):
    return C.load_checkpoint(C.list_checkpoints(out / "checkpoints")[-1])


def test_lr_scaling_rules():
    assert scale_learning_rate(1e-3, 4, "linear") == pytest.approx(4e-3)
    assert scale_learning_rate(1e-3, 4, "sqrt") == pytest.approx(2e-3)
    assert scale_learning_rate(1e-3, 4, "none") == 1e-3


def test_ddp_two_processes_match_one_process_with_the_same_global_batch(tmp_path, corpus_dir):
    single = run(micro_config(tmp_path / "one", corpus_dir, batch_size=8, max_steps=6, lr_scaling="none"))
    assert single.step == 6
    out = tmp_path / "ddp"
    proc = _torchrun(["--data", corpus_dir, "--output-dir", str(out), "--nproc", "2"])
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    assert "ranks: 2 (ddp)" in proc.stderr
    ddp = _final_model(out)
    ref = _final_model(tmp_path / "one" / "out")
    assert ddp["world_size"] == 2 and len(ddp["rng"]) == 2
    assert ddp["step"] == 6 and ddp["consumed_in_epoch"] == ref["consumed_in_epoch"] == 48
    for k, v in ref["model"].items():
        torch.testing.assert_close(ddp["model"][k], v, rtol=0, atol=1e-4, msg=k)  # Adam amplifies rounding on ~0 grads
    # rank 0 alone writes the outputs
    assert len(list(out.glob("training_*.log"))) == 1


def test_fsdp2_trains_saves_sharded_and_resumes(tmp_path, corpus_dir):
    out = tmp_path / "fsdp"
    common = ["--data", corpus_dir, "--output-dir", str(out), "--nproc", "2", "--strategy", "fsdp"]
    first = _torchrun(common + ["--stop-after-steps", "3"])
    assert first.returncode == 0, first.stderr[-4000:]
    assert (out / "checkpoints" / "step_00000003.dcp").is_dir()
    second = _torchrun(common + ["--resume", str(out)])
    assert second.returncode == 0, second.stderr[-4000:]
    assert "resuming from" in second.stderr
    state = _final_model(out)
    assert state["step"] == 6 and "sharded" in state
    single = run(micro_config(tmp_path / "one", corpus_dir, batch_size=8, max_steps=6, lr_scaling="none"))
    best = C.load_checkpoint(out / "best_model.pt")
    ref = C.load_checkpoint(tmp_path / "one" / "out" / "best_model.pt")
    assert best["step"] == ref["step"] == single.step
    for k, v in ref["model"].items():
        torch.testing.assert_close(best["model"][k], v, rtol=0, atol=1e-4, msg=k)  # Adam amplifies rounding on ~0 grads


def test_bad_resume_path_fails_on_every_rank_without_hanging(tmp_path, corpus_dir):
    proc = _torchrun(["--data", corpus_dir, "--output-dir", str(tmp_path / "o"), "--nproc", "2",
                      "--resume", str(tmp_path / "nothing")], timeout=60)
    assert proc.returncode != 0
    assert proc.stderr.count("vbhal train: error: --resume") == 2, proc.stderr[-3000:]
