"""Optimizer (AdamW, or CAME as Sana uses, from the `came-pytorch` package) and the learning-rate schedule."""
from __future__ import annotations

import math

import torch
import torch.distributed.tensor
from torch import nn

from kernels.block_backend import TRITON_AVAILABLE
from sana_core.errors import SanaError
from training.config import OptimConfig


class TritonAdamW(torch.optim.AdamW):
    """torch.optim.AdamW with fused=True (the same state, state_dict, checkpoints and grad_scale attribute) whose
    step runs kernels.adamw: one kernel over every parameter that also writes the bf16 weight copies the model's
    next forward reads (kernels.linear.WeightCopies), 30 bytes a parameter against torch's 32 plus the 6 of the
    forward's cast. Unlike torch's kernel it does not store the clipped gradient back into .grad (nothing reads
    it; .grad keeps the unclipped one). A step it cannot take (a parameter that is not a contiguous float32 CUDA
    tensor, a DTensor, a tensor learning rate) goes to torch's fused kernel whole."""

    def __init__(self, params, **kwargs):
        super().__init__(params, fused=True, **kwargs)
        from kernels.linear import keep_copies

        keep_copies(p for group in self.param_groups for p in group["params"])
        self._host_steps: list[int | None] = [None] * len(self.param_groups)  # each group's step count, on the host
        self._tables: list = [None] * len(self.param_groups)

    def load_state_dict(self, state_dict) -> None:
        super().load_state_dict(state_dict)
        self._host_steps = [None] * len(self.param_groups)

    def _triton_ok(self) -> bool:
        from kernels.launch import supported_device

        for group in self.param_groups:
            if group["amsgrad"] or group["maximize"] or isinstance(group["lr"], torch.Tensor):
                return False
            if len({p.grad is None for p in group["params"]}) > 1:  # some gradients missing: steps would diverge
                return False
            for p in group["params"]:
                g = p.grad
                if g is not None and not (type(p) is nn.Parameter and supported_device(p) and p.dtype == torch.float32
                                          and p.is_contiguous() and g.is_contiguous() and not g.is_sparse
                                          and g.dtype == torch.float32 and g.device == p.device):
                    return False
        return True

    def _host_steps_known(self) -> bool:
        """Each group's step count on the host (read once, and after a load or a step torch's kernel took);
        False where a group's parameters are at different steps: torch's kernel takes those."""
        for i, group in enumerate(self.param_groups):
            if self._host_steps[i] is not None:
                continue
            steps = [self.state[p]["step"] for p in group["params"] if self.state[p]]
            counts = {int(c) for c in torch.stack(steps).tolist()} if steps else {0}
            if len(counts) != 1 or len(steps) not in (0, len(group["params"])):
                return False
            self._host_steps[i] = counts.pop()
        return True

    @torch.no_grad()
    def step(self, closure=None):
        if not (self._triton_ok() and self._host_steps_known()):
            self._host_steps = [None] * len(self.param_groups)  # torch's kernel counts the steps there
            return super().step(closure)
        from kernels.adamw import AdamWTables, adamw_step_
        from kernels.linear import copy_of

        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        grad_scale = getattr(self, "grad_scale", None)
        for i, group in enumerate(self.param_groups):
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            for p in params:
                st = self.state[p]
                if not st:
                    st["step"] = torch.zeros((), dtype=torch.float32, device=p.device)
                    st["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                    st["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            torch._foreach_add_([self.state[p]["step"] for p in params], 1)  # the checkpointed counters
            self._host_steps[i] += 1
            found = [copy_of(p) for p in params]
            dtype = next((f[1].dtype for f in found if f is not None), None)
            copies = [f[1] if f is not None and f[1].dtype == dtype else None for f in found]
            owners = {id(f[0]): f[0] for f, c in zip(found, copies) if c is not None}
            fresh = [o for o in owners.values() if o.fresh()]  # the others recast at the next forward
            if self._tables[i] is None:
                self._tables[i] = AdamWTables()
            beta1, beta2 = group["betas"]
            adamw_step_(params, [p.grad for p in params], [self.state[p]["exp_avg"] for p in params],
                        [self.state[p]["exp_avg_sq"] for p in params], copies, step=self._host_steps[i],
                        lr=group["lr"], beta1=beta1, beta2=beta2, eps=group["eps"],
                        weight_decay=group["weight_decay"], grad_scale=grad_scale, tables=self._tables[i])
            torch.autograd.graph.increment_version(params)  # written in place (by raw pointer: no bump of its own)
            for o in fresh:
                o.written()
        return loss


def build_optimizer(model: nn.Module, cfg: OptimConfig) -> torch.optim.Optimizer:
    params = [p for p in model.parameters() if p.requires_grad]
    if cfg.name == "adamw":
        fused = cfg.fused if cfg.fused is not None else bool(params) and all(p.device.type == "cuda" for p in params)
        kwargs = dict(lr=cfg.lr, betas=cfg.betas, eps=cfg.eps, weight_decay=cfg.weight_decay)
        if cfg.triton:
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
