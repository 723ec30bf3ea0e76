"""Fused Triton ReLU linear attention, forward and backward.

Same function as kernels.linear_attention.linear_attention_reference:

    out[n] = relu(q[n]) @ KV / (relu(q[n]) . ksum + eps),  KV = sum_m relu(k[m])^T v[m],  ksum = sum_m relu(k[m])

q, k, v are (B, N, H, D) tensors with unit stride along D and any other strides, so the three views
that `qkv.view(B, N, 3, H, D).unbind(2)` gives are read in place. The work is memory bound (2*D*D
flops per token against 4*D bytes), so each kernel touches every token tensor once:

  forward   _kv_kernel    k, v  -> KV (D x D) and ksum (D), float32, per (b, h)
            _out_kernel   q     -> out
  backward  _dq_kernel    q, dO -> dq, and dKV = relu(q)^T dnum, dksum = relu(q)^T dden
            _dkv_kernel   k, v  -> dk, dv

with o = num / den: dnum = dO / den, dden = -(dO . num) / den^2. Only q, k, v and the small KV/ksum
are saved for backward; num and den are recomputed from q, which the backward reads anyway.

The two reductions over tokens (KV and dKV) split N into chunks so that a small B*H still fills the
GPU; chunks meet through float32 atomics into a zeroed buffer, or a plain store when one chunk covers N
(always the case under torch.use_deterministic_algorithms(True), which makes results bit-reproducible).

Each direction is a torch.library custom op with a fake implementation (sana::linear_attention and
sana::linear_attention_packed, forward and backward), so torch.compile traces them without graph breaks and
autograd, activation checkpointing and FSDP2 see ordinary ops. The packed op takes the DiT's (B, N, 3, H, D)
projection output itself: its kernels read the unbind(2) views in place and its backward writes dq, dk, dv
through the unbind(2) views of one (B, N, 3, H, D) gradient. Autograd's unbind backward would otherwise stack
three separate gradients, another full read and write of all of them.

Precision: KV and ksum are exact products of the inputs accumulated in float32. The dots that have a
float32 operand (KV, dKV, relu(q)/den) split it into hi + lo bfloat16 for bf16 inputs (16 significant
bits against exact bf16 data), use tf32 for fp16 inputs and full float32 for float32 inputs.
"""
from __future__ import annotations

import contextlib

import torch
import triton
import triton.language as tl

from kernels.launch import (
    Launcher,
    cdiv,
    device_index,
    kernel_op,
    on_current_device,
    sm_count,
    supported_device,
)
from kernels.linear_attention import check_packed

HEAD_DIMS = (16, 32, 64)
DTYPES = (torch.float16, torch.bfloat16, torch.float32)

# Launch shapes, per kernel (picked by bench/bench_linear_attention.py --sweep on an H100): BLOCK tokens
# per tile. The reductions (kv, dq) loop over tiles and are split over N until there are at least
# PROGRAMS_PER_SM * (number of SMs) programs, so that a small B*H still fills every SM; out and dkv
# take one tile per program.
CONFIG = {
    "kv": {"BLOCK": 128, "num_warps": 4, "num_stages": 3, "PROGRAMS_PER_SM": 8},
    "out": {"BLOCK": 128, "num_warps": 4},
    "dq": {"BLOCK": 32, "num_warps": 2, "num_stages": 3, "PROGRAMS_PER_SM": 8},
    "dkv": {"BLOCK": 64, "num_warps": 4},
    "bf16_split": True,  # bf16 inputs: float32 operands of the dots as hi + lo bf16 pairs (see _split_bf16)
}


@triton.jit
def _tile_ptrs(base, n0, N, stride_n, D: tl.constexpr, BLOCK: tl.constexpr):
    offs_n = n0 + tl.arange(0, BLOCK)
    offs_d = tl.arange(0, D)
    ptrs = base + offs_n.to(tl.int64)[:, None] * stride_n + offs_d[None, :]
    return ptrs, (offs_n < N)[:, None]


@triton.jit
def _kv_kernel(k_ptr, v_ptr, stats_ptr, N, H, skb, skn, skh, svb, svn, svh, tiles_per_prog,
               D: tl.constexpr, BLOCK: tl.constexpr, ATOMIC: tl.constexpr, PREC: tl.constexpr):
    pid_bh = tl.program_id(0)
    b = (pid_bh // H).to(tl.int64)
    h = (pid_bh % H).to(tl.int64)
    k_base = k_ptr + b * skb + h * skh
    v_base = v_ptr + b * svb + h * svh
    kv = tl.zeros((D, D), dtype=tl.float32)
    ksum = tl.zeros((D,), dtype=tl.float32)
    n_start = tl.program_id(1) * tiles_per_prog * BLOCK
    for i in range(tiles_per_prog):
        n0 = n_start + i * BLOCK
        k_ptrs, mask = _tile_ptrs(k_base, n0, N, skn, D, BLOCK)
        v_ptrs, _ = _tile_ptrs(v_base, n0, N, svn, D, BLOCK)
        k = tl.load(k_ptrs, mask=mask, other=0.0)
        v = tl.load(v_ptrs, mask=mask, other=0.0)
        k = tl.where(k > 0, k, 0.0).to(k_ptr.dtype.element_ty)
        # 16-bit operands: products are exact in the float32 accumulator.
        kv = tl.dot(tl.trans(k), v, kv, input_precision=PREC)
        ksum += tl.sum(k.to(tl.float32), axis=0)
    offs_d = tl.arange(0, D)
    st = stats_ptr + pid_bh.to(tl.int64) * (D * D + D)
    kv_ptrs = st + offs_d[:, None] * D + offs_d[None, :]
    if ATOMIC:
        tl.atomic_add(kv_ptrs, kv, sem="relaxed")
        tl.atomic_add(st + D * D + offs_d, ksum, sem="relaxed")
    else:
        tl.store(kv_ptrs, kv)
        tl.store(st + D * D + offs_d, ksum)


@triton.jit
def _load_stats(stats_ptr, pid_bh, D: tl.constexpr):
    """KV, its transpose and ksum of one (b, h) from a stats row."""
    offs_d = tl.arange(0, D)
    st = stats_ptr + pid_bh.to(tl.int64) * (D * D + D)
    kv = tl.load(st + offs_d[:, None] * D + offs_d[None, :])
    kv_t = tl.load(st + offs_d[None, :] * D + offs_d[:, None])
    ksum = tl.load(st + D * D + offs_d)
    return kv, kv_t, ksum


@triton.jit
def _split_bf16(x):
    """float32 x as hi + lo in bfloat16: 16 significant bits, so two bf16 dots against exact bf16 data
    carry ~2^-17 relative error, against tf32's ~2^-11, with half-size operands."""
    hi = x.to(tl.bfloat16)
    return hi, (x - hi.to(tl.float32)).to(tl.bfloat16)


@triton.jit
def _dot_f32(a16, a32, b, SPLIT: tl.constexpr, PREC: tl.constexpr):
    """a @ b for a float32 b: a split bf16 pair when a is exact bf16 data (a16), else one dot of a32."""
    if SPLIT:
        b_hi, b_lo = _split_bf16(b)
        return tl.dot(a16, b_lo, tl.dot(a16, b_hi))
    else:
        return tl.dot(a32, b, input_precision=PREC)


@triton.jit
def _out_kernel(q_ptr, stats_ptr, o_ptr, N, H, sqb, sqn, sqh, sob, son, soh, eps,
                D: tl.constexpr, BLOCK: tl.constexpr, SPLIT: tl.constexpr, PREC: tl.constexpr):
    pid_bh = tl.program_id(0)
    b = (pid_bh // H).to(tl.int64)
    h = (pid_bh % H).to(tl.int64)
    n0 = tl.program_id(1) * BLOCK
    q_ptrs, mask = _tile_ptrs(q_ptr + b * sqb + h * sqh, n0, N, sqn, D, BLOCK)
    o_ptrs, _ = _tile_ptrs(o_ptr + b * sob + h * soh, n0, N, son, D, BLOCK)
    q = tl.load(q_ptrs, mask=mask, other=0.0)
    q = tl.where(q > 0, q, 0.0).to(q_ptr.dtype.element_ty)
    qf = q.to(tl.float32)
    kv, _, ksum = _load_stats(stats_ptr, pid_bh, D)
    num = _dot_f32(q, qf, kv, SPLIT, PREC)
    den = tl.sum(qf * ksum[None, :], axis=1) + eps
    tl.store(o_ptrs, (num / den[:, None]).to(o_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _dq_kernel(q_ptr, do_ptr, stats_ptr, dq_ptr, dstats_ptr, N, H, sqb, sqn, sqh, sdob, sdon, sdoh,
               sdqb, sdqn, sdqh, tiles_per_prog, eps,
               D: tl.constexpr, BLOCK: tl.constexpr, ATOMIC: tl.constexpr, SPLIT: tl.constexpr,
               PREC: tl.constexpr):
    pid_bh = tl.program_id(0)
    b = (pid_bh // H).to(tl.int64)
    h = (pid_bh % H).to(tl.int64)
    q_base = q_ptr + b * sqb + h * sqh
    do_base = do_ptr + b * sdob + h * sdoh
    dq_base = dq_ptr + b * sdqb + h * sdqh
    kv, kv_t, ksum = _load_stats(stats_ptr, pid_bh, D)
    dkv = tl.zeros((D, D), dtype=tl.float32)
    dksum = tl.zeros((D,), dtype=tl.float32)
    n_start = tl.program_id(1) * tiles_per_prog * BLOCK
    for i in range(tiles_per_prog):
        n0 = n_start + i * BLOCK
        q_ptrs, mask = _tile_ptrs(q_base, n0, N, sqn, D, BLOCK)
        do_ptrs, _ = _tile_ptrs(do_base, n0, N, sdon, D, BLOCK)
        dq_ptrs, _ = _tile_ptrs(dq_base, n0, N, sdqn, D, BLOCK)
        q = tl.load(q_ptrs, mask=mask, other=0.0)
        do = tl.load(do_ptrs, mask=mask, other=0.0)
        live = q > 0
        q = tl.where(live, q, 0.0).to(q_ptr.dtype.element_ty)
        qf = q.to(tl.float32)
        dof = do.to(tl.float32)
        num = _dot_f32(q, qf, kv, SPLIT, PREC)
        rden = 1.0 / (tl.sum(qf * ksum[None, :], axis=1) + eps)
        dden = -tl.sum(dof * num, axis=1) * rden * rden
        # dnum = dO / den; dq = dnum KV^T + dden ksum^T = (dO KV^T) / den + dden ksum^T
        dq = _dot_f32(do, dof, kv_t, SPLIT, PREC) * rden[:, None] + dden[:, None] * ksum[None, :]
        tl.store(dq_ptrs, tl.where(live, dq, 0.0).to(dq_ptr.dtype.element_ty), mask=mask)
        # dKV += relu(q)^T dnum = (relu(q) / den)^T dO; masked rows have q = 0 and add nothing.
        if SPLIT:
            qs_hi, qs_lo = _split_bf16(qf * rden[:, None])
            dkv = tl.dot(tl.trans(qs_lo), do, tl.dot(tl.trans(qs_hi), do, dkv))
        else:
            dkv = tl.dot(tl.trans(qf), dof * rden[:, None], dkv, input_precision=PREC)
        dksum += tl.sum(qf * dden[:, None], axis=0)
    offs_d = tl.arange(0, D)
    st = dstats_ptr + pid_bh.to(tl.int64) * (D * D + D)
    dkv_ptrs = st + offs_d[:, None] * D + offs_d[None, :]
    if ATOMIC:
        tl.atomic_add(dkv_ptrs, dkv, sem="relaxed")
        tl.atomic_add(st + D * D + offs_d, dksum, sem="relaxed")
    else:
        tl.store(dkv_ptrs, dkv)
        tl.store(st + D * D + offs_d, dksum)


@triton.jit
def _dkv_kernel(k_ptr, v_ptr, dstats_ptr, dk_ptr, dv_ptr, N, H, skb, skn, skh, svb, svn, svh,
                sdkb, sdkn, sdkh, sdvb, sdvn, sdvh,
                D: tl.constexpr, BLOCK: tl.constexpr, SPLIT: tl.constexpr, PREC: tl.constexpr):
    pid_bh = tl.program_id(0)
    b = (pid_bh // H).to(tl.int64)
    h = (pid_bh % H).to(tl.int64)
    n0 = tl.program_id(1) * BLOCK
    k_ptrs, mask = _tile_ptrs(k_ptr + b * skb + h * skh, n0, N, skn, D, BLOCK)
    v_ptrs, _ = _tile_ptrs(v_ptr + b * svb + h * svh, n0, N, svn, D, BLOCK)
    dk_ptrs, _ = _tile_ptrs(dk_ptr + b * sdkb + h * sdkh, n0, N, sdkn, D, BLOCK)
    dv_ptrs, _ = _tile_ptrs(dv_ptr + b * sdvb + h * sdvh, n0, N, sdvn, D, BLOCK)
    k = tl.load(k_ptrs, mask=mask, other=0.0)
    v = tl.load(v_ptrs, mask=mask, other=0.0)
    live = k > 0
    k = tl.where(live, k, 0.0).to(k_ptr.dtype.element_ty)
    dkv, dkv_t, dksum = _load_stats(dstats_ptr, pid_bh, D)
    dv = _dot_f32(k, k.to(tl.float32), dkv, SPLIT, PREC)
    dk = _dot_f32(v, v.to(tl.float32), dkv_t, SPLIT, PREC) + dksum[None, :]
    tl.store(dv_ptrs, dv.to(dv_ptr.dtype.element_ty), mask=mask)
    tl.store(dk_ptrs, tl.where(live, dk, 0.0).to(dk_ptr.dtype.element_ty), mask=mask)


def _precision(dtype: torch.dtype) -> tuple[bool, str]:
    """(split, input precision) of the dots with a float32 operand. tf32 rounding (2^-11) sits at the
    16-bit output rounding; float32 inputs get full float32."""
    split = dtype == torch.bfloat16 and CONFIG["bf16_split"]
    return split, "ieee" if dtype == torch.float32 else "tf32"


_kv_launch = Launcher(_kv_kernel)
_out_launch = Launcher(_out_kernel)
_dq_launch = Launcher(_dq_kernel)
_dkv_launch = Launcher(_dkv_kernel)


def _unit_last(t: torch.Tensor) -> torch.Tensor:
    """t with unit stride along D, its last dim, which is all the kernels need of a layout."""
    return t if t.stride(-1) == 1 else t.contiguous()


def _reduce_grid(B: int, N: int, H: int, cfg: dict, device: int) -> tuple[int, int]:
    """(chunks, tiles per chunk) for a reduction over N, enough programs to fill the GPU.

    Under torch.use_deterministic_algorithms(True) one program reduces all of N for its (b, h): no float32
    atomics, so the same inputs give bit-identical outputs (slower when B*H is small)."""
    n_tiles = cdiv(N, cfg["BLOCK"])
    if torch.are_deterministic_algorithms_enabled():
        return 1, n_tiles
    want = cdiv(cfg["PROGRAMS_PER_SM"] * sm_count(device), B * H)
    tiles_per = cdiv(n_tiles, min(n_tiles, max(1, want)))
    return cdiv(n_tiles, tiles_per), tiles_per


def _zero_stats(like: torch.Tensor, B: int, H: int, D: int) -> torch.Tensor:
    return like.new_zeros((B * H, D * D + D), dtype=torch.float32)


def _stats_buffer(like: torch.Tensor, B: int, H: int, D: int, chunks: int) -> torch.Tensor:
    alloc = like.new_zeros if chunks > 1 else like.new_empty  # atomics need a zeroed target
    return alloc((B * H, D * D + D), dtype=torch.float32)


def _forward(q, k, v, eps: float, out: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(out, stats): stats rows hold KV (D*D, row-major) then ksum (D) for each (b, h)."""
    B, N, H, D = q.shape
    if q.numel() == 0:  # nothing to launch; KV and ksum over no tokens are 0
        return (q.new_empty((B, N, H, D)) if out is None else out), _zero_stats(q, B, H, D)
    dev = device_index(q)
    split, prec = _precision(q.dtype)
    cfg = CONFIG["kv"]
    chunks, tiles_per = _reduce_grid(B, N, H, cfg, dev)
    stats = _stats_buffer(q, B, H, D, chunks)
    _kv_launch((B * H, chunks), dev, (k, v, stats), (N, H, *k.stride()[:3], *v.stride()[:3], tiles_per),
               (D, cfg["BLOCK"], chunks > 1, prec),
               (("num_warps", cfg["num_warps"]), ("num_stages", cfg["num_stages"])))
    if out is None:
        out = q.new_empty((B, N, H, D))
    cfg = CONFIG["out"]
    _out_launch((B * H, cdiv(N, cfg["BLOCK"])), dev, (q, stats, out),
                (N, H, *q.stride()[:3], *out.stride()[:3], eps), (D, cfg["BLOCK"], split, prec),
                (("num_warps", cfg["num_warps"]),))
    return out, stats


def _backward(q, k, v, stats, do, eps: float, dq, dk, dv) -> None:
    """Writes the gradients into dq, dk, dv ((B, N, H, D), unit stride along D)."""
    B, N, H, D = q.shape
    if q.numel() == 0:
        return
    dev = device_index(q)
    split, prec = _precision(q.dtype)
    do = _unit_last(do)
    cfg = CONFIG["dq"]
    chunks, tiles_per = _reduce_grid(B, N, H, cfg, dev)
    dstats = _stats_buffer(q, B, H, D, chunks)
    _dq_launch((B * H, chunks), dev, (q, do, stats, dq, dstats),
               (N, H, *q.stride()[:3], *do.stride()[:3], *dq.stride()[:3], tiles_per, eps),
               (D, cfg["BLOCK"], chunks > 1, split, prec),
               (("num_warps", cfg["num_warps"]), ("num_stages", cfg["num_stages"])))
    cfg = CONFIG["dkv"]
    _dkv_launch((B * H, cdiv(N, cfg["BLOCK"])), dev, (k, v, dstats, dk, dv),
                (N, H, *k.stride()[:3], *v.stride()[:3], *dk.stride()[:3], *dv.stride()[:3]),
                (D, cfg["BLOCK"], split, prec), (("num_warps", cfg["num_warps"]),))


def _on_device(t: torch.Tensor):
    """Triton launches on the current CUDA device's stream: a guard for t's device where that is another."""
    return contextlib.nullcontext() if on_current_device(t) else torch.cuda.device(t.device)


# The ops take any strides (torch.compile may hand them other layouts than eager does) and make unit stride
# along D where it is missing; their outputs are fresh tensors (a custom op's outputs must not alias inputs).
@kernel_op("sana::linear_attention")
def _attention_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                  eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """-> out (B, N, H, D) contiguous, stats (B*H, D*D + D) float32 (KV and ksum per (b, h), see _forward)."""
    with _on_device(q):
        return _forward(_unit_last(q), _unit_last(k), _unit_last(v), eps)


@_attention_op.register_fake
def _(q, k, v, eps):
    B, N, H, D = q.shape
    return q.new_empty((B, N, H, D)), _zero_stats(q, B, H, D)


@kernel_op("sana::linear_attention_backward")
def _attention_backward_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, stats: torch.Tensor,
                           do: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """-> dq, dk, dv, each (B, N, H, D) contiguous."""
    q, k, v = _unit_last(q), _unit_last(k), _unit_last(v)
    dq, dk, dv = q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)
    with _on_device(q):
        _backward(q, k, v, stats.contiguous(), do, eps, dq, dk, dv)
    return dq, dk, dv


@_attention_backward_op.register_fake
def _(q, k, v, stats, do, eps):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


@kernel_op("sana::linear_attention_packed")
def _packed_op(qkv: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """qkv (B, N, 3, H, D) -> out (B, N, H, D) contiguous, stats as sana::linear_attention's."""
    with _on_device(qkv):
        return _forward(*_unit_last(qkv).unbind(2), eps)


@_packed_op.register_fake
def _(qkv, eps):
    B, N, _, H, D = qkv.shape
    return qkv.new_empty((B, N, H, D)), _zero_stats(qkv, B, H, D)


@kernel_op("sana::linear_attention_packed_backward")
def _packed_backward_op(qkv: torch.Tensor, stats: torch.Tensor, do: torch.Tensor, eps: float) -> torch.Tensor:
    """-> dqkv (B, N, 3, H, D) contiguous: the kernels write dq, dk, dv through its unbind(2) views."""
    qkv = _unit_last(qkv)
    dqkv = qkv.new_empty(qkv.shape)
    with _on_device(qkv):
        _backward(*qkv.unbind(2), stats.contiguous(), do, eps, *dqkv.unbind(2))
    return dqkv


@_packed_backward_op.register_fake
def _(qkv, stats, do, eps):
    return qkv.new_empty(qkv.shape)


def _setup(ctx, inputs, output):
    *tensors, ctx.eps = inputs  # (q, k, v) or (qkv,); eps
    ctx.mark_non_differentiable(output[1])  # stats: saved for the backward, never differentiated
    ctx.save_for_backward(*tensors, output[1])


def _attention_backward(ctx, do, _dstats):
    q, k, v, stats = ctx.saved_tensors
    return (*_attention_backward_op.within(ctx)(q, k, v, stats, do, ctx.eps), None)


def _packed_backward(ctx, do, _dstats):
    qkv, stats = ctx.saved_tensors
    return _packed_backward_op.within(ctx)(qkv, stats, do, ctx.eps), None


_attention_op.register_autograd(_attention_backward, setup_context=_setup)
_packed_op.register_autograd(_packed_backward, setup_context=_setup)


def _check(q, k, v) -> None:
    if not (q.dim() == 4 and q.shape == k.shape == v.shape):
        raise ValueError(f"linear attention needs q, k, v of one shape (B, N, H, D), got "
                         f"{tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    if not (q.dtype == k.dtype == v.dtype and q.dtype in DTYPES):
        raise ValueError(f"triton linear attention needs q, k, v of one dtype in {DTYPES}, got "
                         f"{q.dtype}, {k.dtype}, {v.dtype}")
    if q.shape[-1] not in HEAD_DIMS:
        raise ValueError(f"triton linear attention supports head dims {HEAD_DIMS}, got {q.shape[-1]}")
    if not (supported_device(q) and q.device == k.device == v.device):
        raise ValueError("triton linear attention needs q, k, v on one CUDA device (or on the CPU with "
                         "TRITON_INTERPRET=1)")


def _needs_graph(*tensors: torch.Tensor) -> bool:
    """Whether the call goes through the custom op: always under torch.compile (the op is what it traces),
    else only where autograd needs a node; a plain inference call launches the kernels without the op's
    dispatch (host time)."""
    return torch.compiler.is_compiling() or (torch.is_grad_enabled() and any(t.requires_grad for t in tensors))


def triton_linear_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, eps: float = 1e-15) -> torch.Tensor:
    """q, k, v (B, N, H, D), any strides -> out (B, N, H, D) contiguous."""
    _check(q, k, v)
    if _needs_graph(q, k, v):
        return _attention_op(q, k, v, float(eps))[0]
    with _on_device(q):
        return _forward(_unit_last(q), _unit_last(k), _unit_last(v), eps)[0]


def triton_linear_attention_packed(qkv: torch.Tensor, eps: float = 1e-15) -> torch.Tensor:
    """qkv (B, N, 3, H, D), any strides, e.g. qkv_proj(x).view(B, N, 3, H, D) -> out (B, N, H, D) contiguous;
    the gradient is one tensor of qkv's shape."""
    check_packed(qkv)
    _check(*qkv.unbind(2))
    if _needs_graph(qkv):
        return _packed_op(qkv, float(eps))[0]
    with _on_device(qkv):
        return _forward(*_unit_last(qkv).unbind(2), eps)[0]
