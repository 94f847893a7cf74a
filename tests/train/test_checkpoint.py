"""Checkpoint files: atomic writes, sidecar verification, fallback to the previous good one, pruning,
free-disk check, RNG capture, config differences."""

from __future__ import annotations

import collections
import os
import random

import numpy as np
import pytest
import torch

from vbhal.train import checkpoint as C
from vbhal.train._errors import CheckpointError, ResumeError


class _Custom:
    pass


def _state(step: int) -> dict:
    g = torch.Generator().manual_seed(step)
    return {"step": step, "model": {"w": torch.randn(64, 32, generator=g)}, "note": f"s{step}"}


def test_save_is_atomic_with_sidecar_and_loads_weights_only(tmp_path):
    p = C.save_checkpoint(_state(3), tmp_path, 3)
    assert p.name == "step_00000003.pt" and os.path.isfile(f"{p}.json")
    assert not [f for f in os.listdir(tmp_path) if ".tmp" in f]
    assert C.verify_checkpoint(p) is None
    s = C.load_checkpoint(p)
    assert torch.equal(s["model"]["w"], _state(3)["model"]["w"]) and s["note"] == "s3"


def test_weights_only_refuses_pickled_code(tmp_path):
    p = tmp_path / "step_00000001.pt"
    C.save_atomic({"bad": _Custom()}, p)   # a class weights_only does not allow
    with pytest.raises(CheckpointError, match="could not be loaded"):
        C.load_checkpoint(p)


@pytest.mark.parametrize("damage", ["truncate", "flip", "no_sidecar"])
def test_damaged_latest_is_reported_and_previous_good_used(tmp_path, damage):
    for s in (1, 2, 3):
        C.save_checkpoint(_state(s), tmp_path, s)
    last = C.checkpoint_path(tmp_path, 3)
    if damage == "truncate":
        data = last.read_bytes()
        last.write_bytes(data[: len(data) // 2])
    elif damage == "flip":
        data = bytearray(last.read_bytes())
        data[len(data) // 2] ^= 0x40
        last.write_bytes(bytes(data))
    else:
        os.unlink(f"{last}.json")
    reason = C.verify_checkpoint(last)
    assert reason is not None and {"truncate": "truncated", "flip": "corrupted", "no_sidecar": "sidecar"}[damage] in reason
    messages = []
    path, state = C.find_resumable(tmp_path, log=messages.append)
    assert path == C.checkpoint_path(tmp_path, 2) and state["step"] == 2
    assert any("not usable" in m for m in messages)
    # naming the damaged file explicitly also falls back to the one before it
    path2, _ = C.find_resumable(last, log=messages.append)
    assert path2 == path


def test_no_usable_checkpoint_is_an_error(tmp_path):
    with pytest.raises(CheckpointError, match="no checkpoints"):
        C.find_resumable(tmp_path)
    C.save_checkpoint(_state(1), tmp_path, 1)
    p = C.checkpoint_path(tmp_path, 1)
    p.write_bytes(b"garbage")
    with pytest.raises(CheckpointError, match="no usable checkpoint"):
        C.find_resumable(tmp_path, log=lambda m: None)
    with pytest.raises(CheckpointError, match="no such file"):
        C.find_resumable(tmp_path / "missing.pt")


def test_output_dir_resolves_to_its_checkpoints_folder(tmp_path):
    C.save_checkpoint(_state(7), tmp_path / "checkpoints", 7)
    path, state = C.find_resumable(tmp_path)
    assert state["step"] == 7


def test_prune_keeps_newest(tmp_path):
    for s in range(1, 6):
        C.save_checkpoint(_state(s), tmp_path, s)
    removed = C.prune_checkpoints(tmp_path, keep=2)
    assert [p.name for p in removed] == [f"step_0000000{i}.pt" for i in (1, 2, 3)]
    assert [p.name for p in C.list_checkpoints(tmp_path)] == ["step_00000004.pt", "step_00000005.pt"]
    assert sorted(f for f in os.listdir(tmp_path) if f.endswith(".json")) == [
        "step_00000004.pt.json", "step_00000005.pt.json"]


def test_free_disk_is_checked_before_writing(tmp_path, monkeypatch):
    import shutil
    Usage = collections.namedtuple("Usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda p: Usage(10**9, 10**9 - 1000, 1000))
    with pytest.raises(CheckpointError, match="not enough disk space"):
        C.save_checkpoint(_state(1), tmp_path, 1)
    assert C.list_checkpoints(tmp_path) == [] and not os.listdir(tmp_path)


def test_failed_write_leaves_previous_checkpoint_and_no_temp(tmp_path, monkeypatch):
    C.save_checkpoint(_state(1), tmp_path, 1)

    def boom(*a, **k):
        raise OSError("disk on fire")
    monkeypatch.setattr(torch, "save", boom)
    with pytest.raises(OSError):
        C.save_checkpoint(_state(2), tmp_path, 2)
    assert [p.name for p in C.list_checkpoints(tmp_path)] == ["step_00000001.pt"]
    assert not [f for f in os.listdir(tmp_path) if ".tmp" in f]


def test_rng_state_round_trips_through_a_weights_only_file(tmp_path):
    random.seed(1); np.random.seed(2); torch.manual_seed(3)
    st = C.capture_rng_state()
    C.save_atomic({"rng": st}, tmp_path / "r.pt")
    expected = (random.random(), np.random.rand(), torch.rand(3))
    random.seed(9); np.random.seed(9); torch.manual_seed(9)
    C.restore_rng_state(C.load_checkpoint(tmp_path / "r.pt")["rng"])
    got = (random.random(), np.random.rand(), torch.rand(3))
    assert got[0] == expected[0] and got[1] == expected[1] and torch.equal(got[2], expected[2])


def test_config_difference_is_named():
    with pytest.raises(ResumeError, match=r"hidden_size: checkpoint 64 vs now 128"):
        C.require_same_model({"hidden_size": 64, "num_layers": 2}, {"hidden_size": 128, "num_layers": 2}, "x.pt")
    C.require_same_model({"a": 1}, {"a": 1}, "x.pt")


def test_state_nbytes_counts_nested_tensors():
    assert C.state_nbytes({"a": torch.zeros(10), "b": [torch.zeros(2, dtype=torch.float16), {"c": 3}]}) == 44
