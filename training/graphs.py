"""The DiT's forward and backward replayed as CUDA graphs (model.cuda_graphs), one pair per input shape.

Why: Sana-0.6B's eager step launches thousands of kernels; at batch 16 on four H200 machines the eager step took
173-226 ms while the same step with graphs took 168-173 ms (bench/bench_train_step.py, `ours` vs
`ours-graphed`; the GPU time is the same), so the GPU waited on the host. A graph replays the whole forward or
backward with one launch.

How: torch.cuda.make_graphed_callables, PyTorch's own capture of a module's forward and backward (warm-up on a
side stream, static input buffers; gradients still accumulate into .grad outside the graph, so the optimizer,
clipping, the non-finite check and EMA stay as they are). A graph only replays the shapes it was captured with:
each new (latent, caption length) shape (an aspect-ratio bucket times a model.caption_bucket length) is captured
on first sight, up to MAX_SHAPES. Autocast must not cache casts inside a capture (the trainer turns the cache
off when graphs are on).

Memory: every capture draws on one shared memory pool, so the graphs together hold about the activation memory
of the largest shape rather than one pool per shape. That is safe because graphs never run concurrently and a
replay's outputs (the prediction, the input and parameter gradients) are consumed before another graph
replays: the trainer's loss and backward follow each forward directly, and the optimizer step and zero_grad
come before the next step's first replay.

Weights: the captured forward reads the model's persistent bf16 weight copies (kernels.linear.WeightCopies) without
the check an eager forward makes, so every call refreshes them first (nothing to do after the Triton AdamW's
step, which writes them; one multi-tensor cast after any other change of a weight).

Gradient accumulation: autograd steals a graph's static gradient buffer as a parameter's .grad when .grad is
None (pytorch/pytorch#181723), so the next replay of that graph would overwrite the accumulated gradient and
then add it to itself. `detach_gradients` after the first micro-batch's backward gives the .grad tensors their
own memory (one copy a step; later micro-batches accumulate into it in place).

Not with: gradient checkpointing, DDP or FSDP2 (one process only; their communication hooks run inside the
backward), the CPU. The trainer refuses those in one line.
"""
from __future__ import annotations

import contextlib

import torch
from torch import nn

from sana_core.errors import SanaError

MAX_SHAPES = 64  # captures share one memory pool; each costs a capture (~1 s) and its kernel parameters


class _Call(nn.Module):
    """One captured shape: a module around the model, so that make_graphed_callables differentiates the
    model's parameters, and replaces only this wrapper's forward."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x, t, y, y_mask):
        return self.model(x, t, y, y_mask)


class GraphedModel:
    """Calls like the model (x, t, y, y_mask); replays a captured graph for each shape seen."""

    def __init__(self, model: nn.Module, max_shapes: int = MAX_SHAPES):
        self.model = model
        self.max_shapes = max_shapes
        self.graphs: dict[tuple, nn.Module] = {}
        self.pool = None  # one memory pool for every capture (module docstring)

    def __call__(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor, y_mask: torch.Tensor) -> torch.Tensor:
        key = tuple((tuple(a.shape), a.dtype) for a in (x, t, y, y_mask)) + (torch.is_autocast_enabled(),)
        call = self.graphs.get(key)
        if call is None:
            if len(self.graphs) >= self.max_shapes:
                raise SanaError(f"model.cuda_graphs: more than {self.max_shapes} input shapes (each a captured "
                                f"graph); now {tuple(x.shape)} with captions {tuple(y.shape)}: fewer aspect-ratio "
                                "buckets or a larger model.caption_bucket")
            if self.pool is None:
                self.pool = torch.cuda.graph_pool_handle()
            inputs = (x.detach(), t.detach(), y.detach(), y_mask.detach())
            capture = getattr(self.model, "capture_reads_weight_copies", contextlib.nullcontext)
            with capture():  # refreshed below before every replay
                call = torch.cuda.make_graphed_callables(_Call(self.model), inputs, allow_unused_input=True,
                                                         pool=self.pool)
            self.graphs[key] = call
        refresh = getattr(self.model, "refresh_weight_copies", None)
        if refresh is not None:
            refresh()
        return call(x, t, y, y_mask)

    @staticmethod
    def detach_gradients(params) -> None:
        """Give each .grad its own memory (after a backward that more micro-batches of the step follow)."""
        for p in params:
            if p.grad is not None:
                p.grad = p.grad.clone()


def check(cuda_graphs: bool, device: torch.device, strategy: str, gradient_checkpointing: bool) -> None:
    """Refuse the settings graphs cannot run with, before anything else starts."""
    if not cuda_graphs:
        return
    if device.type != "cuda":
        raise SanaError(f"model.cuda_graphs=true needs a CUDA device, this run is on {device}")
    if strategy != "none":
        raise SanaError(f"model.cuda_graphs=true runs in one process only, not under {strategy} "
                        "(its communication hooks run inside the backward)")
    if gradient_checkpointing:
        raise SanaError("model.cuda_graphs=true cannot be combined with model.gradient_checkpointing=true")
