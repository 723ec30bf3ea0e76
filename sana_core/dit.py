"""The Linear DiT of Sana (arXiv 2410.10629), small and readable, in the manner of facebookresearch/DiT.

    x (B, C, H, W) latents -> 1x1 patch embedding (no positional encoding)
    t in [0, 1] -> sinusoid(1000 t) -> MLP -> AdaLN-single: one shared 6*hidden modulation + per-block table
    y (B, L, caption_channels) Gemma-2 embeddings -> MLP projection -> RMSNorm with a learnable scale
    N x [ AdaLN -> ReLU linear self-attention -> + softmax cross-attention to y (key padding mask)
          -> AdaLN -> Mix-FFN (1x1 expand, 3x3 depthwise on the token grid, SiLU gate, 1x1 project) ]
    final AdaLN -> linear -> velocity (B, C, H, W)

The math matches diffusers' `SanaTransformer2DModel` op for op (tests/test_dit.py checks 1e-5 agreement);
the state dict differs only in that Q, K and V are one fused projection (as in NVlabs/Sana), so that the
attention kernel reads them straight from the projection output. `to_diffusers_state_dict` /
`load_diffusers_state_dict` translate (they also give Mix-FFN's two 1x1 projections, nn.Linear here, the 4-D
conv shape diffusers stores; a load_state_dict pre-hook accepts those old 4-D weights too).

One block definition, two back-ends for the glue around the GEMMs, picked per call like
kernels.linear_attention picks one (SANA_BLOCK_BACKEND, default "auto": Triton on CUDA, PyTorch elsewhere):
`modulate` (LayerNorm + AdaLN scale/shift), the gated residual and Mix-FFN's depthwise 3x3 + SiLU gate run as
fused kernels in token layout (kernels.adaln, kernels.mixffn), with activations in the residual stream's
dtype (bf16 under autocast). A block's last gated residual is left to the op that reads the sum next (Residual:
the next block's first modulate adds it as it loads, one pass over the residual stream instead of two). The
PyTorch path is the reference. Every GEMM stays a call of an nn.Linear module (self.attn.qkv(x),
self.mlp.inverted(x), ...) so that quantisation and LoRA can wrap them.
"""
from __future__ import annotations

import contextlib
import math
import weakref
from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from kernels import adaln
from kernels.block_backend import resolve_block_backend
from kernels.cross_attention import cross_attention
from kernels.linear import (
    WeightCopies,
    autocast_dtype,
    castable,
    copies_checked_by_caller,
    copies_kept,
    linear,
    linear_bias_out,
    linear_tee,
    weight_casts,
)
from kernels.linear_attention import linear_attention_packed
from kernels.mixffn import depthwise_glu
from sana_core.errors import SanaError


@dataclass
class DiTConfig:
    in_channels: int = 32
    hidden_size: int = 1152
    depth: int = 28
    num_heads: int = 36  # linear self-attention heads
    cross_heads: int = 16  # softmax cross-attention heads
    caption_channels: int = 2304  # Gemma-2-2B hidden size
    mlp_ratio: float = 2.5
    patch_size: int = 1
    attention_bias: bool = False
    norm_eps: float = 1e-6
    timestep_scale: float = 1000.0  # t in [0, 1] is embedded as t * 1000, as diffusers' pipeline feeds it

    def __post_init__(self):
        for name in ("num_heads", "cross_heads"):
            if self.hidden_size % getattr(self, name):
                raise SanaError(f"DiTConfig: hidden_size {self.hidden_size} is not divisible by {name} "
                                f"{getattr(self, name)}")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    def to_diffusers_config(self) -> dict:
        return {
            "in_channels": self.in_channels, "out_channels": self.in_channels, "patch_size": self.patch_size,
            "num_attention_heads": self.num_heads, "attention_head_dim": self.head_dim, "num_layers": self.depth,
            "num_cross_attention_heads": self.cross_heads,
            "cross_attention_head_dim": self.hidden_size // self.cross_heads,
            "cross_attention_dim": self.hidden_size, "caption_channels": self.caption_channels,
            "mlp_ratio": self.mlp_ratio, "attention_bias": self.attention_bias, "norm_eps": self.norm_eps,
            "norm_elementwise_affine": False, "sample_size": 32, "timestep_scale": self.timestep_scale / 1000.0,
        }

    @classmethod
    def from_diffusers_config(cls, c: dict) -> DiTConfig:
        unsupported = {k: c[k] for k in ("guidance_embeds", "qk_norm", "interpolation_scale") if c.get(k)}
        if unsupported:
            raise SanaError(f"diffusers Sana config options not supported by LinearDiT: {unsupported}")
        out = c.get("out_channels") or c["in_channels"]
        if out != c["in_channels"]:
            raise SanaError(f"LinearDiT needs out_channels == in_channels, got {out} vs {c['in_channels']}")
        if c.get("norm_elementwise_affine"):
            raise SanaError("diffusers Sana config with norm_elementwise_affine=True is not supported by LinearDiT")
        hidden = c["num_attention_heads"] * c["attention_head_dim"]
        if c.get("cross_attention_dim", hidden) != hidden:
            raise SanaError(f"cross_attention_dim {c.get('cross_attention_dim')} != hidden size {hidden}")
        cross_head_dim = c.get("cross_attention_head_dim", 112)
        if cross_head_dim * c["num_cross_attention_heads"] != hidden:
            raise SanaError(f"cross-attention heads {c['num_cross_attention_heads']} x {cross_head_dim} != hidden "
                            f"size {hidden}")
        return cls(in_channels=c["in_channels"], hidden_size=hidden, depth=c["num_layers"],
                   num_heads=c["num_attention_heads"], cross_heads=c["num_cross_attention_heads"],
                   caption_channels=c["caption_channels"], mlp_ratio=c.get("mlp_ratio", 2.5),
                   patch_size=c.get("patch_size", 1), attention_bias=c.get("attention_bias", False),
                   norm_eps=c.get("norm_eps", 1e-6), timestep_scale=1000.0 * c.get("timestep_scale", 1.0))


DIT_CONFIGS: dict[str, DiTConfig] = {
    "tiny": DiTConfig(hidden_size=64, depth=2, num_heads=2, cross_heads=2, caption_channels=64),
    "sana-0.6b": DiTConfig(hidden_size=1152, depth=28, num_heads=36, cross_heads=16, caption_channels=2304),
    "sana-1.6b": DiTConfig(hidden_size=2240, depth=20, num_heads=70, cross_heads=20, caption_channels=2304),
}


def timestep_embedding(t: torch.Tensor, dim: int = 256, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding, [cos, sin] order (diffusers' flip_sin_to_cos=True, downscale_freq_shift=0)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.float()[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


class Linear(nn.Linear):
    """nn.Linear (same parameters, state dict, and module call, which quantisation and LoRA wrap) whose GEMMs take
    the block's fast path: float32 weight and bias gradients written by cuBLAS (kernels.linear)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias)


class TimestepEmbedder(nn.Module):
    def __init__(self, hidden: int, freq_dim: int = 256):
        super().__init__()
        self.freq_dim = freq_dim
        self.mlp = nn.Sequential(Linear(freq_dim, hidden), nn.SiLU(), Linear(hidden, hidden))

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        return self.mlp(timestep_embedding(t, self.freq_dim).to(self.mlp[0].weight.dtype))


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        var = x.float().pow(2).mean(-1, keepdim=True)
        return (x * torch.rsqrt(var + self.eps)).to(self.weight.dtype) * self.weight


def modulate(norm: nn.LayerNorm, x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor,
             consumer: nn.Module | None = None):
    """AdaLN: norm(x) * (1 + scale) + shift; x (B, N, C), shift and scale (B, 1, C). The one seam of the idiom,
    fused into one kernel (forward and backward) on the Triton back-end.

    consumer: the linear that reads the result. A W8A8 one (sana_core.quant.QuantLinear, whose input_format
    names its format) gets the rows quantised by this kernel, so no bf16 copy is written and read back;
    inference only (nothing differentiates through quantised rows)."""
    fmt = getattr(consumer, "input_format", None)
    if fmt is not None and not (torch.is_grad_enabled() and x.requires_grad):
        return adaln.modulate(x, shift, scale, norm.eps, quantize=fmt)
    return adaln.modulate(x, shift, scale, norm.eps)


def modulate_tee(norm: nn.LayerNorm, x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor,
                 consumer: nn.Module | None = None):
    """(x, modulate(norm, x, ...)) for an x that the residual stream carries past the branch: the first output
    is what the residual add reads, so that on the Triton back-end the stream's gradient of x is added inside
    modulate's backward kernel (autograd would add the two with a kernel of its own). consumer as in modulate."""
    if getattr(consumer, "input_format", None) is not None and not (torch.is_grad_enabled() and x.requires_grad):
        return x, modulate(norm, x, shift, scale, consumer)
    return adaln.modulate_tee(x, shift, scale, norm.eps)


def tee(layer: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(x, layer(x)) for an x that another op reads too: the first output is what that op reads. On the fast path
    the layer's input-gradient GEMM adds itself onto the other reader's gradient (kernels.linear.linear_tee);
    any other layer (a LoRA or quantised wrapper), and one with module hooks, which must see the call, is called."""
    if type(layer) is Linear and not _hooked(layer):
        return linear_tee(x, layer.weight, layer.bias)
    return x, layer(x)


def bias_out(layer: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(layer(x), bias or None): on the fast path the layer's bias gradient is left to the op that reads the
    output, which must take the bias returned (kernels.linear.linear_bias_out); other layers as in tee."""
    if type(layer) is Linear and not _hooked(layer):
        return linear_bias_out(x, layer.weight, layer.bias)
    return layer(x), None


def embed_patches(conv: nn.Module, x: torch.Tensor, p: int) -> torch.Tensor:
    """The patch embedding (a p x p, stride p nn.Conv2d), x (B, C_in, H, W) -> tokens (B, N, C), row-major.

    As a GEMM on the token layout: each patch's C_in * p * p values (a small gather from the latents) against the
    conv's weight flattened to (C, C_in * p * p), the same sums as the convolution. The convolution's output is
    channels-first, and turning it into tokens took a strided copy of the whole (B, N, C) activation, with more
    in its backward (5 copies a step at 113 us each in Sana-1.6B's graphed batch-8 step on the H100,
    bench/results/profile_train-1.6b-b8_ours-graphed-cut-topt_h100_rowsums.txt); the latents are 70 times
    smaller. A conv that is not a plain nn.Conv2d, or that has hooks, is called as it is."""
    if type(conv) is not nn.Conv2d or _hooked(conv):
        return conv(x).flatten(2).transpose(1, 2)
    B, C_in, H, W = x.shape
    if p == 1:  # contiguous (and cast, as the GEMM would): F.linear runs a non-contiguous 3-D input as a matmul
        # and a separate broadcast add of the bias over the whole (B, N, C) output (124 us of Sana-0.6B's bs32
        # forward on the H100, against a few for this copy of the latents)
        patches = x.flatten(2).transpose(1, 2).to(autocast_dtype(x) or x.dtype,
                                                  memory_format=torch.contiguous_format)  # (B, N, C_in)
    else:  # (B, H/p, W/p, C_in, p, p): the conv weight's (C_in, kh, kw) order
        patches = x.view(B, C_in, H // p, p, W // p, p).permute(0, 2, 4, 1, 3, 5).reshape(B, -1, C_in * p * p)
    return linear(patches, conv.weight.flatten(1), conv.bias)  # (B, N, C)


def _hooked(module: nn.Module) -> bool:
    from torch.nn.modules import module as m

    return bool(module._forward_hooks or module._forward_pre_hooks or m._global_forward_hooks
                or m._global_forward_pre_hooks)


def add_modulate(norm: nn.LayerNorm, x: torch.Tensor, branch: torch.Tensor, shift: torch.Tensor,
                 scale: torch.Tensor, consumer: nn.Module | None = None, branch_bias: torch.Tensor | None = None,
                 gate: torch.Tensor | None = None):
    """(x + branch, modulate(norm, x + branch, ...)) (with gate, x + gate * branch): a residual add whose sum goes
    straight into AdaLN, fused into modulate's kernel on the Triton back-end (no add kernel either way). consumer
    as in modulate; branch_bias: the bias that bias_out left in branch, whose gradient the add takes
    (kernels.adaln.add_modulate)."""
    # a branch_bias comes only with a gradient (bias_out): never the inference-only quantised rows then
    if (getattr(consumer, "input_format", None) is not None and branch_bias is None
            and not (torch.is_grad_enabled() and x.requires_grad)):
        x = x + branch if gate is None else adaln.gated_residual(x, gate, branch)
        return x, modulate(norm, x, shift, scale, consumer)
    return adaln.add_modulate(x, branch, shift, scale, norm.eps, branch_bias=branch_bias, gate=gate)


class Residual(NamedTuple):
    """x + gate * branch, not yet added: a block's last gated residual, handed to the op that reads the sum next
    (the next block's first modulate, or the final layer's), which forms it as it loads (add_modulate with a gate):
    one pass over the (B, N, C) residual stream a block less than adding it first (Sana-0.6B's bs32 forward on
    the H100: a 114 us kernel for a 78 + 62 us pair). bias: the branch's output bias, as bias_out gives it."""
    x: torch.Tensor
    gate: torch.Tensor
    branch: torch.Tensor
    bias: torch.Tensor | None

    def add(self) -> torch.Tensor:
        return adaln.gated_residual(self.x, self.gate, self.branch, branch_bias=self.bias)


def modulate_stream(norm: nn.LayerNorm, x: torch.Tensor | Residual, shift: torch.Tensor, scale: torch.Tensor,
                    consumer: nn.Module | None = None):
    """(x, modulate(norm, x, ...)) for the residual stream x, a tensor or a Residual still to add (then the sum
    and its modulation from one kernel); the first output is what the stream carries on (see modulate_tee)."""
    if isinstance(x, Residual):
        return add_modulate(norm, x.x, x.branch, shift, scale, consumer, branch_bias=x.bias, gate=x.gate)
    return modulate_tee(norm, x, shift, scale, consumer)


class LinearSelfAttention(nn.Module):
    def __init__(self, dim: int, heads: int, bias: bool):
        super().__init__()
        self.heads = heads
        self.qkv = Linear(dim, 3 * dim, bias=bias)
        self.proj = Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """x (B, N, C) -> (attention output, proj's bias or None): the bias is already in the output, its gradient
        left to the gated residual that reads it (see bias_out)."""
        B, N, C = x.shape
        # A view, not a copy: the attention reads the projection output in place (and its gradient is one tensor).
        qkv = self.qkv(x).view(B, N, 3, self.heads, C // self.heads)  # (B, N, 3, H, D)
        return bias_out(self.proj, linear_attention_packed(qkv).reshape(B, N, C))


class CrossAttention(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.q = Linear(dim, dim)
        self.kv = Linear(dim, 2 * dim)
        self.proj = Linear(dim, dim)

    def forward(self, x: torch.Tensor, y: torch.Tensor,
                bias: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """x (B, N, C), y (B, L, C), bias (B, L) -> (x, attention output (B, N, C), proj's bias or None): x handed on
        for the residual add (see tee); the bias is already in the output, its gradient left to the add + modulate
        that reads it (see bias_out). kernels.cross_attention: Triton kernels that read the heads in place as column
        slices of the projections (CUDA; captions of up to 128 tokens), else SDPA."""
        x, q = tee(self.q, x)
        return x, *bias_out(self.proj, cross_attention(q, self.kv(y), bias, self.heads))


class MixFFN(nn.Module):
    """Sana's GLUMBConv: the 3x3 depthwise conv gives tokens the local position information that the
    model has no positional encoding for. In token layout: the 1x1 convolutions are nn.Linear on (B, N, C)
    (state dicts with their old 4-D conv weights still load), the depthwise conv keeps its nn.Conv2d
    parameters and runs on the token grid."""

    def __init__(self, dim: int, ratio: float):
        super().__init__()
        hidden = int(dim * ratio)
        self.inverted = Linear(dim, 2 * hidden)
        self.depthwise = nn.Conv2d(2 * hidden, 2 * hidden, 3, padding=1, groups=2 * hidden)
        self.point = Linear(hidden, dim, bias=False)
        self.register_load_state_dict_pre_hook(_conv1x1_as_linear)

    def forward(self, x: torch.Tensor, hw: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor | None]:
        """x (B, N, C) -> (B, N, C) and point's bias or None, as LinearSelfAttention's (point has none in Sana)."""
        x, in_bias = bias_out(self.inverted, x)  # (B, N, 2 * hidden); in_bias's gradient comes from the GLU
        # silu, 3x3, x * silu(gate): (B, N, hidden)
        x = depthwise_glu(x, self.depthwise.weight, self.depthwise.bias, hw, in_bias=in_bias)
        return bias_out(self.point, x)


# LinearDiT -> its WeightCopies, kept off the module so that deepcopy, state_dict and .to() never see the buffer
_COPIES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()

_CONV1X1 = ("inverted.weight", "point.weight")  # MixFFN's projections, 1x1 convolutions in diffusers and before


def _conv1x1_as_linear(module, state_dict, prefix, *_):
    for name in _CONV1X1:
        w = state_dict.get(prefix + name)
        if w is not None and w.dim() == 4 and w.shape[2:] == (1, 1):
            state_dict[prefix + name] = w.flatten(1)


class LinearDiTBlock(nn.Module):
    def __init__(self, cfg: DiTConfig):
        super().__init__()
        dim = cfg.hidden_size
        self.norm1 = nn.LayerNorm(dim, elementwise_affine=False, eps=cfg.norm_eps)
        self.attn = LinearSelfAttention(dim, cfg.num_heads, cfg.attention_bias)
        self.cross_attn = CrossAttention(dim, cfg.cross_heads)
        self.norm2 = nn.LayerNorm(dim, elementwise_affine=False, eps=cfg.norm_eps)
        self.mlp = MixFFN(dim, cfg.mlp_ratio)
        self.scale_shift_table = nn.Parameter(torch.randn(6, dim) / dim**0.5)

    def forward(self, x, y, y_bias, t_mod, hw, defer: bool = False):
        """x (B, N, C), or the previous block's Residual; t_mod (B, 6 * C) -> x (B, N, C), or with defer this
        block's last add as a Residual, for the model to hand to the next block."""
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = (
            self.scale_shift_table[None] + t_mod.reshape(t_mod.shape[0], 6, -1)).chunk(6, dim=1)  # each (B, 1, C)
        x, h = modulate_stream(self.norm1, x, shift_msa, scale_msa, self.attn.qkv)
        # the branches' output biases get their gradients from the backward kernel of the op that reads the
        # branch (the gated residuals', add + modulate's; bias_out)
        h, bias = self.attn(h)
        x = adaln.gated_residual(x, gate_msa, h, branch_bias=bias)
        x, c, bias = self.cross_attn(x, y, y_bias)
        x, h = add_modulate(self.norm2, x, c, shift_mlp, scale_mlp, self.mlp.inverted, branch_bias=bias)
        h, bias = self.mlp(h, hw)
        out = Residual(x, gate_mlp, h, bias)
        return out if defer else out.add()


class LinearDiT(nn.Module):
    def __init__(self, cfg: DiTConfig):
        super().__init__()
        self.cfg = cfg
        dim, p = cfg.hidden_size, cfg.patch_size
        self.x_embedder = nn.Conv2d(cfg.in_channels, dim, kernel_size=p, stride=p)
        self.t_embedder = TimestepEmbedder(dim)
        self.t_block = nn.Sequential(nn.SiLU(), Linear(dim, 6 * dim))  # AdaLN-single, shared by all blocks
        self.y_embedder = nn.Sequential(Linear(cfg.caption_channels, dim), nn.GELU(approximate="tanh"),
                                        Linear(dim, dim))
        self.y_norm = RMSNorm(dim, eps=1e-5)
        self.blocks = nn.ModuleList(LinearDiTBlock(cfg) for _ in range(cfg.depth))
        self.final_norm = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.final_scale_shift_table = nn.Parameter(torch.randn(2, dim) / dim**0.5)
        self.final_linear = Linear(dim, p * p * cfg.in_channels)
        self.gradient_checkpointing = False

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor,
                y_mask: torch.Tensor | None = None) -> torch.Tensor:
        """x (B, C, H, W); t (B,) in [0, 1]; y (B, L, caption_channels); y_mask (B, L) bool, True = real token
        (None: all real) -> velocity (B, C, H, W)."""
        with self._weight_casts(x):
            return self._forward(x, t, y, y_mask)

    def _weight_casts(self, x: torch.Tensor):
        """On the fast path under autocast: the Linear layers' weights and biases cast once a forward in one
        multi-tensor kernel (kernels.linear.weight_casts), not one cast kernel each a call; where an optimizer
        writes the copies as it steps (sana_core.adamw.TritonAdamW: kernels.linear.keep_copies), and in inference,
        persistent copies recast only after a weight changed any other way."""
        dtype = autocast_dtype(x)
        if dtype is None or torch.compiler.is_compiling() or resolve_block_backend(x) != "triton":
            return contextlib.nullcontext()
        # not the layers of compiled blocks (sana_core.pipeline.compile_blocks): the compiler casts those itself
        compiled = {id(m) for b in self.blocks if getattr(b, "_compiled_call_impl", None) is not None
                    for m in b.modules()}
        params = castable((p for m in self.modules() if isinstance(m, Linear) and id(m) not in compiled
                           for p in (m.weight, m.bias)), dtype)
        copies = _COPIES.get(self)
        # inference (no gradient) keeps them too: its weights change between forwards if at all, and refresh()
        # sees any change, so a sampling loop casts once, not each step (1.3 ms of a 76 ms Sana-0.6B bs32 forward
        # on the H100); a training forward with no optimizer writing them drops them (stale after every step)
        keep = copies_kept(params) or not torch.is_grad_enabled()
        if copies is not None and not (keep and copies.matches(params, dtype)):
            copies.release()
            del _COPIES[self]
            copies = None
        if keep and copies is None:
            copies = _COPIES[self] = WeightCopies(params, dtype)
        return weight_casts(params, dtype, copies)

    @staticmethod
    def capture_reads_weight_copies():
        """Within: a CUDA-graph capture of the forward reads the persistent weight copies, for a caller that calls
        refresh_weight_copies before every replay (kernels.linear.copies_checked_by_caller)."""
        return copies_checked_by_caller()

    def refresh_weight_copies(self) -> None:
        """Recast the persistent weight copies if a weight changed (before replaying a captured forward)."""
        copies = _COPIES.get(self)
        if copies is not None:
            copies.refresh()

    def _forward(self, x, t, y, y_mask):
        B, C, H, W = x.shape
        p = self.cfg.patch_size
        if C != self.cfg.in_channels or H % p or W % p:
            raise SanaError(f"LinearDiT expects (B, {self.cfg.in_channels}, H, W) with H, W multiples of {p}, "
                            f"got {tuple(x.shape)}")
        hw = (H // p, W // p)
        x = embed_patches(self.x_embedder, x, p)  # (B, N, C)
        t_emb = self.t_embedder(t * self.cfg.timestep_scale)
        t_mod = self.t_block(t_emb)
        y = self.y_norm(self.y_embedder(y))  # float32 (RMSNorm's float32 weight)
        if (dtype := autocast_dtype(y)) is not None:  # the cast each block's kv projection would make, made once
            y = y.to(dtype)
        # Additive -10000 like diffusers (not -inf): an all-padding row then stays finite.
        if y_mask is None:
            y_mask = torch.ones(y.shape[:2], dtype=torch.bool, device=y.device)
        y_bias = (~y_mask.bool()).float() * -10000.0  # (B, L)
        for block in self.blocks:  # each block's last add is left to the next reader of the sum (Residual)
            if self.gradient_checkpointing and torch.is_grad_enabled():
                x = checkpoint(block, x, y, y_bias, t_mod, hw, True, use_reentrant=False)
            else:
                x = block(x, y, y_bias, t_mod, hw, defer=True)
        shift, scale = (self.final_scale_shift_table[None] + t_emb[:, None]).chunk(2, dim=1)  # each (B, 1, C)
        x = self.final_linear(modulate_stream(self.final_norm, x, shift, scale)[1])
        x = x.view(B, hw[0], hw[1], p, p, C).permute(0, 5, 1, 3, 2, 4)
        return x.reshape(B, C, H, W)

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())


# --- diffusers SanaTransformer2DModel state-dict layout ------------------------------------------------------

_TOP = {
    "x_embedder.weight": "patch_embed.proj.weight", "x_embedder.bias": "patch_embed.proj.bias",
    "t_embedder.mlp.0.weight": "time_embed.emb.timestep_embedder.linear_1.weight",
    "t_embedder.mlp.0.bias": "time_embed.emb.timestep_embedder.linear_1.bias",
    "t_embedder.mlp.2.weight": "time_embed.emb.timestep_embedder.linear_2.weight",
    "t_embedder.mlp.2.bias": "time_embed.emb.timestep_embedder.linear_2.bias",
    "t_block.1.weight": "time_embed.linear.weight", "t_block.1.bias": "time_embed.linear.bias",
    "y_embedder.0.weight": "caption_projection.linear_1.weight",
    "y_embedder.0.bias": "caption_projection.linear_1.bias",
    "y_embedder.2.weight": "caption_projection.linear_2.weight",
    "y_embedder.2.bias": "caption_projection.linear_2.bias",
    "y_norm.weight": "caption_norm.weight",
    "final_scale_shift_table": "scale_shift_table",
    "final_linear.weight": "proj_out.weight", "final_linear.bias": "proj_out.bias",
}
_BLOCK = {
    "attn.proj.weight": "attn1.to_out.0.weight", "attn.proj.bias": "attn1.to_out.0.bias",
    "cross_attn.q.weight": "attn2.to_q.weight", "cross_attn.q.bias": "attn2.to_q.bias",
    "cross_attn.proj.weight": "attn2.to_out.0.weight", "cross_attn.proj.bias": "attn2.to_out.0.bias",
    "mlp.inverted.weight": "ff.conv_inverted.weight", "mlp.inverted.bias": "ff.conv_inverted.bias",
    "mlp.depthwise.weight": "ff.conv_depth.weight", "mlp.depthwise.bias": "ff.conv_depth.bias",
    "mlp.point.weight": "ff.conv_point.weight", "scale_shift_table": "scale_shift_table",
}
# Ours (fused) -> diffusers (split along dim 0).
_FUSED = {"attn.qkv": ("attn1.to_q", "attn1.to_k", "attn1.to_v"), "cross_attn.kv": ("attn2.to_k", "attn2.to_v")}


def to_diffusers_state_dict(model: LinearDiT) -> dict[str, torch.Tensor]:
    sd = model.state_dict()
    out: dict[str, torch.Tensor] = {}
    for ours, theirs in _TOP.items():
        out[theirs] = sd[ours]
    for i in range(model.cfg.depth):
        pre, dpre = f"blocks.{i}.", f"transformer_blocks.{i}."
        for ours, theirs in _BLOCK.items():
            w = sd[pre + ours]
            out[dpre + theirs] = w[:, :, None, None] if ours.removeprefix("mlp.") in _CONV1X1 else w
        for ours, parts in _FUSED.items():
            for suffix in ("weight", "bias"):
                key = f"{pre}{ours}.{suffix}"
                if key in sd:
                    for part, chunk in zip(parts, sd[key].chunk(len(parts), dim=0)):
                        out[f"{dpre}{part}.{suffix}"] = chunk.clone()
    return out


def load_diffusers_state_dict(model: LinearDiT, sd: dict[str, torch.Tensor]) -> None:
    """Load a SanaTransformer2DModel state dict; missing or unexpected keys are an error naming them."""
    ours: dict[str, torch.Tensor] = {}
    used: set[str] = set()

    def take(theirs: str, dst: str) -> None:
        if theirs in sd:
            ours[dst] = sd[theirs]
            used.add(theirs)

    for o, t in _TOP.items():
        take(t, o)
    for i in range(model.cfg.depth):
        pre, dpre = f"blocks.{i}.", f"transformer_blocks.{i}."
        for o, t in _BLOCK.items():
            take(dpre + t, pre + o)
        for o, parts in _FUSED.items():
            for suffix in ("weight", "bias"):
                names = [f"{dpre}{p}.{suffix}" for p in parts]
                if all(n in sd for n in names):
                    ours[f"{pre}{o}.{suffix}"] = torch.cat([sd[n] for n in names], dim=0)
                    used.update(names)
    # Name missing keys in the diffusers layout the user's checkpoint is in.
    missing, unexpected = sorted(set(to_diffusers_state_dict(model)) - set(sd)), sorted(set(sd) - used)
    if missing or unexpected:
        raise SanaError(f"diffusers Sana state dict does not fit LinearDiT({model.cfg.depth} blocks): "
                        f"missing {missing[:5]}{'...' if len(missing) > 5 else ''}, "
                        f"unexpected {unexpected[:5]}{'...' if len(unexpected) > 5 else ''}")
    model.load_state_dict(ours, strict=True)
