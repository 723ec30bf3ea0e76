"""AdamW whose step also writes the Linear DiT's bf16 weight copies: torch.optim.AdamW's step and state in one
Triton kernel (kernels.adamw) over every parameter: training.optim's optimizer on CUDA (`optim.triton`, None = auto).

It lives beside the model because the copies are the model's (sana_core.dit keeps them persistent for such an
optimizer, kernels.linear.WeightCopies) and the kernel writes them as it steps the weights.
"""
from __future__ import annotations

import torch
from torch import nn

from kernels.block_backend import TRITON_AVAILABLE

__all__ = ["TRITON_AVAILABLE", "TritonAdamW"]


def _kernel_grad(g: torch.Tensor, device: torch.device) -> bool:
    """Whether the Triton kernels (the step's, the norm's) take this gradient: contiguous, dense float32 on
    `device`, a device they run on."""
    from kernels.launch import supported_device

    return (g.dtype == torch.float32 and g.is_contiguous() and not g.is_sparse and g.device == device
            and supported_device(g))


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
        self._norm_tables = None  # kernels.grad_norm's address tables (grad_norm)

    def grad_norm(self, params) -> torch.Tensor | None:
        """The global L2 norm of params' gradients in one Triton launch (kernels.grad_norm: 2.3 ms and 78 launches
        a Sana-1.6B step for torch's get_total_norm), or None where torch's must take it: gradients that are not
        contiguous float32 tensors on one device this kernel runs on, or DTensors."""
        grads = [p.grad for p in params if p.grad is not None]
        if not grads or not all(type(g) is torch.Tensor and _kernel_grad(g, grads[0].device) for g in grads):
            return None
        from kernels.grad_norm import GradNormTables, grad_norm

        if self._norm_tables is None:
            self._norm_tables = GradNormTables()
        return grad_norm(grads, self._norm_tables)

    def load_state_dict(self, state_dict) -> None:
        super().load_state_dict(state_dict)
        self._host_steps = [None] * len(self.param_groups)

    def _triton_ok(self) -> bool:
        for group in self.param_groups:
            if group["amsgrad"] or group["maximize"] or isinstance(group["lr"], torch.Tensor):
                return False
            if len({p.grad is None for p in group["params"]}) > 1:  # some gradients missing: steps would diverge
                return False
            for p in group["params"]:
                if p.grad is not None and not (type(p) is nn.Parameter and p.dtype == torch.float32
                                               and p.is_contiguous() and _kernel_grad(p.grad, p.device)):
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
