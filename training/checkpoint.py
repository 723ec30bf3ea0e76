"""Sharded checkpoints with torch.distributed.checkpoint (DCP), written atomically, last K kept.

    RUN/checkpoints/step-00000100/      model, EMA and optimizer (DCP shards + .metadata)
                                        extra-rank{r}.json + .safetensors: scheduler, step, RNG states,
                                            data position (JSON, with every tensor and array in safetensors)
                                        meta.json: step and the run's config (for jobs.sample)
Each is written as .tmp-step-XXXXXXXX and renamed when complete, so a crash never leaves a half checkpoint
under a real name. DCP reshards on load: a checkpoint from N ranks loads on M ranks, DDP or FSDP2.

The extra state never goes through pickle (torch.load(weights_only=False) would run any code a crafted file
holds): JSON for the structure, safetensors for the tensors, and only the tags below are decoded. DCP itself
reads its `.metadata` file with pickle, so a checkpoint folder as a whole is still trusted input.
"""
from __future__ import annotations

import json
import os
import random
import shutil
import warnings
from pathlib import Path

import numpy as np
import safetensors.torch
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


# -- extra state: JSON + safetensors ---------------------------------------------------------------------------
# Tags for what JSON has no type for; anything else in the extra state is refused when saving.
_TAGS = ("__tuple__", "__dict__", "__tensor__", "__ndarray__")
# numpy dtypes stored widened (torch / safetensors lack them); restored exactly from the recorded dtype.
_WIDEN = {"uint16": np.int32, "uint32": np.int64, "uint64": np.int64}


def _encode(obj, tensors: dict, where: str):
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    if isinstance(obj, (np.integer, np.floating, np.bool_)):
        return obj.item()
    if isinstance(obj, torch.Tensor):
        name = f"t{len(tensors)}"
        tensors[name] = obj.detach().cpu().contiguous()
        return {"__tensor__": name}
    if isinstance(obj, np.ndarray):
        name = f"t{len(tensors)}"
        arr = obj.astype(_WIDEN.get(obj.dtype.name, obj.dtype))
        tensors[name] = torch.from_numpy(np.ascontiguousarray(arr))
        return {"__ndarray__": name, "dtype": obj.dtype.name}
    if isinstance(obj, tuple):
        return {"__tuple__": [_encode(v, tensors, f"{where}[{i}]") for i, v in enumerate(obj)]}
    if isinstance(obj, list):
        return [_encode(v, tensors, f"{where}[{i}]") for i, v in enumerate(obj)]
    if isinstance(obj, dict):
        if all(isinstance(k, str) and k not in _TAGS for k in obj):
            return {k: _encode(v, tensors, f"{where}.{k}") for k, v in obj.items()}
        return {"__dict__": [[_encode(k, tensors, where), _encode(v, tensors, f"{where}.{k}")]
                             for k, v in obj.items()]}
    raise TypeError(f"checkpoint extra state {where}: cannot store a {type(obj).__name__} (JSON types, tuples, "
                    f"tensors and numpy arrays only)")


def _decode(obj, tensors: dict, where: str):
    if isinstance(obj, list):
        return [_decode(v, tensors, where) for v in obj]
    if not isinstance(obj, dict):
        return obj
    tags = [k for k in obj if k in _TAGS]
    if not tags:
        return {k: _decode(v, tensors, f"{where}.{k}") for k, v in obj.items()}
    tag = tags[0]
    try:
        if tag == "__tuple__":
            return tuple(_decode(v, tensors, where) for v in obj[tag])
        if tag == "__dict__":
            return {_decode(k, tensors, where): _decode(v, tensors, where) for k, v in obj[tag]}
        t = tensors[obj[tag]]
        if tag == "__tensor__":
            return t
        return t.numpy().astype(np.dtype(obj["dtype"]))
    except (KeyError, TypeError, ValueError) as e:
        raise SanaError(f"checkpoint extra state {where}: malformed {tag} entry ({e})") from None


def save_extra(extra: dict, folder: Path, rank: int) -> None:
    tensors: dict[str, torch.Tensor] = {}
    tree = _encode(extra, tensors, "extra")
    safetensors.torch.save_file(tensors, str(folder / f"extra-rank{rank}.safetensors"))
    (folder / f"extra-rank{rank}.json").write_text(json.dumps(tree))


def load_extra(folder: Path, rank: int) -> dict:
    """This rank's extra state (rank 0's when the checkpoint has none for this rank: the world changed)."""
    if not (folder / f"extra-rank{rank}.json").is_file():
        rank = 0
    js, st = folder / f"extra-rank{rank}.json", folder / f"extra-rank{rank}.safetensors"
    if not js.is_file() or not st.is_file():
        old = folder / f"extra-rank{rank}.pt"
        if old.is_file():
            raise SanaError(f"{folder} holds its extra state as a pickle ({old.name}, written by an older version), "
                            f"which is not loaded: unpickling can run arbitrary code. Continue that run with the "
                            f"version that wrote it, or start a new run (--init-from can take its exported weights)")
        raise SanaError(f"{folder} is not a complete checkpoint: {js.name} or {st.name} is missing")
    try:
        tree = json.loads(js.read_text())
        tensors = safetensors.torch.load_file(str(st))
    except (ValueError, OSError, safetensors.SafetensorError) as e:
        raise SanaError(f"{folder}: extra state {js.name} / {st.name} is unreadable ({e})") from None
    out = _decode(tree, tensors, "extra")
    if not isinstance(out, dict):
        raise SanaError(f"{js}: extra state is not a mapping")
    return out


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
    save_extra(extra, tmp, info.rank)
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
    extra = load_extra(path, info.rank)  # first: refuses an unsafe checkpoint before reading anything else
    state = _app_state(model, optimizer, ema)
    try:
        dcp.load(state, checkpoint_id=str(path))
    except Exception as e:  # noqa: BLE001 - DCP wraps every per-rank failure in its own CheckpointException
        # Reached when the model differs in a way the config check before it cannot see (e.g. code changes).
        first = next((ln.strip() for ln in str(e).splitlines() if "Missing key" in ln or "Unexpected key" in ln
                      or "size mismatch" in ln), str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__)
        raise SanaError(f"{path} does not fit this model: {first[:300]}") from None
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"],
                   options=StateDictOptions(strict=not _frozen(model), ignore_frozen_params=True))
    if ema is not None and "ema" in state:
        ema.load_state_dict(state["ema"])
    return extra


def optimizer_hparams(opt: torch.optim.Optimizer) -> list[dict]:
    """The settings of each param group (all but the parameters) of an optimizer built from the config."""
    return [{k: v for k, v in g.items() if k != "params"} for g in opt.param_groups]


def reapply_hparams(opt: torch.optim.Optimizer, sched, fresh: list[dict]) -> None:
    """After loading a checkpoint, put back the settings of the optimizer built from the new config (`fresh`,
    from optimizer_hparams before the load): load_state_dict restores the saved param groups (lr, betas, weight
    decay) and the scheduler its saved base lrs, which would silently override a changed optim.lr. Moments and
    step counts stay the checkpoint's. The lr is recomputed as LambdaLR computes it (base x factor(step)), so an
    unchanged config gives the very same floats and resume stays exact."""
    for g, f in zip(opt.param_groups, fresh):
        g.update(f)
    sched.base_lrs = [g["initial_lr"] for g in opt.param_groups]
    for g, base, factor in zip(opt.param_groups, sched.base_lrs, sched.lr_lambdas):
        g["lr"] = base * factor(sched.last_epoch)
    sched._last_lr = [g["lr"] for g in opt.param_groups]


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
