"""kernels.adamw and training.optim.TritonAdamW: torch.optim.AdamW's step, the bf16 weight copies it writes, and
the contract with the model's persistent copies (kernels.linear.WeightCopies): a forward after a step reads the
stepped weights, and a weight changed any other way is recast."""
from __future__ import annotations

import gc
import weakref

import pytest
import torch

from tests.kernels.modes import DEVICE, ON_GPU

SHAPES = [(3, 5), (4097,), (1,), (64, 33)]  # odd sizes, one element, a block boundary + 1


def _tensors(seed):
    g = torch.Generator().manual_seed(seed)
    params = [torch.randn(s, generator=g) for s in SHAPES]
    grads = [[torch.randn(s, generator=g) * 10 ** (i - 2) for i, s in enumerate(SHAPES)] for _ in range(3)]
    return params, grads


@pytest.mark.parametrize("scale", [None, 3.0])
@pytest.mark.parametrize("seed", [0, 1])
def test_kernel_takes_torch_adamw_steps_and_writes_the_copies(scale, seed):
    """Three steps of adamw_step_ against torch.optim.AdamW on float64 copies of the same tensors, gradients
    divided by the clipping scale as torch's fused kernel divides them by grad_scale; every bf16 copy is the
    stepped float32 parameter rounded, bit for bit."""
    from kernels.adamw import AdamWTables, adamw_step_

    params, grads = _tensors(seed)
    ref = [torch.nn.Parameter(p.double()) for p in params]
    ref_opt = torch.optim.AdamW(ref, lr=1e-2, betas=(0.9, 0.99), eps=1e-8, weight_decay=0.1, foreach=False)
    ps = [p.clone().to(DEVICE) for p in params]
    ms = [torch.zeros_like(p) for p in ps]
    vs = [torch.zeros_like(p) for p in ps]
    copies = [torch.zeros_like(p, dtype=torch.bfloat16) for p in ps]
    copies[2] = None  # a parameter without a copy
    tables = AdamWTables()
    for step, gs in enumerate(grads, 1):
        for r, g in zip(ref, gs):
            r.grad = g.double() / (scale or 1.0)
        ref_opt.step()
        adamw_step_(ps, [g.to(DEVICE) for g in gs], ms, vs, copies, step=step, lr=1e-2, beta1=0.9, beta2=0.99,
                    eps=1e-8, weight_decay=0.1, tables=tables,
                    grad_scale=None if scale is None else torch.tensor(scale, device=DEVICE))
    for i, (p, r, m, v) in enumerate(zip(ps, ref, ms, vs)):
        st = ref_opt.state[r]
        g_max = max(gs[i].abs().max().item() for gs in grads) / (scale or 1.0)
        # float32 rounding of each term (a moment can cancel to near zero: the bound is the terms' size)
        torch.testing.assert_close(p.cpu().double(), r.detach(), rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(m.cpu().double(), st["exp_avg"], rtol=1e-6, atol=1e-6 * g_max)
        torch.testing.assert_close(v.cpu().double(), st["exp_avg_sq"], rtol=1e-6, atol=1e-6 * g_max**2)
        assert (p.cpu() - params[i]).abs().mean() > 1e-3  # the steps moved it (lr 1e-2, three steps)
    for p, c in zip(ps, copies):
        if c is not None:
            assert torch.equal(c, p.to(torch.bfloat16))
    assert [vec for vec, _, _ in tables._sets] == [True, False]  # (64, 33) in 16-byte accesses, the odd sizes not


def test_unaligned_gradients_take_the_other_launch_with_the_same_result():
    """Gradients that are views at a 4-byte offset (as a flat gradient bucket can give) go to the launch without
    the alignment hints; the step is the same, bit for bit."""
    from kernels.adamw import AdamWTables, adamw_step_

    params, grads = _tensors(2)
    runs = []
    for views in (False, True):
        ps = [p.clone().to(DEVICE) for p in params]
        ms, vs = [torch.zeros_like(p) for p in ps], [torch.zeros_like(p) for p in ps]
        copies = [torch.zeros_like(p, dtype=torch.bfloat16) for p in ps]
        tables = AdamWTables()
        for step, gs in enumerate(grads, 1):
            gs = [g.to(DEVICE) for g in gs]
            if views:  # each at an odd 4-byte offset of one buffer
                flat = torch.zeros(sum(g.numel() + 1 for g in gs) + 1, device=DEVICE)
                at = [1 + sum(g.numel() + 1 for g in gs[:i]) for i in range(len(gs))]
                gs = [flat[a:a + g.numel()].view(g.shape).copy_(g) for a, g in zip(at, gs)]
                assert all(g.data_ptr() % 8 == 4 for g in gs)
            adamw_step_(ps, gs, ms, vs, copies, step=step, lr=1e-2, beta1=0.9, beta2=0.99, eps=1e-8,
                        weight_decay=0.1, tables=tables)
        assert [vec for vec, _, _ in tables._sets] == ([False] if views else [True, False])
        runs.append((ps, ms, vs, copies))
    for a, b in zip(*runs):
        assert all(torch.equal(x, y) for x, y in zip(a, b))


def test_grad_norm_is_the_float64_norm_aligned_or_not():
    """kernels.grad_norm against the float64 norm of all elements: the sizes above (a block boundary + 1, one
    element), an empty gradient, values 1e-2..1e1, the gradients as odd-offset views of one buffer (the launch
    without alignment hints) and as their own tensors; the tables are reused while addresses stay, rebuilt after."""
    from kernels.grad_norm import GradNormTables, grad_norm

    _, grads = _tensors(3)
    gs = [g.to(DEVICE) for g in grads[0]] + [torch.zeros(0, device=DEVICE)]
    ref = torch.cat([g.double().flatten().cpu() for g in gs]).norm()
    flat = torch.zeros(sum(g.numel() + 1 for g in gs) + 1, device=DEVICE)
    at = [1 + sum(g.numel() + 1 for g in gs[:i]) for i in range(len(gs))]
    views = [flat[a:a + g.numel()].view(g.shape).copy_(g) for a, g in zip(at, gs)]
    tables = GradNormTables()
    for run in (gs, gs, views):
        norm = grad_norm(run, tables)
        assert norm.dtype == torch.float32 and norm.device == gs[0].device
        assert abs(norm.item() - ref.item()) <= 1e-6 * ref.item()
    assert [vec for vec, _, _ in tables._sets] == [False]  # the views' tables: rebuilt
    with pytest.raises(ValueError, match="one dtype"):
        grad_norm([gs[0], gs[1].double()])


def test_clip_gradients_takes_the_triton_norm_where_it_can():
    """TritonAdamW.grad_norm in clip_gradients: the norm torch's get_total_norm gives; None (torch's then) for
    float64 gradients."""
    from sana_core.adamw import TritonAdamW
    from training.optim import clip_gradients

    model = _mlp(4)
    opt = TritonAdamW(model.parameters(), lr=1e-3)
    model(torch.randn(8, 16, device=DEVICE)).square().mean().backward()
    ref = torch.nn.utils.get_total_norm([p.grad for p in model.parameters()])
    mine = opt.grad_norm(list(model.parameters()))
    assert mine is not None and abs(mine.item() - ref.item()) <= 1e-6 * ref.item()
    torch.testing.assert_close(clip_gradients(opt, model.parameters(), 0.05), ref, rtol=1e-6, atol=0)
    double = _mlp(4).double()
    double(torch.randn(8, 16, device=DEVICE, dtype=torch.float64)).square().mean().backward()
    assert TritonAdamW(double.parameters(), lr=1e-3).grad_norm(list(double.parameters())) is None


def _mlp(seed):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(16, 40), torch.nn.GELU(), torch.nn.Linear(40, 8)).to(DEVICE)


def _train(model, opt, steps, max_norm=0.05, seed=0):
    from training.optim import clip_gradients

    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        x = torch.randn(8, 16, generator=g).to(DEVICE)
        model(x).square().mean().backward()
        clip_gradients(opt, model.parameters(), max_norm)
        opt.step()
        opt.zero_grad(set_to_none=True)


def test_triton_adamw_steps_like_torch_adamw_and_shares_its_checkpoints():
    """build_optimizer's Triton AdamW against torch's fused AdamW, with clipping by grad_scale (max_norm far below
    the gradients' norm): the same weights after four steps; its state_dict is torch's (each loads the other's),
    and a run resumed from it after two steps ends bit for bit where the uninterrupted one does."""
    from sana_core.adamw import TritonAdamW
    from training.config import OptimConfig
    from training.optim import build_optimizer

    cfg = dict(lr=1e-2, weight_decay=0.1)
    ours, theirs = _mlp(0), _mlp(0)
    opt = build_optimizer(ours, OptimConfig(**cfg, triton=True))
    ref = build_optimizer(theirs, OptimConfig(**cfg, fused=True, triton=False))
    assert type(opt) is TritonAdamW and type(ref) is torch.optim.AdamW
    _train(ours, opt, 4)
    _train(theirs, ref, 4)
    for a, b in zip(ours.parameters(), theirs.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
        assert not torch.equal(a, _mlp(0).state_dict()[next(n for n, p in ours.named_parameters() if p is a)])
    sd, sd_ref = opt.state_dict(), ref.state_dict()
    assert sd["param_groups"] == sd_ref["param_groups"]
    assert {k: sorted(v) for k, v in sd["state"].items()} == {k: sorted(v) for k, v in sd_ref["state"].items()}
    assert float(sd["state"][0]["step"]) == 4.0

    # resume: two steps, a fresh model and optimizer loading both state_dicts, two more
    first = _mlp(0)
    opt1 = build_optimizer(first, OptimConfig(**cfg, triton=True))
    _train(first, opt1, 2)
    second = _mlp(1)
    second.load_state_dict(first.state_dict())
    opt2 = build_optimizer(second, OptimConfig(**cfg, triton=True))
    opt2.load_state_dict(opt1.state_dict())
    full = _mlp(0)
    opt_full = build_optimizer(full, OptimConfig(**cfg, triton=True))
    _train(full, opt_full, 2)
    _train(full, opt_full, 2, seed=1)
    _train(second, opt2, 2, seed=1)
    for a, b in zip(second.parameters(), full.parameters()):
        assert torch.equal(a, b)
    # torch's AdamW continues from our state, and ours from torch's
    torch_opt = torch.optim.AdamW(theirs.parameters(), **cfg, fused=True)
    torch_opt.load_state_dict(sd)
    opt.load_state_dict(sd_ref)
    _train(theirs, torch_opt, 1)
    _train(ours, opt, 1)
    assert float(opt.state_dict()["state"][0]["step"]) == 5.0


def _same(a, b):
    """Bit for bit on the CPU; on the GPU the linear attention's float32 atomics sum in any order, which can move
    a bf16 rounding (stale weights would move the output by far more)."""
    if ON_GPU:
        assert ((a.double() - b.double()).norm() / b.double().norm()).item() <= 1e-2
    else:
        assert torch.equal(a, b)


def test_the_model_reads_the_weights_the_optimizer_wrote_and_recasts_any_other_change(monkeypatch):
    """A LinearDiT on the fast path under bf16 autocast with the Triton AdamW: after each step the model's
    persistent bf16 copies are the new weights rounded (written by the optimizer's kernel, so the next forward
    casts nothing) and the forward equals one with per-call casts; a weight changed in place outside the optimizer
    is recast at the next forward."""
    from kernels import linear as kl
    from sana_core.dit import _COPIES, DiTConfig, LinearDiT
    from tests.kernels.test_linear import _CountCasts
    from training.config import OptimConfig
    from training.optim import build_optimizer

    monkeypatch.setenv("SANA_BLOCK_BACKEND", "triton")
    torch.manual_seed(0)
    model = LinearDiT(DiTConfig(hidden_size=32, depth=1, num_heads=2, cross_heads=2, caption_channels=16)).to(DEVICE)
    inputs = (torch.randn(2, 32, 2, 3, device=DEVICE), torch.rand(2, device=DEVICE),
              torch.randn(2, 5, 16, device=DEVICE), torch.ones(2, 5, dtype=torch.bool, device=DEVICE))
    opt = build_optimizer(model, OptimConfig(lr=1e-2, triton=True))

    def forward(cast_once=True):
        monkeypatch.setattr(kl, "CAST_ONCE", cast_once)
        counter = _CountCasts()
        with torch.autocast(DEVICE, dtype=torch.bfloat16), counter:
            out = model(*inputs)
        return out, counter.foreach

    out, casts = forward()
    assert casts == 1  # the copies made
    copies = _COPIES[model]
    for step in range(2):
        out.float().square().mean().backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        assert copies.fresh()
        for p, c in zip(copies.params, copies.copies):
            assert torch.equal(c, p.detach().to(torch.bfloat16)), step
        with torch.no_grad():
            out, casts = forward()
            assert casts == 0  # nothing recast: the optimizer wrote the copies
            _same(out, forward(cast_once=False)[0])
        out, _ = forward()
    with torch.no_grad():
        model.blocks[0].attn.qkv.weight.mul_(2)
        assert not copies.fresh()
        out, casts = forward()
        assert casts == 1
        _same(out, forward(cast_once=False)[0])  # stale copies would be off by the doubled weight


def test_without_an_optimizer_that_writes_them_no_copies_are_kept(monkeypatch):
    """With torch's AdamW (every step makes copies stale) the model casts into a buffer of its own each forward, as
    before: nothing persistent, nothing held between forwards."""
    from sana_core.dit import _COPIES, DiTConfig, LinearDiT
    from training.config import OptimConfig
    from training.optim import build_optimizer

    monkeypatch.setenv("SANA_BLOCK_BACKEND", "triton")
    torch.manual_seed(0)
    model = LinearDiT(DiTConfig(hidden_size=32, depth=1, num_heads=2, cross_heads=2, caption_channels=16)).to(DEVICE)
    build_optimizer(model, OptimConfig(fused=True, triton=False))
    with torch.autocast(DEVICE, dtype=torch.bfloat16):
        model(torch.randn(1, 32, 2, 2, device=DEVICE), torch.rand(1, device=DEVICE),
              torch.randn(1, 3, 16, device=DEVICE), None)
    assert model not in _COPIES


def test_inference_forwards_cast_the_weights_once(monkeypatch):
    """Forwards without gradients (sampling) keep persistent copies with no optimizer: the second casts nothing
    and equals a forward with per-call casts; a weight changed in place is recast at the next; a training forward
    (no optimizer writes the copies) drops them and casts its own, as before; a deleted model's weights and
    copies are freed."""
    from kernels import linear as kl
    from sana_core.dit import _COPIES, DiTConfig, LinearDiT
    from tests.kernels.test_linear import _CountCasts

    monkeypatch.setenv("SANA_BLOCK_BACKEND", "triton")
    torch.manual_seed(0)
    model = LinearDiT(DiTConfig(hidden_size=32, depth=1, num_heads=2, cross_heads=2, caption_channels=16)).to(DEVICE)
    inputs = (torch.randn(2, 32, 2, 3, device=DEVICE), torch.rand(2, device=DEVICE),
              torch.randn(2, 5, 16, device=DEVICE), torch.ones(2, 5, dtype=torch.bool, device=DEVICE))

    def forward(cast_once=True, model=model):
        monkeypatch.setattr(kl, "CAST_ONCE", cast_once)
        counter = _CountCasts()
        with torch.autocast(DEVICE, dtype=torch.bfloat16), counter:
            out = model(*inputs)
        return out, counter.foreach

    with torch.no_grad():
        assert forward()[1] == 1 and model in _COPIES  # the copies made
        out, casts = forward()
        assert casts == 0
        _same(out, forward(cast_once=False)[0])
        model.blocks[0].attn.qkv.weight.mul_(2)
        out, casts = forward()
        assert casts == 1
        _same(out, forward(cast_once=False)[0])  # stale copies would be off by the doubled weight
    out, casts = forward()
    assert casts == 1 and model not in _COPIES
    with torch.no_grad():
        _same(out.detach(), forward(cast_once=False)[0])
        forward()
    # the copies keep neither the model's weights nor themselves alive once the model is gone
    weight, copies = weakref.ref(model.blocks[0].attn.qkv.weight), weakref.ref(_COPIES[model])
    del model, out, forward
    gc.collect()
    assert weight() is None and copies() is None


def test_a_training_run_with_the_triton_adamw_resumes_bit_for_bit(zoo, tmp_path, monkeypatch):
    """The trainer with optim.triton=true (the kernel on the CPU under the interpreter; on a GPU for real): a run
    resumed from its step-3 checkpoint (torch.distributed.checkpoint, whose loader first takes a zero-lr step
    to create the optimizer state) ends on the uninterrupted run's losses (bit for bit on the CPU), and the run
    trains like one with torch's AdamW."""
    import json

    from sana_core.config import load_config
    from training.config import PRESETS, TrainConfig
    from training.testdata import write_shards
    from training.trainer import train

    data = tmp_path / "shards"
    write_shards(data, n=16, per_shard=8)

    def cfg(*extra):
        base = ["data.batch_size=4", "data.num_workers=0", "data.shuffle_buffer=8", "track.wandb=false",
                "track.sample_prompts=[]", "track.log_every=1", "optim.warmup_steps=2", "checkpoint.every=1000"]
        return load_config(TrainConfig, preset=PRESETS["tiny"], overrides=base + list(extra))

    def losses(run):
        return {r["step"]: r["loss"] for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())}

    import kernels.adamw as ka

    calls = []
    step_ = ka.adamw_step_
    monkeypatch.setattr(ka, "adamw_step_", lambda *a, **k: calls.append(k["step"]) or step_(*a, **k))
    train(cfg("max_steps=6", "optim.triton=true"), data, tmp_path / "full", device=DEVICE)
    assert calls == [1, 2, 3, 4, 5, 6]  # every step took the kernel
    train(cfg("max_steps=3", "optim.triton=true"), data, tmp_path / "part", device=DEVICE)
    train(cfg("max_steps=6", "optim.triton=true"), data, tmp_path / "part", resume=True, device=DEVICE)
    train(cfg("max_steps=6", "optim.triton=false"), data, tmp_path / "torch", device=DEVICE)
    full, part, ref = losses(tmp_path / "full"), losses(tmp_path / "part"), losses(tmp_path / "torch")
    resumed = [part[i] for i in range(4, 7)]
    # on the GPU the linear attention's float32 atomics sum in any order, so two runs differ in last bits anyway
    assert [full[i] for i in range(4, 7)] == (pytest.approx(resumed, rel=1e-4) if ON_GPU else resumed)
    assert [full[i] for i in range(1, 7)] == pytest.approx([ref[i] for i in range(1, 7)], rel=1e-3)
    assert full[1] != full[6]
