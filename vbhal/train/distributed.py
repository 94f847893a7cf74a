"""Multi-process training: torchrun + PyTorch DDP (default) or FSDP2 (`fully_shard`).

vbhal has no distributed engine of its own (DESIGN.md): this module only

* reads torchrun's environment and initialises the process group (NCCL on CUDA, gloo on CPU);
* wraps the model in DDP, or shards every `Block` and then the root with FSDP2;
* gives the loop a `no_sync` context for gradient accumulation, flag/mean all-reduces (to agree on
  stopping after SIGTERM / NaN) and the LR scaling rule;
* saves/loads FSDP2 state with `torch.distributed.checkpoint` (each rank writes its shard);
* re-launches ``vbhal train --nproc N`` under torchrun.
"""

from __future__ import annotations

import contextlib
import math
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn as nn

from vbhal.train._errors import ConfigError

__all__ = ["DistInfo", "init_distributed", "wrap_model", "unwrap_model", "no_sync", "any_rank", "max_across_ranks",
           "mean_across_ranks", "scale_learning_rate", "launch_torchrun", "barrier", "shutdown",
           "broadcast_object", "gather_objects", "save_sharded", "load_sharded"]


@dataclass
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1
    device: torch.device = torch.device("cpu")

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def resolve_device(name: str, local_rank: int = 0) -> torch.device:
    """'auto' -> this rank's CUDA device when there is one, else CPU (said in the run log)."""
    if name == "auto":
        return torch.device("cuda", local_rank) if torch.cuda.is_available() else torch.device("cpu")
    dev = torch.device(name)
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError("--device cuda was asked for but torch sees no CUDA device; use --device cpu "
                              "or auto.")
        if dev.index is None:
            dev = torch.device("cuda", local_rank)
    return dev


def init_distributed(device_name: str = "auto") -> DistInfo:
    """Join the process group when launched by torchrun (WORLD_SIZE > 1), else a single process."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", str(world)))
    device = resolve_device(device_name, local_rank)
    if world > 1 and not dist.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(device)
        backend = "nccl" if device.type == "cuda" else "gloo"
        kwargs = {"device_id": device} if device.type == "cuda" else {}
        dist.init_process_group(backend=backend, **kwargs)
    return DistInfo(rank=rank, world_size=world, local_rank=local_rank, local_world_size=local_world,
                    device=device)


def wrap_model(model: nn.Module, strategy: str, info: DistInfo) -> nn.Module:
    """DDP or FSDP2 around `model` (returned unchanged in a single process)."""
    if not info.enabled:
        return model
    if strategy == "ddp":
        from torch.nn.parallel import DistributedDataParallel as DDP
        ids = [info.device.index] if info.device.type == "cuda" else None
        return DDP(model, device_ids=ids)
    if strategy == "fsdp":
        try:
            from torch.distributed.fsdp import fully_shard
        except ImportError:  # torch < 2.6 kept it under _composable
            from torch.distributed._composable.fsdp import fully_shard  # type: ignore
        from torch.distributed.device_mesh import init_device_mesh
        mesh = init_device_mesh(info.device.type, (info.world_size,))
        for block in getattr(model, "blocks", []):
            fully_shard(block, mesh=mesh)
        fully_shard(model, mesh=mesh)
        return model
    raise ConfigError(f"unknown --strategy {strategy!r}; use ddp or fsdp.")


def unwrap_model(model: nn.Module) -> nn.Module:
    """The user's module under DDP / torch.compile wrappers."""
    while True:
        if hasattr(model, "module") and isinstance(model.module, nn.Module):
            model = model.module
        elif hasattr(model, "_orig_mod"):
            model = model._orig_mod
        else:
            return model


@contextlib.contextmanager
def no_sync(model: nn.Module, skip_sync: bool):
    """Skip the gradient all-reduce of this backward (accumulation micro-steps but the last)."""
    if not skip_sync:
        yield
        return
    if hasattr(model, "no_sync"):                       # DDP
        with model.no_sync():
            yield
    elif hasattr(model, "set_requires_gradient_sync"):  # FSDP2
        model.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            model.set_requires_gradient_sync(True)
    else:
        yield


def any_rank(flag: bool, info: DistInfo) -> bool:
    """True on every rank when `flag` is True on at least one (used to agree on stopping)."""
    if not info.enabled:
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=info.device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item() > 0)


def max_across_ranks(value: int, info: DistInfo) -> int:
    """The largest of each rank's `value` (a status code: 0 go on, 1 stop after this step, 2 NaN)."""
    if not info.enabled:
        return value
    t = torch.tensor([float(value)], device=info.device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return int(t.item())


def mean_across_ranks(values: torch.Tensor, info: DistInfo) -> torch.Tensor:
    if not info.enabled:
        return values
    values = values.clone()
    dist.all_reduce(values, op=dist.ReduceOp.SUM)
    return values / info.world_size


def broadcast_object(obj, info: DistInfo):
    if not info.enabled:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def gather_objects(obj, info: DistInfo) -> list:
    if not info.enabled:
        return [obj]
    out = [None] * info.world_size
    dist.all_gather_object(out, obj)
    return out


def barrier(info: DistInfo) -> None:
    if info.enabled:
        dist.barrier()


def shutdown(info: DistInfo) -> None:
    if info.enabled and dist.is_initialized():
        dist.destroy_process_group()


def scale_learning_rate(lr: float, world_size: int, rule: str) -> float:
    """Scale the base LR with the number of data-parallel ranks: linear (Goyal et al. 2017), sqrt, none."""
    if rule == "linear":
        return lr * world_size
    if rule == "sqrt":
        return lr * math.sqrt(world_size)
    if rule == "none":
        return lr
    raise ConfigError(f"unknown --lr-scaling {rule!r}; use linear, sqrt or none.")


def launch_torchrun(nproc: int, argv: list[str]) -> int:
    """Run ``python -m torch.distributed.run --nproc_per_node=N -m vbhal.train ARGV`` and wait."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           "-m", "vbhal.train", *argv]
    print("launching:", " ".join(cmd), flush=True)
    try:
        return subprocess.call(cmd)
    except KeyboardInterrupt:  # torchrun forwards the signal to the ranks, which save and exit
        return 130


# ---------------------------------------------------------------------------------------------
# FSDP2 checkpoints (torch.distributed.checkpoint): every rank writes its own shard
# ---------------------------------------------------------------------------------------------

def save_sharded(model: nn.Module, optimizer: torch.optim.Optimizer, folder: Path, info: DistInfo) -> None:
    """Write model + optimizer shards to `folder` atomically (temp folder renamed by rank 0)."""
    import shutil

    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    folder = Path(folder)
    tmp = folder.with_name(folder.name + ".tmp")
    if info.is_main and tmp.exists():
        shutil.rmtree(tmp)
    barrier(info)
    model_sd, optim_sd = get_state_dict(model, optimizer)
    dcp.save({"model": model_sd, "optimizer": optim_sd}, checkpoint_id=str(tmp))
    barrier(info)
    if info.is_main:
        if folder.exists():
            shutil.rmtree(folder)
        os.replace(tmp, folder)
    barrier(info)


def load_sharded(model: nn.Module, optimizer: torch.optim.Optimizer, folder: Path) -> None:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    model_sd, optim_sd = get_state_dict(model, optimizer)
    state = {"model": model_sd, "optimizer": optim_sd}
    dcp.load(state, checkpoint_id=str(folder))
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"])
