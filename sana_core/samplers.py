"""Samplers for the rectified flow of sana_core.flow: Euler and Flow-DPM-Solver, with classifier-free guidance.

Both walk the same shifted time grid as diffusers' `DPMSolverMultistepScheduler(use_flow_sigmas=True,
flow_shift=shift, final_sigmas_type="zero")`: t_i = shift(linspace(1 - 1/1000, 0, steps + 1)).

Flow-DPM-Solver is DPM-Solver++ (data prediction, 2nd-order multistep, midpoint form) written for the flow
parametrisation: alpha_t = 1 - t, sigma_t = t, lambda = log((1 - t) / t), x0 = x_t - t * v.
The first step is first order (no history yet) and so is the last (t = 0, lambda = inf), as in diffusers.

`integer_timesteps=True` reproduces one quirk of diffusers' DPMSolverMultistepScheduler: it hands the model
int64 timesteps, floor(1000 t), while its update uses the exact t. SanaPipeline sets it for flow_dpm so that its
images equal diffusers' SanaPipeline ones; the model then sees t as float64 multiples of 1/1000 (float32 would
not survive the DiT's * 1000 exactly). The difference in quality is nil either way (t moves by < 1/1000).
"""
from __future__ import annotations

import itertools
import math
from collections.abc import Callable
from typing import Literal

import numpy as np
import torch
from tqdm.auto import tqdm

from sana_core.errors import SanaError
from sana_core.flow import shift_time

ModelFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (x_t, t of shape (B,)) -> velocity


def time_grid(steps: int, shift: float = 1.0, num_train_timesteps: int = 1000) -> torch.Tensor:
    if steps < 1:
        raise SanaError(f"sampling needs at least one step, got {steps}")
    # The same arithmetic as diffusers (1 - linspace(1, 1/N)), so that floor(1000 t) agrees bit for bit.
    t = 1 - np.linspace(1, 1 / num_train_timesteps, steps + 1)
    return shift_time(torch.from_numpy(t), shift).flip(0)


def _steps(ts: list[float], progress: bool, name: str):
    return tqdm(list(itertools.pairwise(ts)), desc=name, unit="step", disable=not progress, leave=False)


def _call(model_fn: ModelFn, x: torch.Tensor, t: float, integer_timesteps: bool = False) -> torch.Tensor:
    if integer_timesteps:
        return model_fn(x, torch.full((x.shape[0],), math.floor(t * 1000) / 1000, device=x.device,
                                      dtype=torch.float64))
    return model_fn(x, torch.full((x.shape[0],), t, device=x.device, dtype=x.dtype))


@torch.no_grad()
def euler(model_fn: ModelFn, noise: torch.Tensor, steps: int = 20, shift: float = 1.0,
          integer_timesteps: bool = False, progress: bool = False) -> torch.Tensor:
    ts = time_grid(steps, shift).tolist()
    x = noise
    for t, t_next in _steps(ts, progress, "euler"):
        x = x + (t_next - t) * _call(model_fn, x, t, integer_timesteps)
    return x


@torch.no_grad()
def flow_dpm_solver(model_fn: ModelFn, noise: torch.Tensor, steps: int = 20, shift: float = 1.0,
                    integer_timesteps: bool = False, progress: bool = False) -> torch.Tensor:
    ts = time_grid(steps, shift).tolist()
    x = noise
    prev_x0 = None
    prev_lambda = None
    for t, t_next in _steps(ts, progress, "flow_dpm"):
        x0 = x - t * _call(model_fn, x, t, integer_timesteps)
        if t_next == 0:  # lambda = inf: the update is the data prediction itself
            x = x0
            break
        lam = _lambda(t)
        h = _lambda(t_next) - lam
        decay = torch.expm1(torch.tensor(-h, dtype=torch.float64)).item()  # exp(-h) - 1
        if prev_x0 is None:
            x = (t_next / t) * x - (1 - t_next) * decay * x0
        else:
            r = (lam - prev_lambda) / h
            d1 = (x0 - prev_x0) / r
            x = (t_next / t) * x - (1 - t_next) * decay * x0 - 0.5 * (1 - t_next) * decay * d1
        prev_x0, prev_lambda = x0, lam
    return x


def _lambda(t: float) -> float:
    return math.log(1 - t) - math.log(t)


def guided(model_fn: Callable[..., torch.Tensor], y: torch.Tensor, y_mask: torch.Tensor,
           y_null: torch.Tensor, y_null_mask: torch.Tensor, guidance_scale: float) -> ModelFn:
    """Classifier-free guidance: v = v_uncond + s (v_cond - v_uncond), both halves in one batch."""
    if guidance_scale == 1.0:
        return lambda x, t: model_fn(x, t, y, y_mask)
    y_all = torch.cat([y_null.expand_as(y), y])
    m_all = torch.cat([y_null_mask.expand_as(y_mask), y_mask])

    def fn(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        v_uncond, v_cond = model_fn(torch.cat([x, x]), torch.cat([t, t]), y_all, m_all).chunk(2)
        return v_uncond + guidance_scale * (v_cond - v_uncond)

    return fn


SOLVERS = {"euler": euler, "flow_dpm": flow_dpm_solver}


def sample(model_fn: ModelFn, noise: torch.Tensor, steps: int = 20,
           solver: Literal["flow_dpm", "euler"] = "flow_dpm", shift: float = 1.0,
           integer_timesteps: bool = False, progress: bool = False) -> torch.Tensor:
    if solver not in SOLVERS:
        raise SanaError(f"unknown solver {solver!r}; choose one of {sorted(SOLVERS)}")
    return SOLVERS[solver](model_fn, noise, steps=steps, shift=shift, integer_timesteps=integer_timesteps,
                           progress=progress)
