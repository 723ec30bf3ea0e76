"""Shards, manifest and rejected records, written on the workers so that every input lands exactly once.

Layout (docs/data_contract.md):
  shards/shard-ID.tar                 WebDataset shard
  manifest.parquet/part-ID.parquet    its manifest rows: the shard's commit record
  rejected.parquet/part-ID.parquet    rejected rows of one batch (a commit record of its own)

ID is the first 16 hex digits of sha256 over the batch's sorted keys: a retried task (same batch) computes the
same ID and finds its work committed, so it can never write a duplicate or clobber a committed shard, and two
batches of one run never share an ID (their keys differ).

Commit protocol for a shard: write `.shard-ID.tar.<nonce>.tmp` and `.part-ID.parquet.<nonce>.tmp`, fsync both,
rename the shard into place, then rename the part (the commit point), fsync the folders. A kill at any moment
leaves tmp files or a complete shard without its part (uncommitted); `sweep` deletes both at the start and end
of a run, and their samples are redone. Visible shards are always complete. What is done is the set of keys in
the two part folders (curation.keyindex reads them on the cluster).
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import re
import time
import uuid
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

MANIFEST_SCHEMA = pa.schema([
    ("key", pa.string()), ("shard", pa.string()), ("source", pa.string()), ("member", pa.string()),
    ("sha256", pa.string()),
    ("width", pa.int32()), ("height", pa.int32()), ("bucket_h", pa.int32()), ("bucket_w", pa.int32()),
    ("mode", pa.string()),  # the input's mode and conversion flags (curation.validate.Decoded.mode)
    ("vlms", pa.list_(pa.string())), ("captions", pa.list_(pa.string())), ("clip_scores", pa.list_(pa.float32())),
])
REJECTED_SCHEMA = pa.schema([("key", pa.string()), ("source", pa.string()), ("member", pa.string()),
                             ("reason", pa.string()), ("detail", pa.string())])

SHARDS, MANIFEST, REJECTED = "shards", "manifest.parquet", "rejected.parquet"
_PART = re.compile(r"^part-([0-9a-f]{16})\.parquet$")
_SHARD = re.compile(r"^shard-([0-9a-f]{16})\.tar$")
EMPTY_ID = "0" * 16  # the empty part that keeps a folder with nothing in it readable as a dataset
# Test hooks (tests/test_curation.py), so that a kill lands at a known point rather than by timing:
# HOLD_ENV=DIR: a writer holds before renaming its first shard until DIR/released exists, after writing its pid to
# DIR/pid.PID (the test SIGKILLs it mid-shard). STALL_ENV=DIR: a writer holds right after committing a shard, after
# writing DIR/committed.PID (the test SIGKILLs the whole run with some, never all, samples committed).
HOLD_ENV = "SANA_TEST_HOLD_WRITE"
STALL_ENV = "SANA_TEST_STALL_AFTER_COMMIT"


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _tmp(path: Path) -> Path:
    # A nonce per attempt: a retried task never writes into a tmp file a dead attempt left open.
    return path.parent / f".{path.name}.{uuid.uuid4().hex[:8]}.tmp"


def _write_parquet_tmp(table: pa.Table, tmp: Path) -> None:
    with open(tmp, "wb") as f:
        pq.write_table(table, f)
        f.flush()
        os.fsync(f.fileno())


def atomic_write_bytes(path: Path, data: bytes) -> None:
    tmp = _tmp(path)
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def atomic_write_parquet(table: pa.Table, path: Path) -> None:
    tmp = _tmp(path)
    _write_parquet_tmp(table, tmp)
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def _npy_bytes(a: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, a, allow_pickle=False)
    return buf.getvalue()


def batch_id(keys: list[str]) -> str:
    return hashlib.sha256("\n".join(sorted(keys)).encode()).hexdigest()[:16]


def make_dirs(out: Path) -> None:
    for d in (SHARDS, MANIFEST, REJECTED):
        (out / d).mkdir(parents=True, exist_ok=True)


class Superseded(Exception):
    """This writer belongs to an attempt whose driver died; a newer attempt owns the output now."""


def check_fence(out: Path, attempt: int | None) -> None:
    """The fencing token of a commit: run.json's `attempts`. When a driver dies, its in-flight tasks can still
    run on the workers for a while; once the next attempt has started (it bumps `attempts` before it reads what
    is committed), they must not commit what that attempt is about to redo."""
    if attempt is None:
        return
    try:
        current = json.loads((out / "run.json").read_text()).get("attempts")
    except (OSError, ValueError):
        return
    if current != attempt:
        raise Superseded(f"attempt {attempt} of {out} was superseded by attempt {current}")


def commit_rejected(out: Path, rows: list[dict[str, str]], attempt: int | None = None) -> bool:
    """Commit rejected rows (one part); False when a retried task finds them committed already."""
    if not rows:
        return False
    path = out / REJECTED / f"part-{batch_id([r['key'] for r in rows])}.parquet"
    if path.exists():
        return False
    tmp = _tmp(path)
    _write_parquet_tmp(pa.Table.from_pylist(rows, schema=REJECTED_SCHEMA), tmp)
    try:
        check_fence(out, attempt)
    except Superseded:
        tmp.unlink()
        raise
    os.replace(tmp, path)  # the commit point
    _fsync_dir(path.parent)
    return True


def _sample_json(s: dict[str, Any], vlms: list[str], clip_model: str) -> dict[str, Any]:
    lat = s["latent"]
    return {"key": s["key"], "source": s["source"], "member": s.get("member", ""), "sha256": s["sha256"],
            "width": int(s["width"]), "height": int(s["height"]), "mode": s.get("mode", ""),
            "bucket": [int(s["bucket_h"]), int(s["bucket_w"])],
            "latent_shape": [int(d) for d in lat.shape],
            "latent_scaling_factor": float(s["latent_scaling_factor"]),
            "captions": {v: s["captions"][v] for v in vlms},
            "clip_scores": {v: float(s["clip_scores"][v]) for v in vlms},
            "clip_model": clip_model}


def _hold_for_test(env: str = HOLD_ENV, mark: str = "pid") -> None:
    hold = os.environ.get(env)
    if not hold or (Path(hold) / "released").exists():
        return
    (Path(hold) / f"{mark}.{os.getpid()}").write_text(str(os.getpid()))
    t0 = time.time()
    while not (Path(hold) / "released").exists() and time.time() - t0 < 300:
        time.sleep(0.05)


def commit_shard(out: Path, samples: list[dict[str, Any]], vlms: list[str], clip_model: str,
                 attempt: int | None = None) -> str | None:
    """Write one shard and commit it with its manifest part; returns its name, None when already committed.

    A sample: key, source, member, sha256, width, height, mode, bucket_h, bucket_w, captions {vlm: str},
    clip_scores {vlm: float}, latent (float16 C,h,w), latent_scaling_factor, optional jpg bytes."""
    if not samples:
        return None
    sid = batch_id([s["key"] for s in samples])
    name = f"shard-{sid}.tar"
    part = out / MANIFEST / f"part-{sid}.parquet"
    if part.exists():
        return None
    import webdataset as wds  # here, not at the top: it imports torch, which the listing and resume tasks
    # (curation.writer's part readers, on fresh worker processes) must not pay for

    shard = out / SHARDS / name
    tmp_shard, tmp_part = _tmp(shard), _tmp(part)
    rows = []
    with open(tmp_shard, "wb") as f:
        tw = wds.TarWriter(f, encoder=False, mtime=0.0)
        for s in samples:
            member = {"__key__": s["key"], "json": json.dumps(_sample_json(s, vlms, clip_model)).encode("utf-8"),
                      "latent.npy": _npy_bytes(np.ascontiguousarray(s["latent"], dtype=np.float16))}
            if s.get("jpg"):
                member["jpg"] = bytes(s["jpg"])
            tw.write(member)
            rows.append(dict(key=s["key"], shard=name, source=s["source"], member=s.get("member", ""),
                             sha256=s["sha256"], width=int(s["width"]), height=int(s["height"]),
                             bucket_h=int(s["bucket_h"]), bucket_w=int(s["bucket_w"]), mode=s.get("mode", ""),
                             vlms=list(vlms), captions=[s["captions"][v] for v in vlms],
                             clip_scores=[float(s["clip_scores"][v]) for v in vlms]))
        tw.close()
        f.flush()
        os.fsync(f.fileno())
    _write_parquet_tmp(pa.Table.from_pylist(rows, schema=MANIFEST_SCHEMA), tmp_part)
    _hold_for_test()
    try:
        check_fence(out, attempt)
    except Superseded:
        tmp_shard.unlink()
        tmp_part.unlink()
        raise
    os.replace(tmp_shard, shard)
    _fsync_dir(shard.parent)
    os.replace(tmp_part, part)  # the commit point
    _fsync_dir(part.parent)
    _hold_for_test(STALL_ENV, "committed")
    return name


def sweep(out: Path) -> dict[str, int]:
    """Delete what no commit record covers: tmp files, shards without a part, parts whose shard is gone
    (deleted by hand: their samples are redone). Run when no writer is running (start and end of a job)."""
    counts = {"tmp": 0, "uncommitted_shards": 0, "parts_without_shard": 0}
    make_dirs(out)
    for d in (SHARDS, MANIFEST, REJECTED):
        with os.scandir(out / d) as it:
            for e in it:
                if e.name.startswith(".") and e.name.endswith(".tmp"):
                    os.unlink(e.path)
                    counts["tmp"] += 1
    with os.scandir(out / MANIFEST) as it:
        parts = {m.group(1) for e in it if (m := _PART.match(e.name))}
    with os.scandir(out / SHARDS) as it:
        shards = {m.group(1): e.path for e in it if (m := _SHARD.match(e.name))}
    for sid, path in shards.items():
        if sid not in parts:
            os.unlink(path)
            counts["uncommitted_shards"] += 1
    for sid in parts - set(shards) - {EMPTY_ID}:
        os.unlink(out / MANIFEST / f"part-{sid}.parquet")
        counts["parts_without_shard"] += 1
    for d in (SHARDS, MANIFEST, REJECTED):
        _fsync_dir(out / d)
    return counts


def part_files(folder: Path) -> list[Path]:
    if not folder.is_dir():
        return []
    with os.scandir(folder) as it:
        return sorted(Path(e.path) for e in it if _PART.match(e.name))


def count_rows(folder: Path) -> int:
    """Rows in a folder of parts, from the Parquet footers alone."""
    return sum(pq.ParquetFile(p).metadata.num_rows for p in part_files(folder))


def finish(out: Path) -> tuple[int, int]:
    """Make both folders readable as datasets even when empty; returns (accepted, rejected) on disk."""
    for d, schema in ((MANIFEST, MANIFEST_SCHEMA), (REJECTED, REJECTED_SCHEMA)):
        if not part_files(out / d):
            atomic_write_parquet(schema.empty_table(), out / d / f"part-{EMPTY_ID}.parquet")
    return count_rows(out / MANIFEST), count_rows(out / REJECTED)


PREFIXES = "0123456789abcdef"  # one listing task per leading hex digit of the part IDs


def _map_parts(batch, folders: list[str], fn, columns: list[str], rows_per_call: int = 200_000):
    """One task: the parts of `folders` whose ID starts with this batch's prefixes, read with pyarrow in groups of
    about rows_per_call rows, each group through fn (pa.Table -> pa.Table)."""
    for prefix in batch.column("prefix").to_pylist():
        files = []
        for folder in folders:
            with os.scandir(folder) as it:
                files += sorted(e.path for e in it if e.name.startswith(f"part-{prefix}") and _PART.match(e.name))
        group: list[pa.Table] = []
        rows = 0
        for f in files:
            t = pq.read_table(f, columns=columns)
            group.append(t)
            rows += t.num_rows
            if rows >= rows_per_call:
                yield fn(pa.concat_tables(group))
                group, rows = [], 0
        if group:
            yield fn(pa.concat_tables(group))


def parts_dataset(folders: Path | list[Path], fn, columns: list[str]):
    """fn over every part of one folder or several (their `columns` alike), as a Ray Dataset of its outputs, listed
    and read by tasks on the workers. (Ray Data's read_parquet lists files in one ListFiles task that stats each
    path: 36 s for 1,000 parts on a loaded 2-core machine; here the driver only names 16 ID prefixes, and one
    task reads a prefix's parts of every folder, so that a resume starts 16 worker tasks, not 16 a folder.)"""
    import ray.data

    folders = [str(f) for f in (folders if isinstance(folders, (list, tuple)) else [folders])]
    units = ray.data.from_items([{"prefix": p} for p in PREFIXES], override_num_blocks=len(PREFIXES))
    # A whole CPU per task: these run before the actor pools start (resume) or after they are gone (summary), and
    # at 0.25 CPU a 4-CPU node started 16 worker processes at once, whose start-up (Ray + pyarrow imports) cost
    # more than the reads: the 10^6-input no-op resume's execution took 36 s instead of 18.
    return units.map_batches(_map_parts, batch_size=1, batch_format="pyarrow", num_cpus=1,
                             fn_kwargs=dict(folders=folders, fn=fn, columns=columns))


def read_table(out: Path, which: str = MANIFEST, columns: list[str] | None = None) -> pa.Table:
    """The whole manifest or rejected table (a single file or a folder of parts). Small outputs only:
    jobs.report and the summary sample or aggregate instead."""
    return pq.read_table(out / which, columns=columns)
