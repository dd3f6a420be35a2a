"""Process-group facts and the few collectives the stages need.

Ray Train and torchrun both leave an initialised default process group behind; the local
launcher runs without one. Everything here works in all three cases, so stage code never asks
which launcher it runs under.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn


@dataclass(frozen=True)
class DistContext:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def unwrap_model(model: nn.Module) -> nn.Module:
    """The plain model inside DDP/FSDP-style (``.module``) and torch.compile (``._orig_mod``) wrappers."""
    while True:
        if isinstance(getattr(model, "_orig_mod", None), nn.Module):
            model = model._orig_mod
        elif isinstance(getattr(model, "module", None), nn.Module):
            model = model.module
        else:
            return model


def resolve_device(requested: str, local_rank: int = 0) -> torch.device:
    """`auto` picks this rank's CUDA device when there is one, else the CPU."""
    if requested == "cpu":
        return torch.device("cpu")
    if requested == "cuda" or (requested == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise RuntimeError("engine.device=cuda but torch sees no CUDA device")
        return torch.device("cuda", local_rank % torch.cuda.device_count())
    return torch.device("cpu")


def init_from_env(device: str = "auto") -> DistContext:
    """Context for this process: from an existing process group (Ray Train), torchrun's
    environment (initialising the group), or a single process."""
    if not dist.is_initialized() and int(os.environ.get("WORLD_SIZE", "1")) > 1 and "MASTER_ADDR" in os.environ:
        backend = "nccl" if device != "cpu" and torch.cuda.is_available() else "gloo"
        dist.init_process_group(backend=backend)
    if dist.is_initialized():
        rank, world = dist.get_rank(), dist.get_world_size()
        local_rank = int(os.environ.get("LOCAL_RANK", rank % max(1, torch.cuda.device_count() or 1)))
    else:
        rank, world, local_rank = 0, 1, 0
    dev = resolve_device(device, local_rank)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    return DistContext(rank=rank, world_size=world, local_rank=local_rank, device=dev)


def all_reduce_sum(values: torch.Tensor) -> torch.Tensor:
    """Sum a tensor over ranks (identity without a process group)."""
    if dist.is_initialized() and dist.get_world_size() > 1:
        values = values.clone()
        dist.all_reduce(values, op=dist.ReduceOp.SUM)
    return values


def barrier() -> None:
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """Rank `src`'s object on every rank."""
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def all_gather_object(obj: Any) -> list[Any]:
    """Every rank's `obj`, in rank order, on every rank (`[obj]` without a process group)."""
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def peak_rss_mib() -> dict[str, float]:
    """Peak resident memory of this process and of its largest finished child (loader workers)."""
    import resource

    kib = 1024.0  # Linux reports ru_maxrss in KiB
    return {"process": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / kib,
            "children": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / kib}


def gather_peak_rss() -> list[dict[str, float]]:
    """`peak_rss_mib()` of every rank, in rank order (a collective)."""
    return all_gather_object(peak_rss_mib())
