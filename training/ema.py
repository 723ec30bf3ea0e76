"""Exponential moving average of the trainable weights, kept in the same sharding as the parameters."""
from __future__ import annotations

import torch
from torch import nn


class EMA:
    def __init__(self, model: nn.Module, decay: float):
        self.decay = decay
        # Under FSDP2 the parameters are DTensor shards, so the copies are shards too: each rank keeps 1/world.
        self.params = {n: p.detach().clone().float() for n, p in model.named_parameters() if p.requires_grad}

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        for n, p in model.named_parameters():
            if n in self.params:
                self.params[n].lerp_(p.detach().float(), 1.0 - self.decay)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return self.params

    def load_state_dict(self, sd: dict[str, torch.Tensor]) -> None:
        for n, t in sd.items():
            self.params[n].copy_(t)

    def full_state_dict(self) -> dict[str, torch.Tensor]:
        """Unsharded CPU copies (a collective under FSDP2: every rank must call it)."""
        out = {}
        for n, t in self.params.items():
            if hasattr(t, "full_tensor"):
                t = t.full_tensor()
            out[n] = t.detach().cpu()
        return out
