"""The run folder (--output): one job at a time, never two runs mixed, resumed only with a compatible config.

- `claim()` takes the folder's exclusive lock (sana_core.lock; rank 0 only, the verdict shared with every rank)
  and refuses a folder that already holds a run unless the job resumes it (--resume) or moves it aside
  (--new-output: every file goes to a sibling RUN.old-YYYYmmdd-HHMMSS, said in one line).
- `compare_on_resume()` checks the new config against the checkpoint's: fields that change the model, the
  optimizer's state layout or the data order are refused in one line naming each; the others (learning rate
  and schedule, max_steps, logging, checkpoint cadence, loader workers, distribution) are applied and each
  change printed as "changed on resume: optim.lr 0.001 -> 0.0005".
- `public_config()` is the config as every output file holds it: secrets redacted (sana_core.secrets).
"""
from __future__ import annotations

import json
import os
import time
from pathlib import Path

from sana_core.config import to_dict
from sana_core.errors import SanaError
from sana_core.lock import LOCK_NAME, OutputLock
from sana_core.secrets import redact
from training import checkpoint as ckpt
from training import distributed as D

# Config fields (dotted, or a prefix ending in ".") that may change when a run is resumed: they act on steps
# still to come and leave the checkpoint's tensors, the optimizer state's layout and the data order as they
# are. Everything else (model.*, lora.*, init_from, optim.name, ema.enabled, data order fields, caption.*,
# flow.*, seeds) is refused: a resumed run with them changed is a different run.
RESUME_SAFE = ("optim.lr", "optim.betas", "optim.eps", "optim.weight_decay", "optim.grad_clip", "optim.warmup_steps",
               "optim.schedule", "optim.min_lr_ratio", "optim.grad_accum_steps", "max_steps", "track.",
               "checkpoint.", "on_nonfinite", "precision", "ema.decay", "dist.", "data.num_workers",
               "data.pin_memory", "data.on_error", "data.read_retries", "data.retry_wait",
               "model.gradient_checkpointing", "model.text_cache", "model.cuda_graphs", "model.caption_bucket")
RUN_FILES = ("checkpoints", "metrics.jsonl", "summary.json")


def public_config(cfg) -> dict:
    """The config for config.yaml, meta.json, wandb: JSON types, secrets redacted."""
    return json.loads(json.dumps(redact(to_dict(cfg))))


def _used(run_dir: Path) -> str | None:
    found = ckpt.list_checkpoints(run_dir / "checkpoints")
    if found:
        return f"checkpoints up to {found[-1].name}"
    left = [n for n in RUN_FILES[1:] if (run_dir / n).exists()]
    return f"{', '.join(left)} of an earlier run" if left else None


def _move_aside(run_dir: Path) -> Path:
    dest = run_dir.with_name(f"{run_dir.name}.old-{time.strftime('%Y%m%d-%H%M%S')}")
    n = 0
    while dest.exists():
        n += 1
        dest = dest.with_name(f"{run_dir.name}.old-{time.strftime('%Y%m%d-%H%M%S')}-{n}")
    dest.mkdir()
    for p in run_dir.iterdir():
        # The lock (and its takeover side file) stays with the folder; so does Ray Train's own storage folder,
        # which the Ray launcher has already opened for this job.
        if not p.name.startswith(LOCK_NAME) and p.name != "ray":
            os.replace(p, dest / p.name)
    return dest


def _claim_main(run_dir: Path, resume: bool, new_output: bool) -> OutputLock:
    lock = OutputLock(run_dir, what="training run").acquire()
    try:
        if lock.took_over:
            print(f"took over the lock of {run_dir} from a job that is gone (pid {lock.took_over.get('pid')})")
        used = _used(run_dir)
        if used and new_output:
            print(f"--new-output: moved the earlier run in {run_dir} ({used}) to {_move_aside(run_dir)}")
        elif used and not resume:
            raise SanaError(f"{run_dir} already holds a training run ({used}); pass --resume to continue it, "
                            f"--new-output to move it aside and start over, or choose another --output")
    except BaseException:
        lock.release()
        raise
    return lock


def claim(run_dir: Path, resume: bool, new_output: bool, info: D.DistInfo) -> OutputLock | None:
    """Lock the run folder and check it may be used (see the module docstring); every rank gets the same
    outcome, so a refusal on rank 0 is the same one line on all ranks instead of a hang at the next barrier."""
    if resume and new_output:
        raise SanaError("--resume continues the run in --output, --new-output moves it aside: pass one of them")
    lock, error = None, None
    if info.is_main:
        try:
            lock = _claim_main(run_dir, resume, new_output)
        except SanaError as e:
            error = str(e)
        except OSError as e:  # e.g. no permission to create the folder or move the old run
            error = f"{run_dir}: {e.strerror or e} ({e.filename or ''})"
    errors = [e for e in D.gather_objects(error, info) if e]
    if errors:
        if lock is not None:
            lock.release()
        raise SanaError(errors[0])
    return lock


def trim_metrics(run_dir: Path, step: int) -> None:
    """Drop metrics.jsonl records after `step` (written by a run that died after its last checkpoint), so a
    resumed run's records continue the saved ones instead of repeating steps."""
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return
    kept = []
    for line in path.read_text().splitlines():
        try:
            rec = json.loads(line)
        except ValueError:
            continue  # a line cut short by the crash
        if isinstance(rec, dict) and isinstance(rec.get("step"), int) and rec["step"] <= step:
            kept.append(line)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(ln + "\n" for ln in kept))
    os.replace(tmp, path)


def _flat(d, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v:
            out.update(_flat(v, key + "."))
        else:
            out[key] = v
    return out


def _safe(key: str) -> bool:
    return any(key == s or (s.endswith(".") and key.startswith(s)) for s in RESUME_SAFE)


def _show(v) -> str:
    return f"{v:g}" if isinstance(v, float) else json.dumps(v) if isinstance(v, (list, dict)) else str(v)


def compare_on_resume(checkpoint: Path, cfg) -> list[str]:
    """The safe changes from the checkpoint's config to `cfg`, as "key old -> new"; SanaError (one line naming
    every field) for any other change. Fields only one side has (written by another version) are skipped."""
    try:
        saved = json.loads((checkpoint / "meta.json").read_text()).get("config")
    except (OSError, ValueError) as e:
        raise SanaError(f"{checkpoint}/meta.json is unreadable ({e})") from None
    if not isinstance(saved, dict):
        return []
    old, new = _flat(saved), _flat(public_config(cfg))
    changed = [(k, old[k], new[k]) for k in new if k in old and old[k] != new[k]]
    refused = [f"{k} {_show(a)} -> {_show(b)}" for k, a, b in changed if not _safe(k)]
    if refused:
        raise SanaError(f"--resume: {checkpoint.parent.parent} was trained with a different model or data layout: "
                        f"{', '.join(refused)}; resume with the saved values, or start a new run (--new-output or "
                        f"another --output)")
    return [f"{k} {_show(a)} -> {_show(b)}" for k, a, b in changed]
