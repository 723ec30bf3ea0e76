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


@pytest.mark.parametrize("fused", [True, False])
@pytest.mark.parametrize("max_norm", [0.01, float("inf")])
def test_clip_gradients_equals_clip_grad_norm_then_step(fused, max_norm):
    """The clipped step (the scale in fused AdamW's kernel, or clip_grads_with_norm_) equals torch's
    clip_grad_norm_ then step, and returns the same norm; max_norm 0.01 is far below these gradients' norm."""
    from training.optim import clip_gradients

    def run(ours: bool):
        torch.manual_seed(0)
        m = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.GELU(), torch.nn.Linear(32, 8))
        opt = build_optimizer(m, OptimConfig(lr=1e-2, fused=fused))
        norms = []
        for _ in range(4):
            m(torch.randn(8, 16)).square().mean().backward()
            clip = clip_gradients if ours else lambda o, p, n: torch.nn.utils.clip_grad_norm_(p, n)
            norms.append(float(clip(opt, m.parameters(), max_norm)))
            opt.step()
            opt.zero_grad()
        return [p.detach().clone() for p in m.parameters()], norms

    (w_ours, n_ours), (w_ref, n_ref) = run(True), run(False)
    assert n_ours == pytest.approx(n_ref, rel=1e-6)
    if max_norm < 1:
        assert min(n_ref) > 10 * max_norm  # clipping engaged at every step
    for a, b in zip(w_ours, w_ref):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


def test_triton_adamw_is_the_default_on_cuda_only_and_refused_where_it_cannot_run():
    from sana_core.adamw import TritonAdamW

    # the default (None) picks it where torch's fused kernel would run: CUDA parameters, not these CPU ones
    assert type(build_optimizer(torch.nn.Linear(2, 2), OptimConfig())) is torch.optim.AdamW
    assert type(build_optimizer(torch.nn.Linear(2, 2), OptimConfig(fused=True))) is torch.optim.AdamW
    assert type(build_optimizer(torch.nn.Linear(2, 2), OptimConfig(triton=True))) is TritonAdamW
    if torch.cuda.is_available():
        cuda = torch.nn.Linear(2, 2).cuda()
        assert type(build_optimizer(cuda, OptimConfig())) is TritonAdamW
        assert type(build_optimizer(cuda, OptimConfig(triton=False))) is torch.optim.AdamW
        assert type(build_optimizer(cuda, OptimConfig(fused=False))) is torch.optim.AdamW  # foreach, as asked
    with pytest.raises(SanaError, match="optim.triton=true is a fused kernel") as e:
        build_optimizer(torch.nn.Linear(2, 2), OptimConfig(triton=True, fused=False))
    assert "\n" not in str(e.value)
    with pytest.raises(SanaError, match="optim.name=came has none"):
        build_optimizer(torch.nn.Linear(2, 2), OptimConfig(name="came", triton=True))


def test_triton_adamw_on_the_cpu_takes_torchs_fused_step():
    """Where Triton cannot run (CPU tensors without the interpreter) the whole step goes to torch's fused kernel:
    the same weights as torch's fused AdamW, bit for bit."""
    import os

    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        pytest.skip("under the interpreter the Triton kernel runs on CPU tensors (tests/kernels/test_adamw.py)")
    cfg = dict(lr=1e-2, weight_decay=0.1)
    assert torch.equal(_step(OptimConfig(**cfg, triton=True))[1], _step(OptimConfig(**cfg, fused=True))[1])
