"""Helpers of the training-launcher tests (imported by name: pytest puts tests/train on sys.path)."""

from __future__ import annotations

import os
import random

from vbhal.train.config import TrainConfig


def write_corpus(folder, n_docs: int = 60, seed: int = 0, words: int = 80) -> str:
    """n_docs small text files of pseudo-English (fresh content, deterministic by seed)."""
    rng = random.Random(seed)
    vocab = ["the", "model", "trains", "on", "bytes", "and", "learns", "python", "def", "return", "data",
             "loss", "falls", "while", "for", "in", "range", "print", "value", "self"]
    os.makedirs(folder, exist_ok=True)
    for i in range(n_docs):
        text = " ".join(rng.choice(vocab) for _ in range(words)) + "\n"
        with open(os.path.join(folder, f"doc_{i:03d}.txt"), "w") as fh:
            fh.write(text)
    return str(folder)


def micro_config(tmp_path, corpus, **kw) -> TrainConfig:
    """A model and run small enough for a few seconds on one CPU thread."""
    base = dict(config="tiny", hidden_size=32, num_layers=1, num_heads=2, seq_length=32, batch_size=4,
                data=[corpus], output_dir=str(tmp_path / "out"), progress=False, tensorboard=False,
                log_interval=1, val_batches=2, warmup_steps=2, learning_rate=3e-3, device="cpu",
                max_corpus_bytes=None, num_workers=0)
    base.update(kw)
    return TrainConfig(**base)
