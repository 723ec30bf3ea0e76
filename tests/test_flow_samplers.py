"""Rectified flow and samplers: Flow-DPM-Solver against diffusers' DPMSolverMultistepScheduler."""
from __future__ import annotations

import pytest
import torch
from diffusers import DPMSolverMultistepScheduler

from sana_core.dit import DIT_CONFIGS, LinearDiT
from sana_core.errors import SanaError
from sana_core.flow import FlowConfig, flow_loss, interpolate, resolution_shift, sample_timesteps, shift_time
from sana_core.samplers import euler, flow_dpm_solver, guided, sample, time_grid


def _diffusers_dpm(v, noise, steps, shift, integer_timesteps=False):
    s = DPMSolverMultistepScheduler(use_flow_sigmas=True, prediction_type="flow_prediction", flow_shift=shift,
                                    algorithm_type="dpmsolver++", solver_order=2, final_sigmas_type="zero")
    s.set_timesteps(steps)
    x = noise.clone()
    for i, ts in enumerate(s.timesteps):
        # SanaPipeline feeds the model the scheduler's int64 timesteps; the update itself uses the sigmas.
        t = ts.double() / 1000 if integer_timesteps else s.sigmas[i].to(x.dtype)
        x = s.step(v(x, t.expand(x.shape[0])), ts, x).prev_sample
    return x


def _analytic_field(dim=6):
    A = torch.randn(dim, dim, dtype=torch.float64) * 0.5
    return lambda x, t: torch.tanh(x @ A) + (1 + t.view(-1, 1)) * torch.sin(x)


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("shift", [1.0, 3.0])
def test_flow_dpm_matches_diffusers_on_analytic_field(shift, seed):
    v = _analytic_field()
    noise = torch.randn(5, 6, dtype=torch.float64)
    ours = flow_dpm_solver(v, noise, 20, shift)
    ref = _diffusers_dpm(v, noise, 20, shift)
    assert ((ours - ref).norm() / ref.norm()).item() <= 1e-5
    fine = euler(v, noise, 1000, shift)
    err_dpm, err_euler = (ours - fine).norm().item(), (euler(v, noise, 20, shift) - fine).norm().item()
    print(f"shift {shift}: |DPM20 - Euler1000| = {err_dpm:.2e}, |Euler20 - Euler1000| = {err_euler:.2e}")
    assert err_dpm < err_euler / 3


@pytest.mark.parametrize("seed", range(5))
def test_flow_dpm_matches_diffusers_on_tiny_model(seed):
    m = LinearDiT(DIT_CONFIGS["tiny"]).eval()
    y = torch.randn(2, 5, 64)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]], dtype=torch.bool)
    v = lambda x, t: m(x, t, y, mask)
    noise = torch.randn(2, 32, 4, 4)
    with torch.no_grad():
        for integer_timesteps in (False, True):
            ours = flow_dpm_solver(v, noise, 20, 3.0, integer_timesteps=integer_timesteps)
            ref = _diffusers_dpm(v, noise, 20, 3.0, integer_timesteps=integer_timesteps)
            assert ((ours - ref).norm() / ref.norm()).item() <= 1e-5


def test_time_grid_and_shift():
    g = time_grid(14, 3.0)
    assert len(g) == 15 and g[-1] == 0 and torch.all(g[1:] < g[:-1])
    assert torch.allclose(g[0], shift_time(torch.tensor(0.999, dtype=torch.float64), 3.0))
    t = torch.rand(100)
    assert torch.all(shift_time(t, 3.0) >= t) and torch.allclose(shift_time(t, 1.0), t)
    assert resolution_shift(32, 32, 3.0, None) == 3.0
    assert resolution_shift(64, 64, 1.0, 32 * 32) == pytest.approx(2.0)
    with pytest.raises(SanaError):
        sample(lambda x, t: x, torch.randn(1, 2), solver="heun")


@pytest.mark.parametrize("seed", range(5))
def test_timestep_sampling_distributions(seed):
    # 20000 draws: the bounds below are 5 standard errors of the mean and about 4 of the std.
    g = torch.Generator().manual_seed(seed)
    u = sample_timesteps(20000, FlowConfig(timestep_sampling="uniform"), generator=g)
    assert abs(u.mean().item() - 0.5) < 0.01 and u.min() >= 0 and u.max() <= 1
    ln = sample_timesteps(20000, FlowConfig(timestep_sampling="logit_normal", logit_mean=1.0, logit_std=0.5),
                          generator=g)
    logits = torch.log(ln / (1 - ln))
    assert abs(logits.mean().item() - 1.0) < 0.02 and abs(logits.std().item() - 0.5) < 0.02


def test_flow_loss_is_zero_for_the_true_velocity_and_interpolates():
    x0, noise = torch.randn(4, 32, 2, 3), torch.randn(4, 32, 2, 3)
    t = torch.rand(4)
    xt = interpolate(x0, noise, t)
    assert torch.allclose(xt - t.view(-1, 1, 1, 1) * (noise - x0), x0, atol=1e-6)
    oracle = lambda x, t_, y, m: noise - x0
    loss, per = flow_loss(oracle, x0, None, None, FlowConfig(), noise=noise, t=t)
    assert loss.item() == 0 and per.shape == (4,)
    loss, _ = flow_loss(lambda x, t_, y, m: torch.zeros_like(x), x0, None, None, FlowConfig(weighting="cosmap"),
                        noise=noise, t=t)
    assert loss.item() > 0.5


def test_guidance_combines_cond_and_uncond():
    def model(x, t, y, m):
        return x * 0 + y.mean(dim=(1, 2)).view(-1, 1)
    y, y0 = torch.full((2, 3, 4), 2.0), torch.zeros(1, 3, 4)
    m, m0 = torch.ones(2, 3, dtype=torch.bool), torch.ones(1, 3, dtype=torch.bool)
    out = guided(model, y, m, y0, m0, 4.5)(torch.randn(2, 5), torch.rand(2))
    assert torch.allclose(out, torch.full((2, 5), 9.0))
