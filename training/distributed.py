"""Process group set-up and model wrapping: DDP or FSDP2, the same for torchrun and Ray Train.

torchrun (single or multi-node) sets RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR; Ray Train's TorchTrainer
creates the process group itself before our training function runs. Either way `setup()` returns one
`DistInfo` and the rest of the code never asks how it was launched.
"""
from __future__ import annotations

import contextlib
import os
import time
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
        # Gloo's worker threads free a finished collective's tensors (all_gather_object's) under the GIL, and
        # ~ProcessGroupGloo joins those threads holding it (pytorch/pytorch#56297): the last reference to the group
        # (DDP's Reducer, freed with the model right after this on a rank with nothing else to do) then deadlocked
        # about one run in three of 2-process gloo tests. The barrier keeps ranks together to the end; the sleep
        # hands the GIL to any worker thread still waiting for it before anything can drop the group.
        dist.barrier()
        time.sleep(0.05)
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
    """The wrapping to use. One process trains unwrapped whatever the strategy: DDP over one rank only adds
    hooks, and FSDP2 over one rank shards nothing (and would need a process group that a plain
    `python -m jobs.train` does not have). DCP checkpoints load across these, so a 2-GPU FSDP2 run resumes on
    one GPU and back."""
    if not info.enabled:
        return "none"
    if cfg.strategy == "auto":
        return "ddp"
    return cfg.strategy


def wrap(model: nn.Module, strategy: str, info: DistInfo, bf16: bool = False,
         cfg: DistConfig | None = None) -> nn.Module:
    """DDP around the model, or FSDP2: `fully_shard` each transformer block, then the root (torchtitan's order,
    so each block's parameters are gathered just before it runs and freed after)."""
    if strategy == "none":
        return model
    cfg = cfg or DistConfig()
    # Harmless here: the depthwise conv's grads are laid out differently from DDP's buckets (a copy, not an
    # error), and the model's output view is never modified in place.
    warnings.filterwarnings("ignore", message="Grad strides do not match bucket view strides")
    warnings.filterwarnings("ignore", message=".*returned a view tensor")
    if strategy == "ddp":
        from torch.nn.parallel import DistributedDataParallel as DDP
        ids = [info.device.index] if info.device.type == "cuda" else None
        # gradient_as_bucket_view: .grad tensors are views into the all-reduce buckets, so the gradients are
        # not held twice (saves one fp32 copy of the model: 2.4 GB for Sana-0.6B) and nothing is copied into
        # the buckets before each all-reduce nor back after it. Clipping and the optimizer read .grad in
        # place, which is all this allows. Buckets are filled in the order gradients appear in backward
        # (DDP rebuilds them after the first step), so the all-reduce of the last blocks overlaps the
        # backward of the first ones; bucket_cap_mb trades launch count against that overlap (25 MB, torch's
        # default, is 100 all-reduces for Sana-0.6B's fp32 grads, cheap on NVLink; raise it across nodes).
        # static_graph stays off: it gains nothing when every parameter gets a gradient every step
        # (find_unused_parameters is already off), and our checkpointing is non-reentrant, which DDP handles.
        return DDP(model, device_ids=ids, gradient_as_bucket_view=True, bucket_cap_mb=cfg.bucket_cap_mb)
    if strategy == "fsdp":
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
        if not hasattr(model, "blocks"):
            raise SanaError("FSDP2 needs a model with a `blocks` ModuleList to shard per block")
        mesh = init_device_mesh(info.device.type, (info.world,))
        # bf16 compute copies of the weights, fp32 gradient reduction (summing bf16 grads over ranks loses
        # bits that the fp32 master weights would then not see).
        mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if bf16 \
            else MixedPrecisionPolicy()
        # One FSDP unit per transformer block: a block is the unit whose weights are all needed at once, so
        # per-block all-gathers keep at most ~2 blocks unsharded (the running one and the prefetched next)
        # and let FSDP2 overlap block i+1's all-gather with block i's compute. Finer units (per linear)
        # would only add collectives; coarser ones (groups of blocks) would raise peak memory.
        # reshard_after_forward: after its forward, a block's gathered weights are freed and gathered again
        # in backward (ZeRO-3; least memory). The last block is never resharded: backward starts with it
        # right away, so freeing and re-gathering it is pure waste (torchtitan does the same).
        # dist.reshard_after_forward=false keeps every block's bf16 weights from forward to backward
        # (ZeRO-2 style: one all-gather per block per step instead of two, for params x 2 bytes more memory
        # per GPU, e.g. 1.2 GB for Sana-0.6B), the faster choice when that memory is free.
        n = len(model.blocks)
        for i, block in enumerate(model.blocks):
            fully_shard(block, mesh=mesh, mp_policy=mp, reshard_after_forward=cfg.reshard_after_forward and i < n - 1)
        # The root unit (patch/caption/time embedders, final layer) is small and used at both ends of the
        # step: left unset, reshard_after_forward lets FSDP2 keep the root gathered from forward to backward.
        fully_shard(model, mesh=mesh, mp_policy=mp)
        return model
    raise SanaError(f"dist.strategy {strategy!r} is not one of auto, ddp, fsdp")


def grads_set_to_none(strategy: str) -> bool:
    """How optimizer.zero_grad clears under this strategy. Under DDP the gradients are kept as zeroed bucket
    views (set_to_none=False): a gradient set to None comes back from autograd as a fresh tensor that DDP
    copies into its bucket, which is the allocation and copy gradient_as_bucket_view exists to avoid (see
    its documentation in torch.nn.parallel.DistributedDataParallel); zeroing the buckets is one memset.
    Otherwise None, which frees the gradient memory between steps."""
    return strategy != "ddp"


def no_grad_sync(model: nn.Module, strategy: str):
    """Context for a gradient-accumulation micro-batch that is not the last of its step: DDP skips its
    all-reduce (gradients accumulate locally; one all-reduce of the sum at the last micro-batch, identical
    result). FSDP2 keeps reducing every micro-batch: skipping would hold unsharded fp32 gradients, the very
    memory FSDP exists to save, and reduce-scatter per micro-batch gives the same sum."""
    if strategy == "ddp":
        return model.no_sync()
    return contextlib.nullcontext()


def unwrap(model: nn.Module) -> nn.Module:
    return model.module if hasattr(model, "module") and isinstance(model.module, nn.Module) else model
