"""Released Sana weights in and out of LinearDiT: NVlabs/Sana `.pth` checkpoints, diffusers
`SanaTransformer2DModel` folders (or Hub ids), and LoRA adapters in the layout diffusers' Sana loader reads.

NVlabs layout (NVlabs/Sana diffusion/model/nets/sana_multi_scale.py, the keys that diffusers'
scripts/convert_sana_to_diffusers.py pops): `x_embedder.proj`, `t_embedder.mlp.{0,2}`, `t_block.1`,
`y_embedder.y_proj.fc{1,2}`, `attention_y_norm`, per block `attn.qkv` / `attn.proj` (LiteLA, fused QKV like ours),
`cross_attn.q_linear` / `kv_linear` / `proj`, `mlp.{inverted,depth,point}_conv.conv`, `scale_shift_table`, and
`final_layer.linear` / `final_layer.scale_shift_table`. The checkpoint file holds `state_dict` (and, from their
trainer, `ema`) next to optimizer state; `y_embedder.y_embedding` (the learnt null caption, which Sana's sampler
does not use: the negative prompt is encoded by Gemma), `pos_embed` and `logvar_linear` have no counterpart.

LoRA layout: peft's `lora_A` / `lora_B` names under diffusers' module names with the `transformer.` prefix, as
`SanaPipeline.save_lora_weights` writes and `SanaPipeline.load_lora_weights` reads. Our fused projections export
as one adapter per diffusers projection with the same `lora_A` and `lora_B` split by rows, which is the same
function: (B_q; B_k; B_v) A x = (B_q A x; B_k A x; B_v A x). The scale alpha / r is folded into `lora_B`, so the
file needs no alpha (diffusers' default alpha = rank gives scale 1).
"""
from __future__ import annotations

import json
import re
from pathlib import Path

import torch

from sana_core.dit import DiTConfig, LinearDiT, load_diffusers_state_dict
from sana_core.errors import SanaError

# --- NVlabs/Sana .pth --------------------------------------------------------------------------------------------

_NV_TOP = {  # ours -> NVlabs
    "x_embedder.weight": "x_embedder.proj.weight", "x_embedder.bias": "x_embedder.proj.bias",
    "t_embedder.mlp.0.weight": "t_embedder.mlp.0.weight", "t_embedder.mlp.0.bias": "t_embedder.mlp.0.bias",
    "t_embedder.mlp.2.weight": "t_embedder.mlp.2.weight", "t_embedder.mlp.2.bias": "t_embedder.mlp.2.bias",
    "t_block.1.weight": "t_block.1.weight", "t_block.1.bias": "t_block.1.bias",
    "y_embedder.0.weight": "y_embedder.y_proj.fc1.weight", "y_embedder.0.bias": "y_embedder.y_proj.fc1.bias",
    "y_embedder.2.weight": "y_embedder.y_proj.fc2.weight", "y_embedder.2.bias": "y_embedder.y_proj.fc2.bias",
    "y_norm.weight": "attention_y_norm.weight",
    "final_scale_shift_table": "final_layer.scale_shift_table",
    "final_linear.weight": "final_layer.linear.weight", "final_linear.bias": "final_layer.linear.bias",
}
_NV_BLOCK = {  # ours -> NVlabs, under blocks.{i}.
    "scale_shift_table": "scale_shift_table",
    "attn.qkv.weight": "attn.qkv.weight", "attn.qkv.bias": "attn.qkv.bias",
    "attn.proj.weight": "attn.proj.weight", "attn.proj.bias": "attn.proj.bias",
    "cross_attn.q.weight": "cross_attn.q_linear.weight", "cross_attn.q.bias": "cross_attn.q_linear.bias",
    "cross_attn.kv.weight": "cross_attn.kv_linear.weight", "cross_attn.kv.bias": "cross_attn.kv_linear.bias",
    "cross_attn.proj.weight": "cross_attn.proj.weight", "cross_attn.proj.bias": "cross_attn.proj.bias",
    "mlp.inverted.weight": "mlp.inverted_conv.conv.weight", "mlp.inverted.bias": "mlp.inverted_conv.conv.bias",
    "mlp.depthwise.weight": "mlp.depth_conv.conv.weight", "mlp.depthwise.bias": "mlp.depth_conv.conv.bias",
    "mlp.point.weight": "mlp.point_conv.conv.weight",
}
_NV_IGNORED = re.compile(r"^(y_embedder\.y_embedding|pos_embed|logvar_linear\..*)$")
# Sana's released widths -> (linear self-attention heads, cross-attention heads); a .pth does not record heads
# (NVlabs derives self-attention heads from linear_head_dim=32 and takes cross heads from the model config).
RELEASED_HEADS = {1152: (36, 16), 2240: (70, 20)}
# What the released checkpoints were trained with (NVlabs configs; diffusers' Sana pipelines ship the same).
RELEASED_TEXT_ENCODER = "google/gemma-2-2b-it"
RELEASED_AUTOENCODER = "mit-han-lab/dc-ae-f32c32-sana-1.0-diffusers"


def read_nvlabs_pth(path: str | Path, entry: str = "auto") -> tuple[dict[str, torch.Tensor], str]:
    """The weights of an NVlabs checkpoint file: its `ema` entry when present (what one samples from), else
    `state_dict`; `entry` picks one. Read with weights_only=True: a .pth is pickle."""
    try:
        try:  # memory-mapped: reading the config of a multi-GB checkpoint should not load it
            ckpt = torch.load(str(path), map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError:  # legacy (non-zip) serialization cannot be mapped
            ckpt = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise SanaError(f"cannot read NVlabs checkpoint {path}: {first}") from e
    if not isinstance(ckpt, dict):
        raise SanaError(f"NVlabs checkpoint {path} holds a {type(ckpt).__name__}, not a dict")
    if entry == "auto":
        entry = "ema" if isinstance(ckpt.get("ema"), dict) else "state_dict"
    if entry not in ckpt and all(isinstance(v, torch.Tensor) for v in ckpt.values()):
        sd, entry = ckpt, "(top level)"  # a bare state dict
    elif not isinstance(ckpt.get(entry), dict):
        raise SanaError(f"NVlabs checkpoint {path} has no '{entry}' entry (entries: {sorted(ckpt)[:8]})")
    else:
        sd = ckpt[entry]
    if sd and all(k.startswith("module.") for k in sd):  # saved from inside DDP
        sd = {k[len("module."):]: v for k, v in sd.items()}
    return sd, entry


def nvlabs_dit_config(sd: dict[str, torch.Tensor], fallback: DiTConfig) -> DiTConfig:
    """The DiT config a NVlabs state dict implies. Shapes give widths, depth, caption width, MLP ratio, patch and
    bias; attention heads come from the released model of that width, else from `fallback`."""
    unsupported = sorted(k for k in sd if re.search(r"\.(q_norm|k_norm)\.", k) or k.startswith("cfg_embedder."))
    if unsupported:
        raise SanaError(f"NVlabs checkpoint uses options LinearDiT does not have (QK norm / CFG embedding, "
                        f"Sana 1.5 / Sprint): {unsupported[:3]}")
    try:
        x = sd["x_embedder.proj.weight"]
        hidden, in_ch, patch = x.shape[0], x.shape[1], x.shape[2]
        depth = 1 + max(int(m.group(1)) for k in sd if (m := re.match(r"blocks\.(\d+)\.", k)))
        caption = sd["y_embedder.y_proj.fc1.weight"].shape[1]
        mlp_hidden = sd["blocks.0.mlp.inverted_conv.conv.weight"].shape[0] // 2
    except (KeyError, ValueError) as e:
        raise SanaError(f"not an NVlabs Sana state dict (missing {e})") from None
    heads, cross = RELEASED_HEADS.get(hidden, (fallback.num_heads, fallback.cross_heads))
    return DiTConfig(in_channels=in_ch, hidden_size=hidden, depth=depth, num_heads=heads, cross_heads=cross,
                     caption_channels=caption, mlp_ratio=mlp_hidden / hidden, patch_size=patch,
                     attention_bias="blocks.0.attn.qkv.bias" in sd, norm_eps=fallback.norm_eps,
                     timestep_scale=fallback.timestep_scale)


def _nv_names(depth: int) -> dict[str, str]:
    names = dict(_NV_TOP)
    for i in range(depth):
        names.update({f"blocks.{i}.{o}": f"blocks.{i}.{t}" for o, t in _NV_BLOCK.items()})
    return names


def _fit(w: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    # Mix-FFN's 1x1 projections are nn.Linear (2-D) on our side and 1x1 convs (4-D) in NVlabs' files; a size
    # mismatch is left for load_state_dict to name.
    return w.reshape(shape) if w.numel() == shape.numel() else w


def load_nvlabs_state_dict(model: LinearDiT, sd: dict[str, torch.Tensor]) -> None:
    """Load a NVlabs Sana state dict; keys missing or left over are an error naming them."""
    names = _nv_names(model.cfg.depth)
    target = model.state_dict()
    ours, used = {}, set()
    for o, t in names.items():
        if o in target and t in sd:
            ours[o] = _fit(sd[t], target[o].shape).to(target[o].dtype)
            used.add(t)
    missing = sorted(names[k] for k in target if k not in ours and k in names)
    missing += sorted(k for k in target if k not in names)
    unexpected = sorted(k for k in set(sd) - used if not _NV_IGNORED.match(k))
    if missing or unexpected:
        raise SanaError(f"NVlabs Sana state dict does not fit LinearDiT({model.cfg.depth} blocks): "
                        f"missing {missing[:5]}{'...' if len(missing) > 5 else ''}, "
                        f"unexpected {unexpected[:5]}{'...' if len(unexpected) > 5 else ''}")
    model.load_state_dict(ours, strict=True)


# --- diffusers SanaTransformer2DModel folders / Hub ids ----------------------------------------------------------

def diffusers_transformer_location(source: str) -> tuple[str, dict]:
    """(path or id, from_pretrained kwargs) of the SanaTransformer2DModel in `source`: a transformer folder, a
    pipeline folder with transformer/, or a Hub id of either."""
    p = Path(source)
    if p.exists():
        if (p / "config.json").is_file():
            return str(p), {}
        if (p / "transformer" / "config.json").is_file():
            return str(p), {"subfolder": "transformer"}
        raise SanaError(f"{source}: no config.json (a diffusers SanaTransformer2DModel folder) and no "
                        f"transformer/config.json (a pipeline folder)")
    from huggingface_hub import hf_hub_download
    try:  # a pipeline repo names its parts in model_index.json
        hf_hub_download(source, "model_index.json")
        return source, {"subfolder": "transformer"}
    except Exception:  # noqa: BLE001 - no model_index.json (or no answer): a transformer repo, from_pretrained says
        return source, {}


def read_diffusers_config(source: str) -> dict:
    from diffusers import SanaTransformer2DModel
    where, kw = diffusers_transformer_location(source)
    try:
        cfg = SanaTransformer2DModel.load_config(where, **kw)
    except Exception as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise SanaError(f"cannot read the diffusers Sana config of {source!r}: {first}") from e
    cls = cfg.get("_class_name", "SanaTransformer2DModel")
    if cls != "SanaTransformer2DModel":
        raise SanaError(f"{source!r} holds a {cls}, not a SanaTransformer2DModel")
    return dict(cfg)


def load_diffusers_weights(model: LinearDiT, source: str, lora: str | None = None) -> None:
    """Load the weights of a diffusers SanaTransformer2DModel (folder or Hub id) into `model`, through diffusers'
    own loader (safetensors, shards, dtype); `lora`: a diffusers-layout LoRA (file or folder) fused in first, by
    diffusers (load_lora_adapter, fuse_lora, unload_lora: its alpha / rank conventions, not ours)."""
    from diffusers import SanaTransformer2DModel
    where, kw = diffusers_transformer_location(source)
    try:
        theirs = SanaTransformer2DModel.from_pretrained(where, torch_dtype=torch.float32, **kw)
    except Exception as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise SanaError(f"cannot load the diffusers Sana transformer from {source!r}: {first}") from e
    if lora is not None:
        try:
            theirs.load_lora_adapter(str(lora), prefix="transformer")
        except Exception as e:
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise SanaError(f"cannot apply the LoRA {lora} to {source}: {first}") from e
        theirs.fuse_lora()
        theirs.unload_lora()  # the LoRA layers go, their product stays fused into the base weights
    load_diffusers_state_dict(model, theirs.state_dict())


# --- LoRA, diffusers layout ----------------------------------------------------------------------------------------

# Our LoRA targets -> diffusers module names (several: a fused projection of ours is split by rows).
LORA_DIFFUSERS = {
    "attn.qkv": ("attn1.to_q", "attn1.to_k", "attn1.to_v"), "attn.proj": ("attn1.to_out.0",),
    "cross_attn.q": ("attn2.to_q",), "cross_attn.kv": ("attn2.to_k", "attn2.to_v"),
    "cross_attn.proj": ("attn2.to_out.0",), "mlp.inverted": ("ff.conv_inverted",), "mlp.point": ("ff.conv_point",),
}
_DIFFUSERS_CONV = ("ff.conv_inverted", "ff.conv_point")
_LORA_KEY = re.compile(r"^blocks\.(\d+)\.(.+)\.lora_([AB])\.weight$")


def lora_to_diffusers(lora: dict[str, torch.Tensor], scale: float) -> dict[str, torch.Tensor]:
    """Our adapter tensors (`blocks.{i}.{target}.lora_{A,B}.weight`, adapter name stripped) -> the state dict
    SanaPipeline.save_lora_weights takes (diffusers names, alpha/r folded into lora_B, convs 4-D)."""
    out = {}
    for key, w in lora.items():
        m = _LORA_KEY.match(key)
        if m is None or m.group(2) not in LORA_DIFFUSERS:
            raise SanaError(f"LoRA tensor {key!r} has no diffusers counterpart (targets: {sorted(LORA_DIFFUSERS)})")
        i, target, ab = m.groups()
        parts = LORA_DIFFUSERS[target]
        w = w.detach().float().cpu()
        w = w.flatten(1) if w.dim() == 4 else w  # (out, in) / (r, in) whatever the module type
        # Copies: safetensors refuses tensors that share memory (the shared A, the row views of B).
        chunks = [w.clone() for _ in parts] if ab == "A" else [c.clone() for c in (w * scale).chunk(len(parts))]
        for part, c in zip(parts, chunks):
            if part in _DIFFUSERS_CONV:
                c = c[..., None, None]
            out[f"transformer_blocks.{i}.{part}.lora_{ab}.weight"] = c
    return out


def merge_lora(sd: dict[str, torch.Tensor], scale: float) -> dict[str, torch.Tensor]:
    """A peft-injected LinearDiT state dict (base_layer + lora_A/B.<adapter>) -> plain LinearDiT keys with
    W + scale * B A folded in (the merged model)."""
    out, deltas = {}, {}
    for k, v in sd.items():
        if ".lora_A." in k:
            mod = k.split(".lora_A.")[0]
            b = sd[k.replace(".lora_A.", ".lora_B.")]
            deltas[mod] = (b.float().flatten(1) @ v.float().flatten(1)) * scale
        elif ".lora_B." not in k:
            out[k.replace(".base_layer.", ".")] = v
    for mod, d in deltas.items():
        w = out[f"{mod}.weight"]
        out[f"{mod}.weight"] = (w.float() + d.reshape(w.shape)).to(w.dtype)
    return out


def read_sidecar(folder: str | Path) -> dict:
    """sana_stack.json, written beside our diffusers exports: the text encoder and DC-AE the model was trained
    with (a diffusers transformer folder does not say)."""
    p = Path(folder) / SIDECAR
    if not p.is_file():
        return {}
    try:
        return json.loads(p.read_text())
    except json.JSONDecodeError as e:
        raise SanaError(f"{p} is not valid JSON: {e}") from None


SIDECAR = "sana_stack.json"
