"""Rectified flow, the convention used everywhere in this project (stated once, here and in docs/model_api.md):

    x_t = (1 - t) * x0 + t * noise,   t in [0, 1],   t = 1 is pure noise
    velocity target v = noise - x0,   so x0 = x_t - t * v

Timesteps for training are drawn uniform or logit-normal (SD3 / Sana), then moved by the flow shift
    t -> shift * t / (1 + (shift - 1) * t)
which spends more of training (and, in the samplers, more steps) at high noise, where large images need it.
"""
from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch

from sana_core.errors import SanaError


@dataclass
class FlowConfig:
    timestep_sampling: Literal["uniform", "logit_normal"] = "logit_normal"
    logit_mean: float = 0.0
    logit_std: float = 1.0
    shift: float = 1.0
    # If set, the shift grows with the number of latent tokens: shift * sqrt(h * w / base_latent_tokens)
    # (the SD3 rule; Sana raises its shift with resolution the same way).
    base_latent_tokens: int | None = None
    weighting: Literal["none", "sigma_sqrt", "cosmap"] = "none"


def shift_time(t: torch.Tensor, shift: float) -> torch.Tensor:
    return shift * t / (1 + (shift - 1) * t)


def resolution_shift(height: int, width: int, shift: float = 1.0, base_latent_tokens: int | None = None) -> float:
    """The flow shift for a latent of height x width tokens (unchanged when no base is configured)."""
    if base_latent_tokens is None:
        return shift
    return shift * math.sqrt(height * width / base_latent_tokens)


def sample_timesteps(n: int, cfg: FlowConfig, generator: torch.Generator | None = None,
                     device: torch.device | str | None = None, shift: float | None = None) -> torch.Tensor:
    if cfg.timestep_sampling == "uniform":
        t = torch.rand(n, generator=generator, device=device)
    elif cfg.timestep_sampling == "logit_normal":
        t = torch.sigmoid(cfg.logit_mean + cfg.logit_std * torch.randn(n, generator=generator, device=device))
    else:
        raise SanaError(f"unknown timestep_sampling {cfg.timestep_sampling!r}")
    return shift_time(t, cfg.shift if shift is None else shift)


def interpolate(x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    t = t.view(-1, *([1] * (x0.dim() - 1))).to(x0.dtype)
    return (1 - t) * x0 + t * noise


def loss_weight(t: torch.Tensor, kind: str) -> torch.Tensor:
    """Per-sample loss weights of diffusers' compute_loss_weighting_for_sd3 (sigma = t)."""
    if kind == "none":
        return torch.ones_like(t)
    if kind == "sigma_sqrt":
        return t.clamp_min(1e-4) ** -2.0
    if kind == "cosmap":
        return 2 / (math.pi * (1 - 2 * t + 2 * t**2))
    raise SanaError(f"unknown loss weighting {kind!r}")


def flow_loss(model: Callable, x0: torch.Tensor, y: torch.Tensor, y_mask: torch.Tensor, cfg: FlowConfig,
              generator: torch.Generator | None = None, noise: torch.Tensor | None = None,
              t: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean weighted MSE between the predicted and the true velocity; also the per-sample losses."""
    B = x0.shape[0]
    if noise is None:
        noise = torch.randn(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype)
    if t is None:
        shift = resolution_shift(x0.shape[-2], x0.shape[-1], cfg.shift, cfg.base_latent_tokens)
        t = sample_timesteps(B, cfg, generator=generator, device=x0.device, shift=shift)
    pred = model(interpolate(x0, noise, t), t, y, y_mask)
    per_sample = (pred.float() - (noise - x0).float()).pow(2).flatten(1).mean(1)
    per_sample = per_sample * loss_weight(t.float(), cfg.weighting)
    return per_sample.mean(), per_sample.detach()
