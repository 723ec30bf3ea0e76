"""kernels.linear: the fast path's nn.Linear backward (float32 weight and bias gradients written by the GEMM)
against F.linear and a float64 reference, on seeded random inputs."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from kernels.linear import linear, linear_tee
from tests.kernels.modes import DEVICE, ON_GPU, pick

SHAPES = pick(small=[((2, 5, 16), 24), ((7, 16), 8)], real=[((4, 1024, 1152), 1152), ((16384, 1152), 5760)])


def _grads(fn, x, w, b):
    x, w = x.detach().requires_grad_(), w.detach().requires_grad_()
    b = None if b is None else b.detach().requires_grad_()
    out = fn(x, w, b)
    torch.manual_seed(1)
    dy = torch.randn(out.shape, device=out.device, dtype=torch.float32)
    (out.float() * dy).sum().backward()
    return out, x.grad, w.grad, None if b is None else b.grad


def _rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


@pytest.mark.parametrize("shape,out_features", SHAPES)
@pytest.mark.parametrize("bias", [True, False])
def test_fast_linear_equals_f_linear_in_float64(shape, out_features, bias):
    torch.manual_seed(0)
    x = torch.randn(shape, device=DEVICE, dtype=torch.float64)
    w = torch.randn(out_features, shape[-1], device=DEVICE, dtype=torch.float64)
    b = torch.randn(out_features, device=DEVICE, dtype=torch.float64) if bias else None
    ref = _grads(F.linear, x, w, b)
    got = _grads(lambda *a: linear(*a, backend="triton"), x, w, b)
    for r, g in zip(ref, got):
        if r is None:
            assert g is None
        else:
            assert g.dtype == r.dtype and g.shape == r.shape
            assert _rel(g, r) < 1e-12


@pytest.mark.parametrize("shape,out_features", SHAPES[:1])
def test_fast_linear_under_autocast_keeps_float32_gradients(shape, out_features):
    """bf16 autocast, float32 parameters: the same output as autocast's F.linear; gradients in the parameters'
    dtype and, on the GPU, not rounded to bf16 on the way (the GEMM writes float32: relative error to float64
    ~2e-5, where PyTorch's bf16 gradients then cast are ~3e-3)."""
    torch.manual_seed(0)
    x = torch.randn(shape, device=DEVICE)
    w = torch.randn(out_features, shape[-1], device=DEVICE) / shape[-1] ** 0.5
    b = torch.randn(out_features, device=DEVICE)
    # exact gradients of what autocast computes: bf16-rounded inputs and output gradient, in float64
    exact = _grads(lambda *a: F.linear(*a).bfloat16(), *(t.bfloat16().double() for t in (x, w, b)))
    with torch.autocast(DEVICE, dtype=torch.bfloat16):
        ref = _grads(F.linear, x, w, b)
        got = _grads(lambda *a: linear(*a, backend="triton"), x, w, b)
    assert torch.equal(got[0], ref[0]) and got[0].dtype == torch.bfloat16
    for name, g, r, e in zip(("dx", "dW", "db"), got[1:], ref[1:], exact[1:]):
        assert g.dtype == torch.float32, name
        assert _rel(g, e) <= _rel(r, e) * 1.01 + 1e-6, name
    if ON_GPU:
        assert _rel(got[2], exact[2]) < 1e-4 and _rel(got[3], exact[3]) < 1e-4
        assert _rel(ref[2], exact[2]) > 1e-3  # what the bf16 route loses, so the bound above means something


def test_inference_and_the_torch_backend_are_f_linear():
    torch.manual_seed(0)
    x, w = torch.randn(3, 8, device=DEVICE), torch.randn(4, 8, device=DEVICE, requires_grad=True)
    with torch.no_grad():
        assert torch.equal(linear(x, w, backend="triton"), F.linear(x, w))
    out = linear(x, w, backend="torch")
    assert out.grad_fn.name() != "_LinearBackward" and torch.equal(out, F.linear(x, w))


def _tee_grads(tee: bool, x, w, b, other: bool):
    """Gradients of x, w, b when x is read by the linear and (other=True) by a second op, x * 3 here."""
    x, w, b = (t.detach().requires_grad_() for t in (x, w, b))
    if tee:
        x2, out = linear_tee(x, w, b, backend="triton")
    else:
        x2, out = x, F.linear(x, w, b)
    torch.manual_seed(1)
    dy = torch.randn(out.shape, device=out.device, dtype=torch.float32)
    loss = (out.float() * dy).sum() + ((x2.float() * 3).square().sum() if other else 0)
    loss.backward()
    return out, x.grad, w.grad, b.grad


@pytest.mark.parametrize("shape,out_features", SHAPES)
@pytest.mark.parametrize("other", [True, False], ids=["two-readers", "linear-only"])
def test_linear_tee_adds_the_other_readers_gradient(shape, out_features, other):
    """linear_tee's dx = the other reader's gradient + dy @ W (one addmm): float64 against F.linear with
    autograd's add; under bf16 autocast on bf16 activations (the residual stream) within bf16 rounding, and the
    tee's backward node is really in the graph."""
    torch.manual_seed(0)
    x = torch.randn(shape, device=DEVICE, dtype=torch.float64)
    w = torch.randn(out_features, shape[-1], device=DEVICE, dtype=torch.float64)
    b = torch.randn(out_features, device=DEVICE, dtype=torch.float64)
    ref, got = _tee_grads(False, x, w, b, other), _tee_grads(True, x, w, b, other)
    for r, g in zip(ref, got):
        assert g.dtype == r.dtype and _rel(g, r) < 1e-12
    xb, w32, b32 = x.bfloat16(), w.float(), b.float()
    with torch.autocast(DEVICE, dtype=torch.bfloat16):
        ref = _tee_grads(False, xb, w32, b32, other)
        got = _tee_grads(True, xb, w32, b32, other)
        x2, out = linear_tee(xb.requires_grad_(), w32, b32, backend="triton")
    assert out.grad_fn.name() == "_LinearTeeBackward" and torch.equal(x2, xb)
    assert torch.equal(got[0], ref[0])
    for name, g, r in zip(("dx", "dW", "db"), got[1:], ref[1:]):
        assert g.dtype == r.dtype and _rel(g, r) < 1e-2, name


class _CountCasts(torch.utils._python_dispatch.TorchDispatchMode):
    """Counts the casts of float32 tensors to another dtype (aten._to_copy), and the multi-tensor copies."""

    def __init__(self):
        super().__init__()
        self.casts, self.shapes, self.foreach = 0, [], 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.ops.aten._to_copy.default and args[0].dtype == torch.float32 and kwargs.get("dtype") not in (
                None, torch.float32):
            self.casts += 1
            self.shapes.append(tuple(args[0].shape))
        if func in (torch.ops.aten._foreach_copy_.default, torch.ops.aten._foreach_copy.default):
            self.foreach += 1
        return func(*args, **kwargs)


@pytest.mark.parametrize("grad", [True, False], ids=["train", "inference"])
def test_weight_casts_cast_once_with_the_same_results(grad, monkeypatch):
    """Within weight_casts the layers' float32 weights and biases are cast once, by one multi-tensor copy, and
    linear() reads those copies: the outputs and every gradient are bit for bit those of the per-call casts, and
    no weight is cast again at a call. Nothing is cast when the parameters are already in the autocast dtype."""
    from kernels import linear as kl

    torch.manual_seed(0)
    layers = [(torch.randn(24, 16, device=DEVICE), torch.randn(24, device=DEVICE)),
              (torch.randn(16, 24, device=DEVICE), None)]
    x0 = torch.randn(3, 5, 16, device=DEVICE, dtype=torch.bfloat16)  # the residual stream: only weights cast

    def run(cast_once: bool):
        monkeypatch.setattr(kl, "CAST_ONCE", cast_once)
        params = [torch.nn.Parameter(t.clone(), requires_grad=grad) for w, b in layers for t in (w, b) if t is not None]
        (w1, b1, w2) = params
        x = x0.clone().requires_grad_(grad)
        counter = _CountCasts()
        with torch.set_grad_enabled(grad), torch.autocast(DEVICE, dtype=torch.bfloat16):
            with kl.weight_casts(params, torch.bfloat16), counter:
                out = linear(linear(x, w1, b1, backend="triton"), w2, None, backend="triton")
        grads = torch.autograd.grad(out.float().square().sum(), [x, *params]) if grad else []
        return out, grads, counter

    (out1, g1, c1), (out0, g0, c0) = run(True), run(False)
    assert out1.dtype == torch.bfloat16 and torch.equal(out1, out0)
    for a, b in zip(g1, g0):
        assert a.dtype == b.dtype and torch.equal(a, b)
    assert (c1.casts, c1.foreach) == (0, 0) and c0.casts == 3  # weight_casts' own copy ran before the counter
    # parameters already bf16: nothing to cast, and nothing breaks
    with torch.autocast(DEVICE, dtype=torch.bfloat16), kl.weight_casts([torch.nn.Parameter(layers[0][0].bfloat16())],
                                                                       torch.bfloat16):
        assert kl._CASTS.get() is None


def test_linear_tee_in_place_add_leaves_a_shared_gradient_intact():
    """The block's pattern: x's other reader, add_modulate(x, c), gives x and its branch c one gradient tensor,
    and c is computed from the tee's output (q -> c). linear_tee adds dy @ W into that tensor in place; c's own
    backward must have read it before: every gradient (x, the linear's, c's path's weight) equals the reference
    path's in float64 terms."""
    from kernels.adaln import add_modulate

    B, N, C = 2, 6, 16
    g = torch.Generator().manual_seed(3)
    x, w, b, v = (torch.randn(*s, generator=g, dtype=torch.float64).to(DEVICE)
                  for s in ((B, N, C), (C, C), (C,), (C, C)))
    shift, scale = (torch.randn(B, 1, C, generator=g, dtype=torch.float64).to(DEVICE) for _ in range(2))
    dh = torch.randn(B, N, C, generator=g, dtype=torch.float64).to(DEVICE)

    def grads(fast: bool, dtype):
        leaves = [t.detach().to(dtype).requires_grad_() for t in (x, w, b, v)]
        xl, wl, bl, vl = leaves
        if fast:
            x2, q = linear_tee(xl, wl, bl, backend="triton")
        else:
            x2, q = xl, F.linear(xl, wl, bl)
        c = F.linear(torch.tanh(q), vl)  # the branch, from the tee's output
        s, h = add_modulate(x2, c, shift.to(dtype), scale.to(dtype), 1e-6, backend="triton" if fast else "torch")
        ((s * 0.5).sum() + (h * dh.to(dtype)).sum()).backward()
        return [t.grad for t in leaves]

    ref = grads(False, torch.float64)
    for got, r, name in zip(grads(True, torch.float32), ref, ("dx", "dW", "db", "dV")):
        assert _rel(got, r) < 1e-5, name
