"""Process group set-up and model wrapping: DDP or FSDP2, the same for torchrun and Ray Train.

torchrun (single or multi-node) sets RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR; Ray Train's TorchTrainer
creates the process group itself before our training function runs. Either way `setup()` returns one
`DistInfo` and the rest of the code never asks how it was launched.
"""
from __future__ import annotations

import os
import warnings
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch import nn

from sana_core.errors import SanaError
from training.config import DistConfig


@dataclass
class DistInfo:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    owns_group: bool = False  # we created the process group (and destroy it at the end)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world > 1


def setup(cfg: DistConfig, device: str | None = None) -> DistInfo:
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    cuda = torch.cuda.is_available() and device != "cpu"
    if cuda:
        dev = torch.device("cuda", local_rank % torch.cuda.device_count())
        torch.cuda.set_device(dev)
    else:
        dev = torch.device("cpu")
    owns = False
    if not dist.is_initialized() and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        backend = cfg.backend if cfg.backend != "auto" else ("nccl" if cuda else "gloo")
        dist.init_process_group(backend=backend, device_id=dev if backend == "nccl" else None)
        owns = True
    if dist.is_initialized():
        return DistInfo(dist.get_rank(), dist.get_world_size(), local_rank, dev, owns)
    return DistInfo(device=dev)


def teardown(info: DistInfo) -> None:
    if info.owns_group and dist.is_initialized():
        dist.destroy_process_group()


def barrier(info: DistInfo) -> None:
    if info.enabled:
        dist.barrier()


def all_reduce_mean(x: torch.Tensor, info: DistInfo) -> torch.Tensor:
    if info.enabled:
        x = x.clone()
        dist.all_reduce(x, op=dist.ReduceOp.SUM)
        x /= info.world
    return x


def any_true(flag: bool, info: DistInfo) -> bool:
    """True if the flag is set on any rank (so every rank takes the same branch)."""
    if not info.enabled:
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=info.device if info.device.type == "cuda" else "cpu")
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item() > 0)


def gather_objects(obj, info: DistInfo) -> list:
    if not info.enabled:
        return [obj]
    out = [None] * info.world
    dist.all_gather_object(out, obj)
    return out


def strategy_for(cfg: DistConfig, info: DistInfo) -> str:
    if cfg.strategy == "auto":
        return "ddp" if info.enabled else "none"
    if not info.enabled and cfg.strategy == "ddp":
        return "none"
    return cfg.strategy


def wrap(model: nn.Module, strategy: str, info: DistInfo, bf16: bool = False) -> nn.Module:
    """DDP around the model, or FSDP2: `fully_shard` each transformer block, then the root (torchtitan's order,
    so each block's parameters are gathered just before it runs and freed after)."""
    if strategy == "none":
        return model
    # Harmless here: the depthwise conv's grads are laid out differently from DDP's buckets (a copy, not an
    # error), and the model's output view is never modified in place.
    warnings.filterwarnings("ignore", message="Grad strides do not match bucket view strides")
    warnings.filterwarnings("ignore", message=".*returned a view tensor")
    if strategy == "ddp":
        from torch.nn.parallel import DistributedDataParallel as DDP
        ids = [info.device.index] if info.device.type == "cuda" else None
        return DDP(model, device_ids=ids)
    if strategy == "fsdp":
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
        if not hasattr(model, "blocks"):
            raise SanaError("FSDP2 needs a model with a `blocks` ModuleList to shard per block")
        mesh = init_device_mesh(info.device.type, (info.world,))
        mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if bf16 \
            else MixedPrecisionPolicy()
        for block in model.blocks:
            fully_shard(block, mesh=mesh, mp_policy=mp)
        fully_shard(model, mesh=mesh, mp_policy=mp)
        return model
    raise SanaError(f"dist.strategy {strategy!r} is not one of auto, ddp, fsdp")


def unwrap(model: nn.Module) -> nn.Module:
    return model.module if hasattr(model, "module") and isinstance(model.module, nn.Module) else model
