"""Statistics of the tier stack: per level counters, per step traffic, a text table and a PNG plot."""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Any

LEVEL_NAMES = {0: "device", 1: "host", 2: "disk"}


@dataclass
class LevelStats:
    """Counters of one level. ``bytes_in``: bytes copied into this level; ``stall_s``: time a caller waited
    on the host for a tensor of this level (a copy, a read from disk, an optimizer step not finished)."""

    level: int
    name: str = ""
    hits: int = 0
    misses: int = 0
    promotions: int = 0
    demotions: int = 0
    bytes_in: int = 0
    bytes_out: int = 0
    stall_s: float = 0.0
    failed_demotions: int = 0
    busy_s: float = 0.0  # time spent working at this level (e.g. host optimizer steps)

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


@dataclass
class TierStats:
    """Counters for every level plus a per-step history of traffic (for :func:`plot_tier_traffic`)."""

    levels: dict[int, LevelStats] = field(default_factory=dict)
    steps: list[dict[str, float]] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)
    _mark: dict[str, float] = field(default_factory=dict, repr=False)

    def level(self, level: int, name: str | None = None) -> LevelStats:
        st = self.levels.get(level)
        if st is None:
            st = self.levels[level] = LevelStats(level, name or LEVEL_NAMES.get(level, str(level)))
        elif name and not st.name:
            st.name = name
        return st

    def add(self, level: int, **counts: float) -> None:
        """Add to counters of `level` atomically (workers and the main thread both count)."""
        with self._lock:
            st = self.level(level)
            for k, v in counts.items():
                setattr(st, k, getattr(st, k) + v)

    def totals(self) -> dict[str, float]:
        out: dict[str, float] = {}
        for lv, st in self.levels.items():
            out[f"l{lv}_in"] = st.bytes_in
            out[f"l{lv}_out"] = st.bytes_out
            out[f"l{lv}_stall"] = st.stall_s
            out[f"l{lv}_busy"] = st.busy_s
        return out

    def end_step(self, **extra: float) -> dict[str, float]:
        """Close a step: record the traffic since the last call (bytes in/out and stall per level)."""
        with self._lock:
            now = self.totals()
            row = {k: v - self._mark.get(k, 0.0) for k, v in now.items()}
            row.update(extra)
            self._mark = now
            self.steps.append(row)
        return row

    def as_dict(self) -> dict[str, Any]:
        return {"levels": {lv: st.as_dict() for lv, st in sorted(self.levels.items())}, "steps": list(self.steps)}


def format_tier_stats(stack: Any) -> str:
    """A table of per-level statistics of a :class:`TierStack` or an offload engine (anything with ``stats``).

    This is what ``vbhal.print_stats()`` shows for the memory hierarchy.
    """
    from vbhal._table import format_table, human_bytes

    stats: TierStats = stack.stats if hasattr(stack, "stats") else stack
    rows = []
    for lv, st in sorted(stats.levels.items()):
        rows.append(
            [
                f"{lv} {st.name}",
                st.hits,
                st.misses,
                st.promotions,
                st.demotions,
                st.failed_demotions,
                human_bytes(st.bytes_in),
                human_bytes(st.bytes_out),
                f"{st.stall_s:.3f}",
            ]
        )
    title = getattr(stack, "stats_title", "vbhal memory tiers")
    tiers = getattr(stack, "tiers", None)
    if tiers:  # capacity and use of each level (a TierStack), and the measured copy bandwidth between levels
        for row, t in zip(rows, sorted(tiers, key=lambda t: t.level)):
            row.append(f"{human_bytes(t.used_bytes)} / {human_bytes(t.capacity_bytes)}")
        text = format_table(
            ["level", "hits", "misses", "promotions", "demotions", "failed demotions", "bytes in", "bytes out",
             "stall s", "used / budget"], rows, title=title)
        bw = getattr(stack, "bandwidth", None)
        if bw:
            text += "\nmeasured copy bandwidth (to<-from): " + ", ".join(f"{k} {v / 1e9:.2f} GB/s" for k, v in bw.items())
        return text
    return format_table(
        ["level", "hits", "misses", "promotions", "demotions", "failed demotions", "bytes in", "bytes out", "stall s"],
        rows,
        title=title,
    )


def plot_tier_traffic(stack: Any, path: str) -> str:
    """Write a PNG of the bytes moved into each level per step (matplotlib, imported only here)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as e:  # optional dependency
        raise ImportError("plot_tier_traffic needs matplotlib: pip install matplotlib") from e
    stats: TierStats = stack.stats if hasattr(stack, "stats") else stack
    fig, ax = plt.subplots(figsize=(7, 3.5))
    steps = list(range(1, len(stats.steps) + 1))
    for lv in sorted(stats.levels):
        name = stats.levels[lv].name
        ax.plot(steps, [r.get(f"l{lv}_in", 0) / 2**20 for r in stats.steps], marker="o", label=f"into {lv} {name}")
        ax.plot(steps, [r.get(f"l{lv}_out", 0) / 2**20 for r in stats.steps], ls="--", label=f"out of {lv} {name}")
    ax.set_xlabel("step")
    ax.set_ylabel("MiB moved")
    ax.set_title("vbhal tier traffic per step")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
