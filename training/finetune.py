"""Fine-tuning from released weights, full or LoRA.

    jobs.train --init-from SOURCE           SOURCE: a diffusers SanaTransformer2DModel folder or Hub id, a diffusers
                                            pipeline folder (its transformer/), or an NVlabs/Sana .pth
                                            (FILE.pth#ema or FILE.pth#state_dict picks the entry; default ema if any)
    --set lora.rank=R [lora.alpha=A lora.dropout=P lora.targets=[...]]
                                            LoRA adapters (peft, the library diffusers loads LoRAs with) on the
                                            attention and Mix-FFN projections; the base stays frozen

The DiT config comes from the source; an explicit --preset/--set/--config value that contradicts it is refused.
The text encoder and DC-AE default to those the source was trained with. A LoRA run's checkpoints hold only the
adapter (and its optimizer/EMA state): the base is `init_from`, referenced by the run's config, not copied.
"""
from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from sana_core import weights as W
from sana_core.dit import DiTConfig, LinearDiT
from sana_core.errors import SanaError
from training.config import LORA_TARGETS, LoraConfig, TrainConfig

ADAPTER = "default"  # peft's adapter name; stripped from exported names


@dataclass
class Source:
    spec: str  # as recorded in the run's config (local paths made absolute)
    kind: str  # "diffusers" | "nvlabs"
    dit: DiTConfig
    text_encoder: str | None  # what the source was trained with (None: unknown)
    autoencoder: str | None
    entry: str = "auto"  # NVlabs: which entry of the .pth

    def describe(self) -> str:
        c = self.dit
        return (f"{self.kind} {self.spec} (hidden {c.hidden_size}, depth {c.depth}, heads {c.num_heads}/"
                f"{c.cross_heads}, caption {c.caption_channels})")


def _is_pth(path: str) -> bool:
    return path.endswith((".pth", ".pt")) and Path(path).is_file()


def resolve_source(spec: str, fallback: DiTConfig | None = None) -> Source:
    """Read what the source is (its DiT config and the encoders it was trained with) without building a model."""
    fallback = fallback or DiTConfig()
    path, _, entry = spec.partition("#")
    if _is_pth(path):
        sd, _ = W.read_nvlabs_pth(path, entry or "auto")
        return Source(str(Path(path).resolve()) + (f"#{entry}" if entry else ""), "nvlabs",
                      W.nvlabs_dit_config(sd, fallback), W.RELEASED_TEXT_ENCODER, W.RELEASED_AUTOENCODER,
                      entry or "auto")
    if entry:
        raise SanaError(f"--init-from {spec}: '#{entry}' only selects an entry of an NVlabs .pth file")
    if Path(path).is_file():
        raise SanaError(f"--init-from {spec}: a single weights file must be an NVlabs .pth; for safetensors give "
                        f"the diffusers folder holding it and its config.json")
    dit = DiTConfig.from_diffusers_config(W.read_diffusers_config(path))
    te = ae = None
    p = Path(path)
    if p.exists():
        p = p.resolve()
        folder, _ = W.diffusers_transformer_location(str(p))
        side = W.read_sidecar(p) or W.read_sidecar(Path(folder) / "transformer")
        pipeline = p if (p / "model_index.json").is_file() else p.parent if (p.parent / "model_index.json").is_file() \
            else None
        if side:
            te, ae = side.get("text_encoder"), side.get("autoencoder")
        elif pipeline is not None:  # TextEncoder / Autoencoder read a pipeline's text_encoder/, tokenizer/, vae/
            te = str(pipeline) if (pipeline / "text_encoder").is_dir() else None
            ae = str(pipeline) if (pipeline / "vae").is_dir() else None
        spec = str(p)
    te = te or W.RELEASED_TEXT_ENCODER
    ae = ae or W.RELEASED_AUTOENCODER
    return Source(spec, "diffusers", dit, te, ae)


def apply_source(cfg: TrainConfig, source: Source, explicit: set[str]) -> TrainConfig:
    """cfg with the DiT config, text encoder and DC-AE of the source. `explicit`: the dotted keys the user set
    (--set, --config, model.dit.* of an explicit --preset); a DiT field among them that differs is refused."""
    for f in dataclasses.fields(DiTConfig):
        key = f"model.dit.{f.name}"
        mine, theirs = getattr(cfg.model.dit, f.name), getattr(source.dit, f.name)
        if key in explicit and mine != theirs:
            raise SanaError(f"--init-from {source.spec}: {key}={mine} contradicts the source's {f.name}={theirs} "
                            f"(the DiT config comes from the source; drop that setting)")
    cfg = dataclasses.replace(cfg, init_from=source.spec)
    cfg.model = dataclasses.replace(cfg.model, dit=dataclasses.replace(source.dit))
    if "model.text_encoder" not in explicit and source.text_encoder:
        cfg.model.text_encoder = source.text_encoder
    if "model.autoencoder" not in explicit and source.autoencoder:
        cfg.model.autoencoder = source.autoencoder
    return cfg


def load_source_weights(model: LinearDiT, source: Source) -> None:
    if source.dit != model.cfg:
        diff = [f.name for f in dataclasses.fields(DiTConfig) if getattr(source.dit, f.name) != getattr(model.cfg, f.name)]
        raise SanaError(f"init_from {source.spec}: model.dit differs from the source in {diff} (run jobs.train "
                        f"--init-from, which takes the DiT config from the source)")
    if source.kind == "nvlabs":
        sd, _ = W.read_nvlabs_pth(source.spec.partition("#")[0], source.entry)
        W.load_nvlabs_state_dict(model, sd)
    else:
        W.load_diffusers_weights(model, source.spec)


# --- LoRA ---------------------------------------------------------------------------------------------------------

def lora_scale(cfg: LoraConfig) -> float:
    return (cfg.alpha or cfg.rank) / cfg.rank


def add_lora(model: LinearDiT, cfg: LoraConfig) -> LinearDiT:
    """Inject peft LoRA layers into the target projections of every block (in place); peft freezes the rest.
    B starts at zero, so the model's output is unchanged until the first step."""
    from peft import LoraConfig as PeftLoraConfig
    from peft import inject_adapter_in_model
    bad = [t for t in cfg.targets if t not in LORA_TARGETS]
    if bad or not cfg.targets:
        raise SanaError(f"lora.targets: {bad or '[]'} not among {LORA_TARGETS}")
    pattern = rf"blocks\.\d+\.({'|'.join(re.escape(t) for t in cfg.targets)})"
    peft_cfg = PeftLoraConfig(r=cfg.rank, lora_alpha=cfg.alpha or cfg.rank, lora_dropout=cfg.dropout,
                              target_modules=pattern, init_lora_weights=True)
    inject_adapter_in_model(peft_cfg, model, adapter_name=ADAPTER)
    return model


def prepare_model(model: LinearDiT, cfg: TrainConfig) -> LinearDiT:
    """The model a run trains: weights from cfg.init_from, then LoRA adapters when lora.rank > 0."""
    if cfg.init_from:
        load_source_weights(model, resolve_source(cfg.init_from, cfg.model.dit))
    if cfg.lora.rank > 0:
        add_lora(model, cfg.lora)
    elif cfg.lora.rank < 0:
        raise SanaError(f"lora.rank must be >= 0, got {cfg.lora.rank}")
    return model


def strip_adapter(name: str) -> str:
    return name.replace(f".{ADAPTER}.", ".")


def lora_state_dict(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The adapter tensors of a (peft-injected) state dict, adapter name stripped."""
    return {strip_adapter(k): v for k, v in sd.items() if ".lora_A." in k or ".lora_B." in k}


def plain_state_dict(sd: dict[str, torch.Tensor], cfg: TrainConfig) -> dict[str, torch.Tensor]:
    """A full state dict of the trained model in plain LinearDiT keys (LoRA merged into the base)."""
    return W.merge_lora(sd, lora_scale(cfg.lora)) if cfg.lora.rank > 0 else sd


def export_lora(out: str | Path, lora: dict[str, torch.Tensor], cfg: TrainConfig) -> Path:
    """Write the adapter as DIR/pytorch_lora_weights.safetensors with diffusers' own writer, in the layout
    SanaPipeline.load_lora_weights reads; DIR/sana_stack.json names the base and the encoders."""
    import json

    from diffusers import SanaPipeline
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    SanaPipeline.save_lora_weights(str(out), transformer_lora_layers=W.lora_to_diffusers(lora, lora_scale(cfg.lora)))
    (out / W.SIDECAR).write_text(json.dumps(sidecar(cfg, lora=True), indent=1))
    return out / LORA_FILE


LORA_FILE = "pytorch_lora_weights.safetensors"


def is_lora_export(path: str | Path) -> bool:
    return (Path(path) / LORA_FILE).is_file()


def load_lora_export(folder: str | Path, base: str | None = None) -> tuple[LinearDiT, TrainConfig]:
    """A diffusers-layout LoRA folder (ours, or any Sana LoRA diffusers loads) fused into its base: the base
    named by --base, else by the folder's sana_stack.json. -> (plain LinearDiT, the config to sample it with)."""
    side = W.read_sidecar(folder)
    base = base or side.get("base")
    if not base:
        raise SanaError(f"{folder}: a LoRA folder without {W.SIDECAR} naming its base; give the base model "
                        f"(a diffusers folder or Hub id) with --base")
    src = resolve_source(base)
    if src.kind != "diffusers":
        raise SanaError(f"LoRA base {base}: diffusers' loader applies a LoRA to a diffusers model; export the "
                        f".pth first (jobs.sample --checkpoint {base} --export-diffusers DIR)")
    cfg = apply_source(TrainConfig(), src, set())
    cfg.model.text_encoder = side.get("text_encoder", cfg.model.text_encoder)
    cfg.model.autoencoder = side.get("autoencoder", cfg.model.autoencoder)
    cfg.model.max_length = side.get("max_length", cfg.model.max_length)
    cfg.flow.shift = side.get("flow_shift", cfg.flow.shift)
    dit = LinearDiT(cfg.model.dit)
    W.load_diffusers_weights(dit, src.spec, lora=str(Path(folder) / LORA_FILE))
    return dit.eval(), cfg


def sidecar(cfg: TrainConfig, lora: bool = False) -> dict:
    out = {"text_encoder": cfg.model.text_encoder, "autoencoder": cfg.model.autoencoder,
           "max_length": cfg.model.max_length, "flow_shift": cfg.flow.shift}
    if lora:
        out.update(base=cfg.init_from, lora_rank=cfg.lora.rank, lora_targets=list(cfg.lora.targets))
    return out


def trainable(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def explicit_keys(overrides: list[str], config_file: str | None, preset: str | None, argv: list[str]) -> set[str]:
    """The dotted config keys the user chose: --set keys, the YAML file's leaves, and model.dit.* when --preset
    was given on the command line (a preset's DiT is a choice of architecture)."""
    import yaml

    from sana_core.config import parse_override
    keys = {parse_override(o)[0] for o in overrides}
    if config_file:
        def leaves(d: dict, pre: str = "") -> None:
            for k, v in d.items():
                if isinstance(v, dict):
                    leaves(v, f"{pre}{k}.")
                else:
                    keys.add(f"{pre}{k}")
        leaves(yaml.safe_load(Path(config_file).read_text()) or {})
    if preset and any(a == "--preset" or a.startswith("--preset=") for a in argv):
        keys |= {f"model.dit.{f.name}" for f in dataclasses.fields(DiTConfig)}
    # a whole model.dit / model mapping set at once counts for every field under it
    for k in list(keys):
        if k in ("model", "model.dit"):
            keys |= {f"model.dit.{f.name}" for f in dataclasses.fields(DiTConfig)}
    return keys
