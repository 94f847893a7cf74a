"""Checkpoints that survive crashes, full disks and bit rot, and resume a run exactly.

A checkpoint is ``<output>/checkpoints/step_00000120.pt`` (one `torch.save` file: model, optimizer,
scheduler, grad scaler, every RNG state, data position, run and model config) plus a sidecar
``step_00000120.pt.json`` holding its size and SHA-256. Writing is atomic: the file is written to a
temporary name in the same folder, fsync'ed, renamed over the final name (``os.replace``), the folder
fsync'ed, and only then is the sidecar written (also atomically). So:

* a crash mid-write leaves a ``*.tmp*`` file that is never read, and the previous checkpoint intact;
* a checkpoint without a sidecar, or whose size/hash differ from it, is reported as incomplete or
  corrupted and the previous good one is used;
* loading uses ``torch.load(weights_only=True)``: no pickled code runs;
* free disk space is checked before writing (estimated size + 10% + 64 MiB).

FSDP2 runs write a distributed checkpoint (``torch.distributed.checkpoint``) folder
``step_00000120.dcp`` beside a small ``.pt`` with the non-tensor state; see `distributed.py`.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import shutil
from pathlib import Path
from typing import Any, Callable

import torch

from vbhal.train._errors import CheckpointError, ResumeError

__all__ = ["save_checkpoint", "load_checkpoint", "verify_checkpoint", "list_checkpoints",
           "find_resumable", "prune_checkpoints", "capture_rng_state", "restore_rng_state",
           "state_nbytes", "check_free_space", "checkpoint_path", "config_differences",
           "save_atomic", "CHECKPOINT_FORMAT"]

CHECKPOINT_FORMAT = 1
_STEP_RE = re.compile(r"^step_(\d+)\.pt$")
_HASH_CHUNK = 8 << 20
_DISK_MARGIN = 64 << 20


def checkpoint_path(ckpt_dir: Path, step: int) -> Path:
    return Path(ckpt_dir) / f"step_{step:08d}.pt"


def state_nbytes(obj: Any) -> int:
    """Bytes of all tensors in a nested state (dicts, lists, tuples)."""
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(state_nbytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(state_nbytes(v) for v in obj)
    return 0


def check_free_space(directory: Path, needed: int) -> None:
    """Raise CheckpointError when `directory`'s file system has less than needed + margin free."""
    directory.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(directory).free
    want = int(needed * 1.1) + _DISK_MARGIN
    if free < want:
        raise CheckpointError(
            f"not enough disk space to save a checkpoint in {directory}: about {want / 2**20:.0f} MiB "
            f"needed, {free / 2**20:.0f} MiB free. Free some space, lower --keep-checkpoints, or point "
            f"--output-dir at a larger disk.")


def _fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:  # pragma: no cover - platforms without directory fds
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover
        pass
    finally:
        os.close(fd)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(_HASH_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def save_atomic(obj: Any, path: Path, *, with_sidecar: bool = True) -> Path:
    """torch.save `obj` to `path` atomically (temp file, fsync, rename, fsync dir), then the sidecar."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    check_free_space(path.parent, state_nbytes(obj))
    tmp = path.with_name(f"{path.name}.tmp{os.getpid()}")
    try:
        with open(tmp, "wb") as fh:
            torch.save(obj, fh)
            fh.flush()
            os.fsync(fh.fileno())
        size = tmp.stat().st_size
        digest = _sha256(tmp) if with_sidecar else None
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    if with_sidecar:
        side = Path(f"{path}.json")
        side_tmp = side.with_name(f"{side.name}.tmp{os.getpid()}")
        with open(side_tmp, "w") as fh:
            json.dump({"format": CHECKPOINT_FORMAT, "size": size, "sha256": digest}, fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(side_tmp, side)
        _fsync_dir(path.parent)
    return path


def save_checkpoint(state: dict, ckpt_dir: Path, step: int) -> Path:
    """Write `state` as the checkpoint of `step` under ckpt_dir (atomic, with sidecar)."""
    return save_atomic(state, checkpoint_path(ckpt_dir, step))


def verify_checkpoint(path: Path) -> str | None:
    """None when `path` is complete and matches its sidecar, else the reason it is not usable."""
    path = Path(path)
    if not path.is_file():
        return "file does not exist"
    side = Path(f"{path}.json")
    if not side.is_file():
        return "no sidecar .json (the save did not finish)"
    try:
        meta = json.loads(side.read_text())
        size, digest = int(meta["size"]), str(meta["sha256"])
    except (OSError, ValueError, KeyError, TypeError):
        return "sidecar .json unreadable"
    actual = path.stat().st_size
    if actual != size:
        return f"truncated: {actual} bytes on disk, {size} written"
    if _sha256(path) != digest:
        return "corrupted: SHA-256 differs from the one recorded at save time"
    return None


def load_checkpoint(path: Path, map_location: str | torch.device = "cpu", *, verify: bool = True) -> dict:
    """Load a checkpoint with ``weights_only=True``; CheckpointError says why it cannot be used."""
    path = Path(path)
    if verify:
        reason = verify_checkpoint(path)
        if reason is not None:
            raise CheckpointError(f"checkpoint {path} is not usable: {reason}.")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:
        raise CheckpointError(f"checkpoint {path} could not be loaded ({type(exc).__name__}: "
                              f"{str(exc).splitlines()[0] if str(exc) else ''}).") from None
    if not isinstance(state, dict):
        raise CheckpointError(f"{path} does not hold a vbhal checkpoint (got {type(state).__name__}).")
    return state


def list_checkpoints(ckpt_dir: Path) -> list[Path]:
    """Checkpoint files in ckpt_dir, oldest step first."""
    ckpt_dir = Path(ckpt_dir)
    if not ckpt_dir.is_dir():
        return []
    found = []
    for p in ckpt_dir.iterdir():
        m = _STEP_RE.match(p.name)
        if m:
            found.append((int(m.group(1)), p))
    return [p for _, p in sorted(found)]


def _candidate_dir(path: Path) -> Path:
    if (path / "checkpoints").is_dir():
        return path / "checkpoints"
    return path


def find_resumable(path: str | Path, log: Callable[[str], None] = print) -> tuple[Path, dict]:
    """The newest usable checkpoint at `path` (a checkpoint file, a checkpoints folder or an output dir).

    A named file that is truncated or corrupted is reported and the newest good checkpoint older than
    it (same folder) is used instead. Raises CheckpointError when none is usable.
    """
    path = Path(path).expanduser()
    if path.is_dir():
        candidates = list_checkpoints(_candidate_dir(path))
        if not candidates:
            raise CheckpointError(f"no checkpoints (step_*.pt) found in {path}; pass a checkpoint file or "
                                  f"the --output-dir of an earlier run.")
    elif path.is_file() or Path(f"{path}.json").exists():
        siblings = list_checkpoints(path.parent)
        if path in siblings:
            candidates = siblings[:siblings.index(path) + 1]
        else:
            candidates = [path]
    else:
        raise CheckpointError(f"--resume {path}: no such file or folder.")
    problems = []
    for cand in reversed(candidates):
        try:
            state = load_checkpoint(cand)
        except CheckpointError as exc:
            problems.append(str(exc))
            log(f"WARNING: {exc} Trying the previous checkpoint.")
            continue
        if problems:
            log(f"resuming from {cand}, the newest good checkpoint.")
        return cand, state
    raise CheckpointError("no usable checkpoint: " + " | ".join(problems))


def prune_checkpoints(ckpt_dir: Path, keep: int, protect: Path | None = None) -> list[Path]:
    """Delete all but the newest `keep` checkpoints (and their sidecars / DCP folders)."""
    removed = []
    ckpts = list_checkpoints(ckpt_dir)
    for p in ckpts[:-keep] if keep > 0 else []:
        if protect is not None and p == protect:
            continue
        for extra in (Path(f"{p}.json"), p.with_suffix(".dcp")):
            if extra.is_dir():
                shutil.rmtree(extra, ignore_errors=True)
            else:
                extra.unlink(missing_ok=True)
        p.unlink(missing_ok=True)
        removed.append(p)
    return removed


# ---------------------------------------------------------------------------------------------
# RNG state: python, numpy, torch CPU, every CUDA device
# ---------------------------------------------------------------------------------------------

def capture_rng_state() -> dict:
    """Every RNG state as tensors and plain types (loadable with weights_only=True)."""
    py = random.getstate()
    state: dict[str, Any] = {"python": [py[0], list(py[1]), py[2]], "torch": torch.get_rng_state()}
    try:
        import numpy as np
        kind, keys, pos, has_gauss, gauss = np.random.get_state()
        state["numpy"] = {"kind": str(kind), "keys": torch.from_numpy(keys.astype("int64")),
                          "pos": int(pos), "has_gauss": int(has_gauss), "gauss": float(gauss)}
    except ImportError:  # pragma: no cover
        pass
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict) -> None:
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    torch.set_rng_state(state["torch"])
    if "numpy" in state:
        import numpy as np
        n = state["numpy"]
        np.random.set_state((n["kind"], n["keys"].numpy().astype("uint32"), n["pos"], n["has_gauss"],
                             n["gauss"]))
    if "cuda" in state and torch.cuda.is_available():
        cuda_states = state["cuda"]
        if len(cuda_states) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda_states)
        else:
            for i, s in enumerate(cuda_states[:torch.cuda.device_count()]):
                torch.cuda.set_rng_state(s, i)


def config_differences(saved: dict, current: dict) -> list[str]:
    """Human-readable `key: saved -> current` for every differing key."""
    keys = sorted(set(saved) | set(current))
    return [f"{k}: checkpoint {saved.get(k)!r} vs now {current.get(k)!r}"
            for k in keys if saved.get(k) != current.get(k)]


def require_same_model(saved: dict, current: dict, path: Path) -> None:
    diff = config_differences(saved, current)
    if diff:
        raise ResumeError(f"cannot resume from {path}: the model config differs ({'; '.join(diff)}). "
                          f"Resume with the same model flags, or start a new run in another --output-dir.")
