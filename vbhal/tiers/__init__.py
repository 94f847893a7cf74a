"""The memory hierarchy ("VGPU stack"): device memory -> pinned host memory -> disk.

* :class:`TierStack` — a directory of tensors by key over the levels, demotion under byte budgets (LRU,
  then by the learned access order), asynchronous prefetch learned from the first step, per-level statistics.
* :class:`HostPool` — pinned host memory from chunks we size (counted against RAM and the cgroup limit).
* :func:`format_tier_stats` / :func:`plot_tier_traffic` — what ``vbhal.print_stats()`` shows, and a PNG.
* Offloaded training (weights streamed per layer, AdamW on the host) is ``vbhal.nn.offload.apply_offload``.
"""

from vbhal.tiers.pool import HostBlock, HostPool, TierWarning
from vbhal.tiers.spill import DiskFullError, SpillCorruptionError, SpillDirectory, sweep_stale
from vbhal.tiers.stack import LEVEL_DEVICE, LEVEL_DISK, LEVEL_HOST, Tier, TierStack
from vbhal.tiers.stats import LevelStats, TierStats, format_tier_stats, plot_tier_traffic

__all__ = [
    "LEVEL_DEVICE",
    "LEVEL_DISK",
    "LEVEL_HOST",
    "DiskFullError",
    "HostBlock",
    "HostPool",
    "LevelStats",
    "SpillCorruptionError",
    "SpillDirectory",
    "Tier",
    "TierStack",
    "TierStats",
    "TierWarning",
    "format_tier_stats",
    "plot_tier_traffic",
    "sweep_stale",
]
