"""Shared fixtures of the training-launcher tests: one thread, a private cache, a tiny corpus."""

from __future__ import annotations

import pytest
import torch
from train_helpers import write_corpus


@pytest.fixture(autouse=True)
def _one_thread_and_private_cache(tmp_path_factory, monkeypatch):
    # 2 shared cores: one intra-op thread is both faster and deterministic here.
    torch.set_num_threads(1)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.setenv("VBHAL_CACHE_DIR", str(tmp_path_factory.getbasetemp() / "vbhal_cache"))


@pytest.fixture
def corpus_dir(tmp_path):
    return write_corpus(tmp_path / "corpus")
