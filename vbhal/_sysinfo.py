"""Host facts every backend and the tier stack share: RAM and cgroup limits, free disk, versions."""

from __future__ import annotations

import importlib.metadata
import os
import shutil
import tempfile
from pathlib import Path

import psutil

_CGROUP_FILES = ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes")


def cgroup_memory_limit() -> int | None:
    """The cgroup memory limit in bytes, or None when there is none (pinned memory counts against it too)."""
    for path in _CGROUP_FILES:
        try:
            raw = Path(path).read_text().strip()
        except OSError:
            continue
        if raw and raw != "max":
            try:
                value = int(raw)
            except ValueError:
                continue
            if value < (1 << 60):  # cgroup v1 writes a huge number for "unlimited"
                return value
    return None


def host_memory_total() -> int:
    """Host RAM this process may use: physical RAM, capped by the cgroup limit."""
    total = psutil.virtual_memory().total
    limit = cgroup_memory_limit()
    return min(total, limit) if limit else total


def host_memory_available() -> int:
    """RAM available now, capped by what the cgroup still allows."""
    avail = psutil.virtual_memory().available
    limit = cgroup_memory_limit()
    if limit:
        try:
            used = int(Path("/sys/fs/cgroup/memory.current").read_text())
        except (OSError, ValueError):
            used = psutil.Process().memory_info().rss
        avail = min(avail, max(0, limit - used))
    return avail


def spill_root() -> Path:
    """Where disk tiers put their private directories (VBHAL_SPILL_DIR, else the system temp dir)."""
    return Path(os.environ.get("VBHAL_SPILL_DIR") or tempfile.gettempdir())


def disk_free(path: Path | None = None) -> int:
    path = spill_root() if path is None else path
    while not path.exists() and path != path.parent:
        path = path.parent
    return shutil.disk_usage(path).free


def package_version(name: str) -> str | None:
    """Installed version of a distribution, without importing it (so no vendor package is initialised)."""
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None
