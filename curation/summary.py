"""Counting what the job did, and the table printed at the end of a run.

Nothing here holds one entry per image on the driver: the write stage turns each batch into one row of counts
(`split_batch` + `batch_counts`), the driver adds those up (`Stats`), and the whole-output summary is a
map-reduce over the part folders with Ray Data (`output_summary`): each block becomes a few partial sums.
"""
from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from curation.stage import Batch, caption_column, clip_column


def _py(v: Any) -> Any:
    return v.item() if isinstance(v, np.generic) else v


def _str(v: Any) -> str:
    return "" if v is None else str(v)


def split_batch(batch: Batch, vlms: list[str]) -> tuple[list[dict], list[dict]]:
    """A processed batch -> (rejected rows, accepted samples) as the writer takes them."""
    n = len(batch["key"])
    rejected, accepted = [], []
    member = batch.get("member")
    for i in range(n):
        key, source = str(batch["key"][i]), str(batch["source"][i])
        m = _str(member[i]) if member is not None else ""
        reason = batch["reject"][i]
        if reason is not None and str(reason) != "":
            rejected.append(dict(key=key, source=source, member=m, reason=str(reason),
                                 detail=str(batch["detail"][i])))
            continue
        s = {c: _py(batch[c][i]) for c in ("sha256", "width", "height", "bucket_h", "bucket_w",
                                            "latent_scaling_factor")}
        s.update(key=key, source=source, member=m, mode=str(batch["mode"][i]) if "mode" in batch else "",
                 latent=np.asarray(batch["latent"][i]),
                 captions={v: str(batch[caption_column(v)][i]) for v in vlms},
                 clip_scores={v: float(batch[clip_column(v)][i]) for v in vlms})
        if "jpg" in batch:
            s["jpg"] = bytes(batch["jpg"][i])
        accepted.append(s)
    return rejected, accepted


def batch_counts(batch: Batch, rejected: list[dict], accepted: int) -> dict[str, Any]:
    """One row of counts for a batch: accepted, rejected by reason, per-stage busy seconds and live rows."""
    busy, rows = {}, {}
    for col, vals in batch.items():
        if col.startswith("t__"):
            vals = np.asarray(vals, dtype=np.float64)
            busy[col[3:]] = float(vals.sum())
            rows[col[3:]] = int((vals > 0).sum())
    reasons: dict[str, int] = defaultdict(int)
    for r in rejected:
        reasons[r["reason"]] += 1
    return {"accepted": accepted, "rejected": len(rejected), "reasons": json.dumps(reasons),
            "busy": json.dumps(busy), "rows": json.dumps(rows)}


class Stats:
    """What the driver keeps: sums of the per-batch count rows (constant size, whatever the input count)."""

    def __init__(self):
        self.busy: dict[str, float] = defaultdict(float)  # stage -> seconds spent inside the stage
        self.rows: dict[str, int] = defaultdict(int)  # stage -> live rows it processed
        self.reasons: dict[str, int] = defaultdict(int)
        self.accepted = 0
        self.rejected = 0

    def add(self, c: dict[str, Any]) -> None:
        self.accepted += int(c["accepted"])
        self.rejected += int(c["rejected"])
        for k, v in json.loads(c["reasons"]).items():
            self.reasons[k] += v
        for k, v in json.loads(c["busy"]).items():
            self.busy[k] += v
        for k, v in json.loads(c["rows"]).items():
            self.rows[k] += v

    def add_rows(self, table: dict[str, np.ndarray]) -> None:
        for i in range(len(table["accepted"])):
            self.add({k: _py(v[i]) for k, v in table.items()})

    def stage_times(self) -> dict[str, dict[str, float]]:
        return {k: {"rows": self.rows[k], "busy_s": round(self.busy[k], 3),
                    "rows_per_s": round(self.rows[k] / self.busy[k], 2) if self.busy[k] > 0 else None}
                for k in self.busy}


# ---------------------------------------------------------------------------------------------- whole output

def _manifest_partial(t: pa.Table) -> pa.Table:
    """Partial sums of one manifest block: per VLM captions, words and CLIP sums; bucket counts."""
    per: dict[str, list[float]] = {}
    buckets: dict[str, int] = defaultdict(int)
    vlms, caps, scores = (t.column(c).to_pylist() for c in ("vlms", "captions", "clip_scores"))
    bh, bw = t.column("bucket_h").to_pylist(), t.column("bucket_w").to_pylist()
    for i in range(t.num_rows):
        for v, c, s in zip(vlms[i], caps[i], scores[i]):
            p = per.setdefault(v, [0, 0, 0.0, 0])
            p[0] += 1 if c.strip() else 0
            p[1] += len(c.split())
            p[2] += float(s)
            p[3] += 1
        buckets[f"{bh[i]}x{bw[i]}"] += 1
    return pa.table({"kind": ["manifest"], "n": [t.num_rows], "a": [json.dumps(per)], "b": [json.dumps(buckets)]})


def _rejected_partial(t: pa.Table) -> pa.Table:
    import pyarrow.compute as pc

    vc = pc.value_counts(t.column("reason")) if t.num_rows else []
    counts = {str(x["values"]): int(x["counts"]) for x in (vc.to_pylist() if t.num_rows else [])}
    return pa.table({"kind": ["rejected"], "n": [t.num_rows], "a": [json.dumps(counts)], "b": ["{}"]})


_SUMMARY_COLUMNS = {"manifest": ["vlms", "captions", "clip_scores", "bucket_h", "bucket_w"], "rejected": ["reason"]}


def _partials(out: Path) -> list[dict]:
    """The partial sums of both part folders: by Ray Data tasks in one execution when Ray is up, else here."""
    import pyarrow.parquet as pq

    from curation.writer import MANIFEST, REJECTED, part_files, parts_dataset

    jobs = [(kind, fn, out / folder) for kind, fn, folder in (("manifest", _manifest_partial, MANIFEST),
                                                              ("rejected", _rejected_partial, REJECTED))]
    try:
        import ray

        on_cluster = ray.is_initialized()
    except ImportError:
        on_cluster = False
    if not on_cluster:
        return [r for kind, fn, folder in jobs for f in part_files(folder)
                for r in fn(pq.read_table(f, columns=_SUMMARY_COLUMNS[kind])).to_pylist()]
    ds = None
    for kind, fn, folder in jobs:
        if part_files(folder):
            part = parts_dataset(folder, fn, _SUMMARY_COLUMNS[kind])
            ds = part if ds is None else ds.union(part)
    rows: list[dict] = []
    if ds is not None:
        for b in ds.iter_batches(batch_size=None, batch_format="pyarrow"):
            rows += b.to_pylist()
    return rows


def output_summary(out: Path) -> dict[str, Any]:
    """Whole-output numbers from the manifest and rejected parts (all attempts together)."""
    per: dict[str, list[float]] = {}
    buckets: dict[str, int] = defaultdict(int)
    by_reason: dict[str, int] = defaultdict(int)
    accepted = rejected = 0
    for r in _partials(out):
        if r["kind"] == "manifest":
            accepted += r["n"]
            for v, p in json.loads(r["a"]).items():
                acc = per.setdefault(v, [0, 0, 0.0, 0])
                for j in range(4):
                    acc[j] += p[j]
            for b, n in json.loads(r["b"]).items():
                buckets[b] += n
        else:
            rejected += r["n"]
            for k, n in json.loads(r["a"]).items():
                by_reason[k] += n
    per_vlm = {v: {"captions": int(p[0]), "mean_words": round(p[1] / max(p[3], 1), 2),
                   "mean_clip": round(p[2] / max(p[3], 1), 3)} for v, p in per.items()}
    return {"accepted": accepted, "rejected": rejected, "rejected_by_reason": dict(sorted(by_reason.items())),
            "per_vlm": per_vlm, "buckets": dict(sorted(buckets.items()))}


def format_table(record: dict[str, Any]) -> str:
    c, s, t = record["counts"], record["summary"], record["timings"]
    lines = ["", "curation summary", "-" * 60,
             f"{'images in':<32}{c['inputs']:>10}",
             f"{'accepted':<32}{c['accepted']:>10}",
             f"{'rejected':<32}{c['rejected']:>10}"]
    for reason, n in s["rejected_by_reason"].items():
        lines.append(f"{'  ' + reason:<32}{n:>10}")
    if c.get("duplicates_dropped"):
        lines.append(f"{'duplicate sources dropped':<32}{c['duplicates_dropped']:>10}")
    lines += ["", f"{'VLM':<16}{'captions':>10}{'mean words':>12}{'mean CLIP':>12}"]
    for v, d in s["per_vlm"].items():
        lines.append(f"{v:<16}{d['captions']:>10}{d['mean_words']:>12.1f}{d['mean_clip']:>12.2f}")
    lines += ["", f"{'stage (this attempt)':<24}{'rows':>8}{'busy s':>10}{'rows/s':>10}"]
    for st, d in t["stages"].items():
        rps = f"{d['rows_per_s']:.1f}" if d["rows_per_s"] is not None else "-"
        lines.append(f"{st:<24}{d['rows']:>8}{d['busy_s']:>10.2f}{rps:>10}")
    lines += ["", f"processed this attempt: {c['processed_this_attempt']} in {t['wall_s']:.1f} s wall "
                  f"(attempt {record['attempts']})", "-" * 60]
    return "\n".join(lines)
