"""The DiT's forward and backward replayed as CUDA graphs (model.cuda_graphs), one pair per input shape.

Why: Sana-0.6B's eager step launches thousands of kernels; at batch 16 on four H200 machines the eager step took
173-226 ms while the same step with graphs took 168-173 ms (bench/bench_train_step.py, `ours` vs
`ours-graphed`; the GPU time is the same), so the GPU waited on the host. A graph replays the whole forward or
backward with one launch.

How: torch.cuda.make_graphed_callables, PyTorch's own capture of a module's forward and backward (warm-up on a
side stream, static input buffers, a graph-private memory pool; gradients still accumulate into .grad outside
the graph, so the optimizer, clipping, the non-finite check and EMA stay as they are). A graph only replays
the shapes it was captured with: each new (latent, caption) shape (an aspect-ratio bucket) is captured on
first sight, with its own memory pool, up to MAX_SHAPES. Autocast must not cache casts inside a capture
(the trainer turns the cache off when graphs are on).

Not with: gradient checkpointing, DDP or FSDP2 (one process only; their communication hooks run inside the
backward), the CPU. The trainer refuses those in one line.
"""
from __future__ import annotations

import torch
from torch import nn

from sana_core.errors import SanaError

MAX_SHAPES = 16  # each captured shape holds its own activation memory


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

    def __call__(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor, y_mask: torch.Tensor) -> torch.Tensor:
        key = tuple((tuple(a.shape), a.dtype) for a in (x, t, y, y_mask)) + (torch.is_autocast_enabled(),)
        call = self.graphs.get(key)
        if call is None:
            if len(self.graphs) >= self.max_shapes:
                raise SanaError(f"model.cuda_graphs: more than {self.max_shapes} input shapes (each a captured "
                                f"graph with its own memory); now {tuple(x.shape)} with captions {tuple(y.shape)}")
            inputs = (x.detach(), t.detach(), y.detach(), y_mask.detach())
            call = torch.cuda.make_graphed_callables(_Call(self.model), inputs, allow_unused_input=True)
            self.graphs[key] = call
        return call(x, t, y, y_mask)


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
