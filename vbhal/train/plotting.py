"""The loss-curve PNG of a run, drawn from its metrics JSONL (matplotlib, Agg backend, no display)."""

from __future__ import annotations

import json
from pathlib import Path

__all__ = ["read_metrics", "save_loss_curve"]


def read_metrics(path: Path) -> list[dict]:
    """Records of a metrics.jsonl file; a torn last line (crash mid-write) is skipped."""
    out = []
    p = Path(path)
    if not p.is_file():
        return out
    for line in p.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except ValueError:
            continue
    return out


def save_loss_curve(metrics_path: Path, png_path: Path, title: str = "vbhal train") -> Path | None:
    """Plot training loss (per logged step) and validation loss against step; None if no data or
    matplotlib is not installed."""
    records = read_metrics(metrics_path)
    train = [(r["step"], r["loss"]) for r in records if r.get("kind") == "train" and "loss" in r]
    val = [(r["step"], r["val_loss"]) for r in records if r.get("kind") == "val"]
    if not train and not val:
        return None
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    if train:
        ax.plot(*zip(*train), label="train loss", lw=1)
    if val:
        ax.plot(*zip(*val), "o-", label="validation loss", lw=1.5)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("cross-entropy (nats / byte)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    png_path = Path(png_path)
    tmp = png_path.with_name(png_path.name + ".tmp.png")
    fig.savefig(tmp)
    plt.close(fig)
    tmp.replace(png_path)
    return png_path
