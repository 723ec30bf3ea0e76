"""nn.Linear's y = x @ W^T + b for the Linear DiT's fast path: the same cuBLAS GEMMs, a leaner backward.

Under bf16 autocast PyTorch computes the weight and bias gradients in bf16 and then casts them to the float32
parameters (one more kernel and a bf16 rounding each), and takes the bias gradient as a column sum with a
reduction kernel at about three times its HBM time. Here, for the same forward:

    dx = dy @ W                         (as PyTorch)
    dW = dy^T @ x                       written in the parameter's dtype by the GEMM (torch.mm out_dtype:
                                        cuBLAS accumulates in float32 anyway; no bf16 rounding, no cast)
    db = ones^T @ dy                    the same GEMM routine as a column sum, in the bias's dtype

On the H200 at Sana-0.6B's batch-16 shapes (16384 tokens; `python bench/bench_linear_backward.py`,
bench/results/linear_backward_h200.json): dW 65.2 against 69.4 us (1152 x 1152; 172.0 / 181.7 us for
1152 x 2880, 184.3 / 195.7 for 3456 x 1152), db 11.0 against 27.7 us (1152 columns; 48.7 / 59.3 us for 5760),
about 3 ms of GPU time in a 28-block training step by these counts (the graphed bs16 step measured 146.1 ms
after against 145.7-146.7 before: the gain did not show in the step, see bench/NOTES_block_fastpath.md).

`linear_tee(x, W, b)` returns (x, linear(x)) for an x that another op reads too (the residual stream at the
cross-attention's query projection): autograd would add the two readers' gradients of x with a kernel of its
own (a read of two (B, N, C) tensors and a write of one); here the GEMM adds dy @ W onto the other reader's
gradient in its epilogue (addmm_, beta 1), in place: an out-of-place addmm copies that gradient into its
output first (in Sana-1.6B's graphed step on the H100 a 25 us memcpy a block, 21 a step,
bench/results/profile_train-1.6b-b8_ours-graphed-cut-topt-xattn_h100.txt). So the backward takes that
gradient tensor over, which is safe when nothing reads it afterwards: autograd hands a sum of several readers'
gradients to this backward alone, and where one op gives the same tensor to x and to another input of its own
(add_modulate's x + branch: one gradient for both), that other input's backward has consumed it first as long
as it lies on the path from this linear's output (the block's cross-attention: x -> q -> attention -> branch),
since this backward waits for that path's gradient.

`linear_bias_out(x, W, b)` returns (linear(x) with b's gradient cut, b) for an output whose next op takes b's
gradient itself, from a kernel that has the column sums of dy in registers as it writes dy (kernels.mixffn's
depthwise GLU): the ones^T dy GEMM goes (48.7 us a block for Mix-FFN's 5760 columns at batch 16).

`weight_casts(params, dtype, copies)`: within it, linear() reads `dtype` copies of the given float32 weights and
biases instead of a cast kernel per weight and bias at each call (at Sana-0.6B's training step that was 413 small
kernels a step, 1.6 ms of GPU time on the H200 and a launch gap each): one multi-tensor cast (torch._foreach_copy_)
into a buffer made on entry. Where an optimizer writes the copies as it steps (kernels.adamw via
sana_core.adamw.TritonAdamW, which asks with `keep_copies`), and for inference forwards (the model asks: the
weights change between forwards if at all), they are instead a persistent `WeightCopies`, recast
only when a parameter changed since the copies were written, which its version counter and address tell (every
in-place op bumps the version; the optimizer bumps it after its kernel and marks the copies written). The
model's forward opens weight_casts (sana_core.dit.LinearDiT) on the fast path.

A CUDA graph that captures a forward reads the copies' buffer at replay without the check, so a capture uses
them only inside `copies_checked_by_caller()`, which a caller opens when it refreshes them before each replay
(training.graphs) or replays only while the weights cannot change (one sampling call); other captures cast into
a buffer of their own each replay, as before.

Backend choice: kernels.block_backend (SANA_BLOCK_BACKEND), with the block's other fused ops; under
torch.compile the plain F.linear (the compiler plans its own backward). Inference (no gradient) is F.linear.
"""
from __future__ import annotations

import contextlib
import weakref
from collections.abc import Iterable, Iterator
from contextvars import ContextVar

import torch
import torch.nn.functional as F
from torch.utils.weak import WeakIdKeyDictionary

from kernels.block_backend import resolve_block_backend

CAST_ONCE = True  # False: weight_casts does nothing (every call casts its own weight, as before; tests compare)
_CASTS: ContextVar[dict[int, torch.Tensor] | None] = ContextVar("sana_weight_casts", default=None)
_CAPTURE_OK: ContextVar[bool] = ContextVar("sana_copies_checked_by_caller", default=False)
# parameter -> (its WeightCopies, its copy): how kernels.adamw's optimizer finds the copies it writes
_COPY_OF = WeakIdKeyDictionary()  # by identity: tensors compare elementwise
_WRITERS = WeakIdKeyDictionary()  # parameter -> True: an optimizer writes its copy (keep_copies)


class WeightCopies:
    """Persistent `dtype` copies of float32 parameters in one buffer (see the module docstring)."""

    def __init__(self, params: list[torch.Tensor], dtype: torch.dtype):
        self._params, self.dtype = [weakref.ref(p) for p in params], dtype
        # each copy at a 128-byte boundary of the one buffer (the optimizer's kernel moves aligned ones 16 bytes
        # at a time)
        pad = 128 // torch.empty((), dtype=dtype).element_size()
        sizes = [-(-p.numel() // pad) * pad for p in params]
        flat = torch.empty(sum(sizes), dtype=dtype, device=params[0].device)
        self.copies = [v[:p.numel()].view(p.shape) for v, p in zip(flat.split(sizes), params)]
        self._stamp: list[tuple[int, int]] | None = None  # (address, version) of each parameter when cast
        for p, c in zip(params, self.copies):
            _COPY_OF[p] = (self, c)

    @property
    def params(self) -> list[torch.Tensor | None]:
        """The parameters copied, held weakly: _COPY_OF's entries, keyed by these parameters, hold this object, so
        strong references here would keep a deleted model's weights (and the copies) alive for good."""
        return [r() for r in self._params]

    def matches(self, params: list[torch.Tensor], dtype: torch.dtype) -> bool:
        """Whether these are copies of exactly `params` in dtype, on their device (a model moves as a whole)."""
        return (dtype == self.dtype and len(params) == len(self.params)
                and all(a is b for a, b in zip(params, self.params)) and params[0].device == self.copies[0].device)

    def _now(self) -> list[tuple[int, int]]:
        return [(p.data_ptr(), p._version) for p in self.params]

    def fresh(self) -> bool:
        return self._stamp == self._now()

    def refresh(self) -> None:
        """Cast again if any parameter changed since the copies were last written."""
        if not self.fresh():
            with torch.no_grad():
                torch._foreach_copy_(self.copies, self.params)
            self._stamp = self._now()

    def written(self) -> None:
        """The copies were just written from the current parameters (by the optimizer's kernel)."""
        self._stamp = self._now()

    def release(self) -> None:
        """Forget these copies (replaced by others): the optimizer stops writing them."""
        for p in self.params:
            if p is not None and _COPY_OF.get(p, (None,))[0] is self:
                del _COPY_OF[p]


def copy_of(p: torch.Tensor) -> tuple[WeightCopies, torch.Tensor] | None:
    """(the WeightCopies holding p, p's copy), or None."""
    return _COPY_OF.get(p)


def keep_copies(params: Iterable[torch.Tensor]) -> None:
    """An optimizer that writes these parameters' copies as it steps them (kernels.adamw) asks for persistent
    ones: without such a writer a training forward casts into a fresh buffer (nothing to gain from keeping
    copies that every step makes stale, and nothing held between forwards); inference forwards keep them
    regardless (sana_core.dit.LinearDiT._weight_casts)."""
    for p in params:
        _WRITERS[p] = True


def copies_kept(params: list[torch.Tensor]) -> bool:
    return bool(params) and all(p in _WRITERS for p in params)


@contextlib.contextmanager
def copies_checked_by_caller() -> Iterator[None]:
    """Within: a CUDA-graph capture may read persistent weight copies (the caller refreshes them before every
    replay, or replays only while the weights cannot change)."""
    token = _CAPTURE_OK.set(True)
    try:
        yield
    finally:
        _CAPTURE_OK.reset(token)


def castable(params: Iterable[torch.Tensor], dtype: torch.dtype) -> list[torch.Tensor]:
    """The parameters weight_casts takes: plain (not FSDP2 DTensor, which its own hooks unshard later)
    floating-point Parameters not already in dtype, each once."""
    seen: dict[int, torch.Tensor] = {}
    for p in params:
        if (p is not None and type(p) is torch.nn.Parameter and p.dtype != dtype and p.is_floating_point()
                and id(p) not in seen):
            seen[id(p)] = p
    return list(seen.values())


@contextlib.contextmanager
def weight_casts(params: Iterable[torch.Tensor], dtype: torch.dtype,
                 copies: WeightCopies | None = None) -> Iterator[None]:
    """Within: linear() takes these parameters (those castable() keeps) as `dtype` copies: `copies`' when they
    hold exactly those (refreshed here where a parameter changed), else (or inside a CUDA-graph capture not opted
    in) a buffer cast here in one multi-tensor kernel (see the module docstring)."""
    params = castable(params, dtype)
    if not CAST_ONCE or not params or _CASTS.get() is not None:
        yield
        return
    capturing = params[0].is_cuda and torch.cuda.is_current_stream_capturing()
    if copies is not None and copies.matches(params, dtype) and (not capturing or _CAPTURE_OK.get()):
        copies.refresh()
        dst = copies.copies
    else:
        flat = torch.empty(sum(p.numel() for p in params), dtype=dtype, device=params[0].device)
        dst = [v.view(p.shape) for v, p in zip(flat.split([p.numel() for p in params]), params)]
        with torch.no_grad():
            torch._foreach_copy_(dst, params)
    token = _CASTS.set({id(p): c for p, c in zip(params, dst)})
    try:
        yield
    finally:
        _CASTS.reset(token)


def _cast(t: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    """t in dtype: the copy weight_casts made, else t.to(dtype) (no copy when t is already dtype)."""
    if t is None or t.dtype == dtype:
        return t
    casts = _CASTS.get()
    c = None if casts is None else casts.get(id(t))
    return c if c is not None and c.dtype == dtype else t.to(dtype)


def _mm(a: torch.Tensor, b: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """a @ b in `dtype`: written so by the GEMM where it can (CUDA, half inputs, float32 out)."""
    if a.is_cuda and dtype == torch.float32 and a.dtype in (torch.bfloat16, torch.float16):
        return torch.mm(a, b, out_dtype=dtype)
    return (a @ b).to(dtype)


class _Linear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, dtype):
        xc, wc = x.to(dtype), _cast(weight, dtype)  # what autocast would cast (no copy when already `dtype`)
        out = F.linear(xc, wc, _cast(bias, dtype))
        ctx.save_for_backward(xc, wc)
        ctx.dtypes = (x.dtype, weight.dtype, None if bias is None else bias.dtype)
        return out

    @staticmethod
    def backward(ctx, dy):
        return _backward(ctx, dy)


def _backward(ctx, dy, dres=None):
    """The gradients of _Linear's inputs; dres (x's gradient from another reader, or None) is added into dx."""
    xc, wc = ctx.saved_tensors
    x_dtype, w_dtype, b_dtype = ctx.dtypes
    g = dy.reshape(-1, dy.shape[-1]).to(wc.dtype)  # (M, N)
    dx = dw = db = None
    if ctx.needs_input_grad[0]:
        shape = (*dy.shape[:-1], wc.shape[1])
        if dres is None:
            dx = (g @ wc).view(shape).to(x_dtype)
        elif dres.dtype == g.dtype:  # the add in the GEMM's epilogue, in float32 before the one rounding
            # in place (linear_tee's contract): addmm into a new tensor copies dres into it first
            dx = dres.reshape(-1, wc.shape[1]).addmm_(g, wc).view(shape).to(x_dtype)
        else:
            dx = ((g @ wc).view(shape) + dres).to(x_dtype)
    if ctx.needs_input_grad[1]:
        dw = _mm(g.t(), xc.reshape(-1, xc.shape[-1]), w_dtype)  # (N, K)
    if ctx.needs_input_grad[2]:
        db = _mm(g.new_ones((1, g.shape[0])), g, b_dtype).view(-1)  # (N,)
    return dx, dw, db, None


class _LinearTee(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, dtype):
        out = _Linear.forward(ctx, x, weight, bias, dtype)
        ctx.set_materialize_grads(False)  # a reader that is not differentiated gives None, not zeros
        return x.view_as(x), out

    @staticmethod
    def backward(ctx, dres, dy):
        if dy is None:
            return dres, None, None, None
        return _backward(ctx, dy, dres)


def _fast_dtype(x, weight, bias, backend) -> torch.dtype | None:
    """The GEMMs' dtype when this call takes the fast path (a gradient is needed, eager, Triton back-end)."""
    needs_grad = torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad
                                              or (bias is not None and bias.requires_grad))
    if not needs_grad or torch.compiler.is_compiling() or resolve_block_backend(x, backend) != "triton":
        return None
    return autocast_dtype(x) or weight.dtype


def autocast_dtype(x: torch.Tensor) -> torch.dtype | None:
    """The autocast dtype where autocast is on for x's device (CUDA or the CPU), else None."""
    kind = x.device.type
    if kind in ("cuda", "cpu") and torch.is_autocast_enabled(kind):
        return torch.get_autocast_dtype(kind)
    return None


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
           backend: str | None = None) -> torch.Tensor:
    """F.linear(x, weight, bias), autocast included; on the fast path with the backward above."""
    dtype = _fast_dtype(x, weight, bias, backend)
    if dtype is None:
        # inference within weight_casts (the copies carry no gradient: never where the weights need one)
        if not torch.compiler.is_compiling() and _CASTS.get() is not None and not (torch.is_grad_enabled() and (
                weight.requires_grad or (bias is not None and bias.requires_grad))):
            dtype = autocast_dtype(x)
            if dtype is not None:
                return F.linear(x, _cast(weight, dtype), _cast(bias, dtype))
        return F.linear(x, weight, bias)
    return _Linear.apply(x, weight, bias, dtype)


def linear_tee(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
               backend: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(x, F.linear(x, weight, bias)), where the caller hands the first x on to x's other reader: on the fast
    path that reader's gradient of x and this GEMM's meet in one in-place addmm_. That reader's backward must not
    give the tensor it returns for x to an input whose backward runs after this one, i.e. one not computed from
    this linear's output (see the module docstring)."""
    dtype = _fast_dtype(x, weight, bias, backend)
    if dtype is None:
        return x, linear(x, weight, bias, backend)
    return _LinearTee.apply(x, weight, bias, dtype)


def linear_bias_out(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
                    backend: str | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(F.linear(x, weight, bias), bias_out). On the fast path, with a bias that needs its gradient, the GEMM adds
    bias.detach() and bias_out is bias: the caller must hand it to the next op, which adds the output gradient's
    column sums into it (see the module docstring). Elsewhere bias_out is None and the GEMM's autograd has it."""
    dtype = _fast_dtype(x, weight, bias, backend)
    if dtype is None or bias is None or not bias.requires_grad:
        return linear(x, weight, bias, backend), None
    return _Linear.apply(x, weight, bias.detach(), dtype), bias
