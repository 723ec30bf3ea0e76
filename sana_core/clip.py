"""Load an open_clip model the same way for production tags and for the tiny zoo checkpoint.

    load_clip("ViT-L-14", "openai")                                  # hub download on a cluster
    load_clip(zoo.clip_model, zoo.clip_pretrained)                   # "sana-tiny-clip", <zoo>/clip/....safetensors
    load_clip("local-dir:/path/to/folder", None)                     # open_clip's own local-folder schema

A model name open_clip does not know is registered from the `<name>.json` model config that lies beside
the checkpoint file (the zoo writes it), then everything goes through
`open_clip.create_model_and_transforms` and `open_clip.get_tokenizer`.
"""
from __future__ import annotations

from pathlib import Path

from sana_core.errors import SanaError


def _register_from_checkpoint(model: str, pretrained: str) -> None:
    """Register `model` from `<model>.json` (an open_clip model config) beside the checkpoint file."""
    import open_clip

    cfg_path = Path(pretrained).parent / f"{model}.json"
    if not cfg_path.is_file():
        raise SanaError(f"CLIP model '{model}' is not an open_clip model name and {cfg_path} does not exist")
    open_clip.add_model_config(cfg_path)
    if model not in open_clip.list_models():
        raise SanaError(f"CLIP config {cfg_path} is not a valid open_clip model config "
                        "(needs embed_dim, vision_cfg, text_cfg)")


def load_clip(model: str, pretrained: str | None = None, device: str = "cpu"):
    """-> (model in eval mode, image preprocess transform, tokenizer). SanaError (one line) on bad names/paths."""
    import open_clip

    if model.startswith("local-dir:"):
        folder = Path(model.split(":", 1)[1])
        if not (folder / "open_clip_config.json").is_file():
            raise SanaError(f"CLIP folder {folder} does not exist or has no open_clip_config.json")
        pretrained = None
    else:
        known = model in open_clip.list_models()
        if pretrained and not open_clip.get_pretrained_cfg(model, pretrained):
            # not a tag: it must be a checkpoint file
            if not Path(pretrained).is_file():
                raise SanaError(f"CLIP checkpoint {pretrained} does not exist (and is not an open_clip "
                                f"pretrained tag for '{model}')")
            if not known:
                _register_from_checkpoint(model, pretrained)
        elif not known:
            raise SanaError(f"CLIP model '{model}' is not an open_clip model name (see open_clip.list_models())")
    try:
        clip, _, preprocess = open_clip.create_model_and_transforms(model, pretrained=pretrained or None,
                                                                   device=device)
    except (RuntimeError, FileNotFoundError, ValueError) as e:
        raise SanaError(f"cannot load CLIP model '{model}' pretrained={pretrained!r}: "
                        f"{str(e).splitlines()[0] if str(e) else type(e).__name__}") from e
    tokenizer = open_clip.get_tokenizer(model)
    return clip.eval(), preprocess, tokenizer
