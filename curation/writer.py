"""Shards, manifest and rejected records, written so that every input lands exactly once.

Layout (docs/data_contract.md) plus the resume bookkeeping in OUTPUT/parts/:
  parts/part-NNNNNN.parquet      manifest rows of shards/shard-NNNNNN.tar (the shard's commit record)
  parts/rejected-NNNNNN.parquet  rejected rows, one file per driver batch that had any

Commit protocol for a shard: write `.shard-N.tar.tmp` and `.part-N.parquet.tmp`, fsync both, rename the
shard into place, then rename the part (the commit point), fsync the folders. A kill at any moment leaves:
tmp files (deleted on restart), or a complete shard without its part (an uncommitted shard: deleted on
restart, its samples redone). Visible shards are always complete. The done set of a restart is the keys
in committed parts and rejected parts; manifest.parquet / rejected.parquet are consolidated from the parts.
"""
from __future__ import annotations

import io
import json
import os
import re
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import webdataset as wds

MANIFEST_SCHEMA = pa.schema([
    ("key", pa.string()), ("shard", pa.string()), ("source", pa.string()), ("sha256", pa.string()),
    ("width", pa.int32()), ("height", pa.int32()), ("bucket_h", pa.int32()), ("bucket_w", pa.int32()),
    ("mode", pa.string()),  # the input's mode and conversion flags (curation.validate.Decoded.mode)
    ("vlms", pa.list_(pa.string())), ("captions", pa.list_(pa.string())), ("clip_scores", pa.list_(pa.float32())),
])
REJECTED_SCHEMA = pa.schema([("key", pa.string()), ("source", pa.string()), ("reason", pa.string()),
                             ("detail", pa.string())])

_PART = re.compile(r"^part-(\d{6})\.parquet$")
_REJ = re.compile(r"^rejected-(\d{6})\.parquet$")
_SHARD = re.compile(r"^shard-(\d{6})\.tar$")


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_parquet_tmp(table: pa.Table, tmp: Path) -> None:
    with open(tmp, "wb") as f:
        pq.write_table(table, f)
        f.flush()
        os.fsync(f.fileno())


def atomic_write_bytes(path: Path, data: bytes) -> None:
    tmp = path.parent / f".{path.name}.tmp"
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def atomic_write_parquet(table: pa.Table, path: Path) -> None:
    tmp = path.parent / f".{path.name}.tmp"
    _write_parquet_tmp(table, tmp)
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def _npy_bytes(a: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, a, allow_pickle=False)
    return buf.getvalue()


class ShardWriter:
    """Driver-side writer. `add` accepted samples, `reject` rejected ones; `close` flushes and consolidates."""

    def __init__(self, output: str | Path, samples_per_shard: int, vlms: list[str], clip_model: str):
        self.out = Path(output)
        self.shards, self.parts = self.out / "shards", self.out / "parts"
        self.shards.mkdir(parents=True, exist_ok=True)
        self.parts.mkdir(parents=True, exist_ok=True)
        self.n, self.vlms, self.clip_model = samples_per_shard, list(vlms), clip_model
        self.buffer: list[dict[str, Any]] = []
        self.removed_orphans = 0
        self.done_keys, self.next_shard, self.next_rej = self._recover()

    # ------------------------------------------------------------------ restart
    def _recover(self) -> tuple[set[str], int, int]:
        for d in (self.shards, self.parts):
            for p in d.iterdir():
                if p.name.startswith(".") and p.name.endswith(".tmp"):
                    p.unlink()
        parts = {int(m.group(1)): p for p in self.parts.iterdir() if (m := _PART.match(p.name))}
        shards = {int(m.group(1)): p for p in self.shards.iterdir() if (m := _SHARD.match(p.name))}
        for i, p in shards.items():
            if i not in parts:  # renamed but never committed: its samples are redone
                p.unlink()
                self.removed_orphans += 1
        for i, p in list(parts.items()):
            if i not in shards:  # a committed part whose shard vanished (deleted by hand): redo its samples
                p.unlink()
                del parts[i]
        done: set[str] = set()
        for p in parts.values():
            done.update(pq.read_table(p, columns=["key"]).column("key").to_pylist())
        rej = {int(m.group(1)): p for p in self.parts.iterdir() if (m := _REJ.match(p.name))}
        for p in rej.values():
            done.update(pq.read_table(p, columns=["key"]).column("key").to_pylist())
        _fsync_dir(self.shards)
        return done, max(parts, default=-1) + 1, max(rej, default=-1) + 1

    # ------------------------------------------------------------------ writing
    def reject(self, rows: list[dict[str, str]]) -> None:
        """Commit rejected rows at once (one parquet file per call)."""
        if not rows:
            return
        table = pa.Table.from_pylist(rows, schema=REJECTED_SCHEMA)
        atomic_write_parquet(table, self.parts / f"rejected-{self.next_rej:06d}.parquet")
        self.next_rej += 1
        self.done_keys.update(r["key"] for r in rows)

    def add(self, sample: dict[str, Any]) -> None:
        """One accepted sample: key, source, sha256, width, height, bucket_h, bucket_w, captions {vlm: str},
        clip_scores {vlm: float}, latent (float16 C,h,w), latent_scaling_factor, optional jpg bytes."""
        self.buffer.append(sample)
        if len(self.buffer) >= self.n:
            self.flush()

    def flush(self) -> None:
        if not self.buffer:
            return
        idx = self.next_shard
        name = f"shard-{idx:06d}.tar"
        tmp_shard = self.shards / f".{name}.tmp"
        tmp_part = self.parts / f".part-{idx:06d}.parquet.tmp"
        rows = []
        with open(tmp_shard, "wb") as f:
            tw = wds.TarWriter(f, encoder=False, mtime=0.0)
            for s in self.buffer:
                meta = self._json(s)
                member = {"__key__": s["key"], "json": json.dumps(meta).encode("utf-8"),
                          "latent.npy": _npy_bytes(np.ascontiguousarray(s["latent"], dtype=np.float16))}
                if s.get("jpg"):
                    member["jpg"] = bytes(s["jpg"])
                tw.write(member)
                rows.append(dict(key=s["key"], shard=name, source=s["source"], sha256=s["sha256"],
                                 width=int(s["width"]), height=int(s["height"]), bucket_h=int(s["bucket_h"]),
                                 bucket_w=int(s["bucket_w"]), mode=s.get("mode", ""), vlms=self.vlms,
                                 captions=[s["captions"][v] for v in self.vlms],
                                 clip_scores=[float(s["clip_scores"][v]) for v in self.vlms]))
            tw.close()
            f.flush()
            os.fsync(f.fileno())
        _write_parquet_tmp(pa.Table.from_pylist(rows, schema=MANIFEST_SCHEMA), tmp_part)
        os.replace(tmp_shard, self.shards / name)
        _fsync_dir(self.shards)
        os.replace(tmp_part, self.parts / f"part-{idx:06d}.parquet")  # the commit point
        _fsync_dir(self.parts)
        self.done_keys.update(r["key"] for r in rows)
        self.next_shard += 1
        self.buffer = []

    def _json(self, s: dict[str, Any]) -> dict[str, Any]:
        lat = s["latent"]
        return {"key": s["key"], "source": s["source"], "sha256": s["sha256"], "width": int(s["width"]),
                "height": int(s["height"]), "mode": s.get("mode", ""),
                "bucket": [int(s["bucket_h"]), int(s["bucket_w"])],
                "latent_shape": [int(d) for d in lat.shape],
                "latent_scaling_factor": float(s["latent_scaling_factor"]),
                "captions": {v: s["captions"][v] for v in self.vlms},
                "clip_scores": {v: float(s["clip_scores"][v]) for v in self.vlms},
                "clip_model": self.clip_model}

    # ------------------------------------------------------------------ the end
    def close(self) -> tuple[int, int]:
        """Flush the last (partial) shard and consolidate; returns (accepted, rejected) totals on disk."""
        self.flush()
        return consolidate(self.out)


def consolidate(out: Path) -> tuple[int, int]:
    parts = sorted(p for p in (out / "parts").iterdir() if _PART.match(p.name))
    rej = sorted(p for p in (out / "parts").iterdir() if _REJ.match(p.name))
    manifest = pa.concat_tables([pq.read_table(p, schema=MANIFEST_SCHEMA) for p in parts]) if parts \
        else MANIFEST_SCHEMA.empty_table()
    rejected = pa.concat_tables([pq.read_table(p, schema=REJECTED_SCHEMA) for p in rej]) if rej \
        else REJECTED_SCHEMA.empty_table()
    atomic_write_parquet(manifest, out / "manifest.parquet")
    atomic_write_parquet(rejected, out / "rejected.parquet")
    return manifest.num_rows, rejected.num_rows
