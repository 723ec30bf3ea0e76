"""Post-training W8A8 quantisation of the Linear DiT's block linears (int8 or fp8), as Sana deploys it.

    quantize_dit(dit, "w8a8-int8")       # in place: the block linears become QuantLinear
    save_quantized(dit, "dit-int8.safetensors"); dit = load_quantized("dit-int8.safetensors")

Weights: symmetric per-output-channel (one float32 scale per row of the (N, K) weight), quantised once.
Activations: symmetric per-token, dynamic. The inputs of QKV and of Mix-FFN's first point-wise layer are
quantised by the kernel that produces them, the block's fused norm/modulate (sana_core.dit.modulate asks its
consumer's `input_format`; kernels.adaln), as Sana's own recipe does: no bf16 activation is written and read
back. The other four (the self-attention and cross-attention outputs' projections, cross-attention Q on the
residual stream, Mix-FFN's second layer after the depthwise GLU, whose channel tiles span programs) go through
the separate Triton pass of kernels.int8_gemm (absmax, scale and cast in one read of the row), about 5-10% of a
block GEMM's time at Sana-0.6B's shapes.

Layers are found by module name, from outside the DiT (sana_core/dit.py is not touched): in every block,
the names in BLOCK_LINEARS. An nn.Linear is quantised as it is; a 1x1 nn.Conv2d (Mix-FFN's inverted and
point layers before they became nn.Linear over (B, N, C)) is quantised as the same linear over channels.
Everything else stays in the model's float dtype, for the reasons in KEPT_FLOAT.
"""
from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import torch
from torch import nn

from kernels.int8_gemm import quantize_weight, w8a8_linear
from sana_core.errors import SanaError

MODES = {"none": None, "w8a8-int8": "int8", "w8a8-fp8": "fp8"}

# Per block: QKV, the self-attention output, cross-attention Q / KV / output, Mix-FFN's two point-wise layers.
BLOCK_LINEARS = ("attn.qkv", "attn.proj", "cross_attn.q", "cross_attn.kv", "cross_attn.proj", "mlp.inverted",
                 "mlp.point")

# What is not quantised, in one place, and why. Together these are < 2% of the DiT's matmul work at 1024 px.
KEPT_FLOAT = {
    "x_embedder": "patch embedding, K = 32 latent channels: too thin a GEMM to gain, and its error would reach "
                  "every token of every block",
    "t_embedder": "timestep MLP on B rows: nothing to gain, and it feeds every block's modulation",
    "t_block": "AdaLN-single (6 x hidden shift/scale/gate) on B rows: its errors multiply every block's "
               "activations",
    "y_embedder": "caption projection over the text tokens (300 a prompt, a few % of the image tokens' work); "
                  "Gemma-2 embeddings have outlier channels that per-token int8 would crush",
    "blocks.*.mlp.depthwise": "3x3 depthwise conv: memory bound, no GEMM for int8/fp8 to speed up",
    "blocks.*.norm*, *scale_shift_table, y_norm, final_norm": "norms and modulation tables: elementwise",
    "final_linear": "output projection to 32 channels (N = 32): no tile to fill, and its error is the "
                    "velocity's error directly",
}


class QuantLinear(nn.Module):
    """y = w8a8(x) with the weight held quantised (weight_q, weight_scale) and the bias in float.

    channels_first: the module replaces a 1x1 Conv2d and takes (B, C, H, W)."""

    def __init__(self, in_features: int, out_features: int, fmt: str, bias: bool = True,
                 channels_first: bool = False, bias_dtype: torch.dtype = torch.float32, device=None):
        super().__init__()
        if fmt not in ("int8", "fp8"):
            raise SanaError(f"QuantLinear format must be 'int8' or 'fp8', got {fmt!r}")
        qdtype = torch.int8 if fmt == "int8" else torch.float8_e4m3fn
        self.in_features, self.out_features, self.fmt, self.channels_first = (in_features, out_features, fmt,
                                                                             channels_first)
        self.register_buffer("weight_q", torch.zeros(out_features, in_features, dtype=qdtype, device=device))
        self.register_buffer("weight_scale", torch.ones(out_features, dtype=torch.float32, device=device))
        self.bias = nn.Parameter(torch.zeros(out_features, dtype=bias_dtype, device=device),
                                 requires_grad=False) if bias else None

    @classmethod
    def from_module(cls, m: nn.Module, fmt: str, name: str = "") -> QuantLinear:
        if isinstance(m, nn.Linear):
            w, channels_first = m.weight, False
        elif isinstance(m, nn.Conv2d) and m.kernel_size == (1, 1) and m.groups == 1 and m.stride == (1, 1):
            w, channels_first = m.weight.flatten(1), True
        else:
            raise SanaError(f"cannot quantise {name or type(m).__name__}: {type(m).__name__} is neither "
                            f"nn.Linear nor a 1x1 nn.Conv2d")
        q = cls(w.shape[1], w.shape[0], fmt, bias=m.bias is not None, channels_first=channels_first,
                bias_dtype=w.dtype, device=w.device)
        wq, ws = quantize_weight(w, fmt)
        q.weight_q.copy_(wq)
        q.weight_scale.copy_(ws)
        if m.bias is not None:
            q.bias.data.copy_(m.bias.detach())
        return q

    @property
    def input_format(self) -> str | None:
        """The format in which this layer also takes its input already quantised per token (QuantizedRows)."""
        return None if self.channels_first else self.fmt

    def dequantized_weight(self) -> torch.Tensor:
        return self.weight_q.float() * self.weight_scale[:, None]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.channels_first:
            return w8a8_linear(x.movedim(1, -1), self.weight_q, self.weight_scale, self.bias, self.fmt).movedim(-1, 1)
        return w8a8_linear(x, self.weight_q, self.weight_scale, self.bias, self.fmt)

    def _apply(self, fn, recurse=True):
        # model.to(dtype) must move the quantised weight and its float32 scales, never cast them (an fp8
        # buffer counts as floating point, and bf16 scales would lose precision): they take the device only.
        device = fn(torch.empty(0, device=self.weight_scale.device)).device
        held = {k: self._buffers.pop(k) for k in ("weight_q", "weight_scale")}
        super()._apply(fn, recurse)
        for k, t in held.items():
            self._buffers[k] = t.to(device)
        return self

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, fmt={self.fmt}, "
                f"bias={self.bias is not None}" + (", channels_first" if self.channels_first else ""))


def _fmt(mode: str) -> str | None:
    if mode not in MODES:
        raise SanaError(f"unknown quantisation mode {mode!r}; choose one of {sorted(MODES)}")
    return MODES[mode]


def target_names(dit: nn.Module, layers: tuple[str, ...] = BLOCK_LINEARS) -> list[str]:
    """Full module names of the layers to quantise: blocks.{i}.{layer} for every block."""
    names = []
    for i in range(len(dit.blocks)):
        for layer in layers:
            name = f"blocks.{i}.{layer}"
            try:
                dit.get_submodule(name)
            except AttributeError:
                raise SanaError(f"quantisation target {name} is not a module of this DiT") from None
            names.append(name)
    return names


def _set(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)


def quantize_dit(dit: nn.Module, mode: str, layers: tuple[str, ...] = BLOCK_LINEARS) -> nn.Module:
    """Replaces the named block layers by QuantLinear (in place) and returns the model. "none" is a no-op."""
    fmt = _fmt(mode)
    if fmt is None:
        return dit
    for name in target_names(dit, layers):
        m = dit.get_submodule(name)
        if isinstance(m, QuantLinear):
            raise SanaError(f"{name} is already quantised ({m.fmt})")
        _set(dit, name, QuantLinear.from_module(m, fmt, name))
    dit.quant_mode = mode
    return dit


def quant_mode(dit: nn.Module) -> str:
    return getattr(dit, "quant_mode", "none")


def save_quantized(dit: nn.Module, path: str | Path) -> None:
    """One safetensors file: the state dict (quantised weights, their scales, float layers) and, in its
    metadata, the mode and the DiT config that load_quantized rebuilds the model from."""
    from safetensors.torch import save_file

    mode = quant_mode(dit)
    if mode == "none":
        raise SanaError("save_quantized: the model is not quantised (call quantize_dit first)")
    sd = {k: v.contiguous() for k, v in dit.state_dict().items()}
    save_file(sd, str(path), metadata={"sana_quant": mode, "dit_config": json.dumps(asdict(dit.cfg)),
                                       "layers": json.dumps(sorted(BLOCK_LINEARS))})


def load_quantized(path: str | Path, device: str | torch.device = "cpu",
                   dtype: torch.dtype | None = None) -> nn.Module:
    """The model save_quantized wrote; float layers in `dtype` (default: as saved)."""
    from safetensors import safe_open

    from sana_core.dit import DiTConfig, LinearDiT

    path = Path(path)
    if not path.is_file():
        raise SanaError(f"quantised checkpoint {path} does not exist")
    try:
        with safe_open(str(path), framework="pt", device=str(device)) as f:
            meta = f.metadata() or {}
            sd = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # noqa: BLE001 - safetensors raises its own error types for bad files
        raise SanaError(f"cannot read quantised checkpoint {path}: {e}") from e
    if "sana_quant" not in meta or "dit_config" not in meta:
        raise SanaError(f"{path} is not a quantised DiT checkpoint (no sana_quant / dit_config metadata)")
    layers = tuple(json.loads(meta.get("layers", "[]"))) or BLOCK_LINEARS
    with torch.device("meta"):
        dit = LinearDiT(DiTConfig(**json.loads(meta["dit_config"])))
    # Quantise the skeleton so its modules have the saved layout, then take the saved tensors as they are.
    for name in target_names(dit, layers):
        m = dit.get_submodule(name)
        w = m.weight.flatten(1)
        _set(dit, name, QuantLinear(w.shape[1], w.shape[0], MODES[meta["sana_quant"]], bias=m.bias is not None,
                                    channels_first=isinstance(m, nn.Conv2d), device="meta"))
    dit.quant_mode = meta["sana_quant"]
    try:
        dit.load_state_dict(sd, strict=True, assign=True)
    except RuntimeError as e:
        raise SanaError(f"{path} does not fit a {dit.cfg.depth}-block DiT: {str(e).splitlines()[0]}") from e
    if dtype is not None:
        dit.to(dtype)
    return dit.eval()


@torch.no_grad()
def layer_errors(dit: nn.Module, mode: str, run, layers: tuple[str, ...] = BLOCK_LINEARS) -> dict[str, dict]:
    """Per-layer error of quantising each target layer alone on the float model's own activations.

    `run()` runs the float model forward; a hook on every target layer computes the quantised layer's output
    on the same input. Returns name -> {"rel_err": ||q - f|| / ||f||, "cos": cosine similarity}."""
    fmt = _fmt(mode)
    if fmt is None:
        raise SanaError("layer_errors needs a quantisation mode other than 'none'")
    stats: dict[str, list[float]] = {}
    hooks = []
    for name in target_names(dit, layers):
        m = dit.get_submodule(name)
        q = QuantLinear.from_module(m, fmt, name)

        def hook(mod, args, out, q=q, name=name):
            ref = out.double().flatten()
            got = q(args[0]).double().flatten()
            s = stats.setdefault(name, [0.0, 0.0, 0.0, 0.0])  # ||d||^2, ||f||^2, <q, f>, ||q||^2
            s[0] += (got - ref).pow(2).sum().item()
            s[1] += ref.pow(2).sum().item()
            s[2] += (got * ref).sum().item()
            s[3] += got.pow(2).sum().item()

        hooks.append(m.register_forward_hook(hook))
    try:
        run()
    finally:
        for h in hooks:
            h.remove()
    return {n: {"rel_err": (d / max(f, 1e-30)) ** 0.5, "cos": c / max((f * g) ** 0.5, 1e-30)}
            for n, (d, f, c, g) in stats.items()}


def summarize_layer_errors(errors: dict[str, dict]) -> dict[str, dict]:
    """Per layer type (attn.qkv, ...): mean and worst relative error over the blocks, and the worst block."""
    out: dict[str, dict] = {}
    for name, e in errors.items():
        _, i, layer = name.split(".", 2)
        row = out.setdefault(layer, {"mean_rel_err": 0.0, "max_rel_err": 0.0, "worst_block": -1, "min_cos": 1.0,
                                     "n": 0})
        row["mean_rel_err"] += e["rel_err"]
        row["n"] += 1
        row["min_cos"] = min(row["min_cos"], e["cos"])
        if e["rel_err"] > row["max_rel_err"]:
            row["max_rel_err"], row["worst_block"] = e["rel_err"], int(i)
    for row in out.values():
        row["mean_rel_err"] /= row.pop("n")
    return out
