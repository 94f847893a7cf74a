"""The record `optimize` keeps of what it changed: shown by `vbhal.stats(model)` and `vbhal.print_stats()`."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class Change:
    kind: str  # "fp4", "attention", "checkpoint", "mixed_precision", "offload", "kernel", "skip", ...
    name: str  # qualified module name ("" for the whole model)
    detail: str


@dataclass
class OptimizeReport:
    """Every change `optimize` made to one model, and the facts it decided on."""

    device: str = ""
    device_reason: str = ""
    mode: str = ""
    config: dict[str, Any] = field(default_factory=dict)
    kernels: dict[str, str] = field(default_factory=dict)  # kernel name -> "backend: description"
    changes: list[Change] = field(default_factory=list)
    param_bytes_before: int = 0
    param_bytes_after: int = 0
    warnings: list[str] = field(default_factory=list)

    def add(self, kind: str, name: str, detail: str = "") -> None:
        self.changes.append(Change(kind, name, detail))

    def warn(self, message: str) -> None:
        self.warnings.append(message)

    def count(self, kind: str) -> int:
        return sum(1 for c in self.changes if c.kind == kind)

    def to_dict(self) -> dict[str, Any]:
        return {
            "device": self.device,
            "device_reason": self.device_reason,
            "mode": self.mode,
            "config": self.config,
            "kernels": self.kernels,
            "changes": [c.__dict__ for c in self.changes],
            "param_bytes_before": self.param_bytes_before,
            "param_bytes_after": self.param_bytes_after,
            "warnings": self.warnings,
        }

    def format(self, max_rows: int = 40) -> str:
        from vbhal._table import format_table

        lines = [f"vbhal optimize report: mode={self.mode}, device={self.device} (chosen by {self.device_reason})"]
        if self.kernels:
            lines.append(format_table(["kernel", "bound implementation"], sorted(self.kernels.items())))
        by_kind: dict[str, int] = {}
        for c in self.changes:
            by_kind[c.kind] = by_kind.get(c.kind, 0) + 1
        rows = [[c.kind, c.name or "<model>", c.detail] for c in self.changes[:max_rows]]
        if rows:
            lines.append(format_table(["change", "module", "detail"], rows))
        if len(self.changes) > max_rows:
            lines.append(f"... and {len(self.changes) - max_rows} more changes "
                         f"({', '.join(f'{k}: {v}' for k, v in sorted(by_kind.items()))})")
        before, after = self.param_bytes_before, self.param_bytes_after
        ratio = f" ({after / before:.2f}x)" if before else ""
        lines.append(f"parameter + buffer bytes: {_mib(before)} -> {_mib(after)}{ratio}")
        lines.extend(f"warning: {w}" for w in self.warnings)
        return "\n".join(lines)


def _mib(n: int) -> str:
    return f"{n / 2**20:.2f} MiB"
