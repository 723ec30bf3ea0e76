"""Sharded checkpoints with torch.distributed.checkpoint (DCP), written atomically, last K kept.

    RUN/checkpoints/step-00000100/      model, EMA and optimizer (DCP shards + .metadata)
                                        extra-rank{r}.pt: scheduler, step, RNG states, data position
                                        meta.json: step and the run's config (for jobs.sample)
Each is written as .tmp-step-XXXXXXXX and renamed when complete, so a crash never leaves a half checkpoint
under a real name. DCP reshards on load: a checkpoint from N ranks loads on M ranks, DDP or FSDP2.
"""
from __future__ import annotations

import json
import os
import random
import shutil
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_state_dict

from sana_core.errors import SanaError
from training.distributed import DistInfo, barrier

PREFIX = "step-"
# One process without a process group is a supported DCP mode, not a problem worth a warning.
warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized")


def list_checkpoints(ckpt_dir: Path) -> list[Path]:
    if not ckpt_dir.is_dir():
        return []
    return sorted(p for p in ckpt_dir.iterdir() if p.is_dir() and p.name.startswith(PREFIX)
                  and (p / "meta.json").is_file())


def latest(ckpt_dir: Path) -> Path | None:
    found = list_checkpoints(ckpt_dir)
    return found[-1] if found else None


def rng_state() -> dict:
    st = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        st["cuda"] = torch.cuda.get_rng_state_all()
    return st


def set_rng_state(st: dict) -> None:
    random.setstate(st["python"])
    np.random.set_state(st["numpy"])
    torch.set_rng_state(st["torch"])
    if "cuda" in st and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(st["cuda"])


def _frozen(model) -> bool:
    return any(not p.requires_grad for p in model.parameters())


def _app_state(model, optimizer, ema) -> dict:
    # Frozen parameters (a LoRA run's base) are not saved: they come from the run's init_from.
    msd, osd = get_state_dict(model, optimizer, options=StateDictOptions(ignore_frozen_params=True))
    state = {"model": msd, "optim": osd}
    if ema is not None:
        state["ema"] = ema.state_dict()
    return state


def save(ckpt_dir: Path, step: int, model, optimizer, ema, extra: dict, meta: dict, info: DistInfo,
         keep_last: int) -> Path:
    final = ckpt_dir / f"{PREFIX}{step:08d}"
    tmp = ckpt_dir / f".tmp-{PREFIX}{step:08d}"
    if info.is_main:
        ckpt_dir.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
    barrier(info)
    dcp.save(_app_state(model, optimizer, ema), checkpoint_id=str(tmp))
    torch.save(extra, tmp / f"extra-rank{info.rank}.pt")
    barrier(info)
    if info.is_main:
        (tmp / "meta.json").write_text(json.dumps({"step": step, "world": info.world, **meta}, indent=1))
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        for old in list_checkpoints(ckpt_dir)[:-keep_last] if keep_last > 0 else []:
            shutil.rmtree(old, ignore_errors=True)
    barrier(info)
    return final


def load(path: Path, model, optimizer, ema, info: DistInfo) -> dict:
    """Load model/EMA/optimizer in place; return this rank's extra state (rank 0's if the world changed)."""
    if not (path / "meta.json").is_file():
        raise SanaError(f"{path} is not a complete checkpoint (no meta.json)")
    state = _app_state(model, optimizer, ema)
    dcp.load(state, checkpoint_id=str(path))
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"],
                   options=StateDictOptions(strict=not _frozen(model), ignore_frozen_params=True))
    if ema is not None and "ema" in state:
        ema.load_state_dict(state["ema"])
    f = path / f"extra-rank{info.rank}.pt"
    if not f.is_file():
        f = path / "extra-rank0.pt"
    return torch.load(f, weights_only=False)


def load_weights_for_inference(path: Path, model: torch.nn.Module, prefer_ema: bool = True) -> str:
    """Load EMA (or model) weights of a checkpoint into an unwrapped model on one process; return which."""
    from torch.distributed.checkpoint import FileSystemReader
    md = FileSystemReader(str(path)).read_metadata()
    keys = set(md.state_dict_metadata)
    which = "ema" if prefer_ema and any(k.startswith("ema.") for k in keys) else "model"
    frozen = {n for n, p in model.named_parameters() if not p.requires_grad}  # not in the checkpoint (LoRA base)
    sd = {k: v.detach().clone() for k, v in model.state_dict().items() if k not in frozen}
    if which == "ema":
        params = {n for n, p in model.named_parameters() if p.requires_grad}
        state = {"ema": {k: v for k, v in sd.items() if k in params}}
        dcp.load(state, checkpoint_id=str(path))
        sd.update(state["ema"])
    else:
        state = {"model": sd}
        dcp.load(state, checkpoint_id=str(path))
        sd = state["model"]
    model.load_state_dict(sd, strict=not frozen)
    return which
