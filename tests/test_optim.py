"""training.optim: which AdamW kernel runs, and that the fused one takes the same step."""
import pytest
import torch

from sana_core.errors import SanaError
from training.config import OptimConfig
from training.optim import build_optimizer


def _step(opt_cfg: OptimConfig, device: str = "cpu") -> tuple[torch.optim.Optimizer, torch.Tensor]:
    torch.manual_seed(0)
    m = torch.nn.Linear(16, 8).to(device)
    opt = build_optimizer(m, opt_cfg)
    for _ in range(3):
        m(torch.randn(4, 16, device=device)).square().mean().backward()
        opt.step()
        opt.zero_grad()
    return opt, m.weight.detach().cpu()


def test_fused_adamw_only_where_asked_or_on_cuda_and_it_takes_the_same_steps():
    cfg = OptimConfig(lr=1e-2, weight_decay=0.1)
    foreach, w_foreach = _step(cfg)
    assert not foreach.defaults["fused"]  # auto on the CPU: torch's foreach default
    fused, w_fused = _step(OptimConfig(lr=1e-2, weight_decay=0.1, fused=True))  # the CPU has a fused kernel too
    assert fused.defaults["fused"]
    torch.testing.assert_close(w_fused, w_foreach, rtol=1e-5, atol=1e-6)
    assert not torch.equal(w_fused, _step(OptimConfig(lr=0.0))[1])  # the steps moved the weights


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_adamw_is_fused_on_cuda_by_default():
    opt, _ = _step(OptimConfig(), "cuda")
    assert opt.defaults["fused"]
    assert not _step(OptimConfig(fused=False), "cuda")[0].defaults["fused"]


def test_fused_is_refused_for_came_in_one_line():
    with pytest.raises(SanaError, match="optim.fused=true") as e:
        build_optimizer(torch.nn.Linear(2, 2), OptimConfig(name="came", fused=True))
    assert "\n" not in str(e.value)
