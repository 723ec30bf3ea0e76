"""Optimizer (AdamW: torch's kernels or, with optim.triton, sana_core.adamw's; or CAME as Sana uses, from the
`came-pytorch` package) and the learning-rate schedule."""
from __future__ import annotations

import math

import torch
import torch.distributed.tensor
from torch import nn

from sana_core.adamw import TRITON_AVAILABLE, TritonAdamW
from sana_core.errors import SanaError
from training.config import OptimConfig


def build_optimizer(model: nn.Module, cfg: OptimConfig) -> torch.optim.Optimizer:
    params = [p for p in model.parameters() if p.requires_grad]
    if cfg.name == "adamw":
        on_cuda = bool(params) and all(p.device.type == "cuda" for p in params)
        fused = cfg.fused if cfg.fused is not None else on_cuda
        kwargs = dict(lr=cfg.lr, betas=cfg.betas, eps=cfg.eps, weight_decay=cfg.weight_decay)
        triton = cfg.triton
        if triton is None:
            # plain CUDA tensors only (optim.fused=true on the CPU stays torch's; DTensors would go to it anyway)
            triton = (fused and on_cuda and TRITON_AVAILABLE
                      and not any(isinstance(p, torch.distributed.tensor.DTensor) for p in params))
        if triton:
            if cfg.fused is False:
                raise SanaError("optim.triton=true is a fused kernel; it cannot run with optim.fused=false")
            if not TRITON_AVAILABLE:
                raise SanaError("optim.triton=true needs triton (pip install triton)")
            return TritonAdamW(params, **kwargs)
        return torch.optim.AdamW(params, **kwargs, fused=fused or None)  # None: torch's foreach default
    if cfg.triton:
        raise SanaError(f"optim.triton=true is AdamW's Triton kernel; optim.name={cfg.name} has none")
    if cfg.fused:
        raise SanaError(f"optim.fused=true is AdamW's fused kernel; optim.name={cfg.name} has none (set optim.fused=null)")
    if cfg.name == "came":
        try:
            from came_pytorch import CAME
        except ImportError:
            raise SanaError("optim.name=came needs the came-pytorch package: pip install came-pytorch") from None
        # CAME's three betas (first moment, residual, confidence); Sana's config uses (0.9, 0.999, 0.9999).
        return CAME(params, lr=cfg.lr, betas=(cfg.betas[0], cfg.betas[1], 0.9999), eps=(1e-30, 1e-16),
                    weight_decay=cfg.weight_decay)
    raise SanaError(f"optim.name {cfg.name!r} is not one of adamw, came")


def clip_gradients(opt: torch.optim.Optimizer, params, max_norm: float) -> torch.Tensor:
    """Scale the gradients so that their global norm is at most max_norm (inf: leave them) and return the norm
    before scaling, as clip_grad_norm_ does. With AdamW's fused kernel on plain (not DTensor) parameters the
    scaling goes to the optimizer instead: its grad_scale, by which the kernel divides each gradient as it reads
    it, instead of a pass that reads and writes every gradient (clip_grad_norm_'s multiply: 1.3 ms a step at
    Sana-0.6B bs16 on an H200 in torch.profiler; the step with this change not yet timed). Call it once
    before each step; a skipped step needs nothing undone (the next call sets the scale again)."""
    params = [p for p in params if p.grad is not None]
    norm = opt.grad_norm(params) if isinstance(opt, TritonAdamW) else None  # one Triton launch where it can
    if norm is None:
        norm = torch.nn.utils.get_total_norm([p.grad for p in params])
    fused = (isinstance(opt, torch.optim.AdamW) and opt.defaults.get("fused")
             and not any(isinstance(p, torch.distributed.tensor.DTensor) for p in params))
    if fused:
        # clip_grad_norm_'s coefficient max_norm / (norm + 1e-6), at most 1, as a divisor
        opt.grad_scale = None if math.isinf(max_norm) else torch.clamp((norm + 1e-6) / max_norm, min=1.0)
    elif not math.isinf(max_norm):
        torch.nn.utils.clip_grads_with_norm_(params, max_norm, norm)
    return norm


def lr_factor(step: int, cfg: OptimConfig, max_steps: int) -> float:
    """Linear warm-up to 1, then constant or cosine down to min_lr_ratio at max_steps."""
    if cfg.warmup_steps > 0 and step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    if cfg.schedule == "constant":
        return 1.0
    span = max(1, max_steps - cfg.warmup_steps)
    progress = min(1.0, (step - cfg.warmup_steps) / span)
    return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def build_scheduler(opt: torch.optim.Optimizer, cfg: OptimConfig, max_steps: int):
    return torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, cfg, max_steps))
