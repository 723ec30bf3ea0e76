"""Counting what the driver sees, and the table printed at the end of a run."""
from __future__ import annotations

from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np

from curation.stage import Batch, caption_column, clip_column


def _py(v: Any) -> Any:
    return v.item() if isinstance(v, np.generic) else v


class Stats:
    """Splits driver batches into rejected rows and accepted samples, and sums per-stage busy time."""

    def __init__(self, vlms: list[str]):
        self.vlms = vlms
        self.busy: dict[str, float] = defaultdict(float)  # stage -> seconds spent inside the stage
        self.rows: dict[str, int] = defaultdict(int)  # stage -> live rows it processed
        self.seen = 0

    def add_batch(self, batch: Batch) -> tuple[list[dict], list[dict]]:
        n = len(batch["key"])
        self.seen += n
        for col, vals in batch.items():
            if col.startswith("t__"):
                vals = np.asarray(vals, dtype=np.float64)
                self.busy[col[3:]] += float(vals.sum())
                self.rows[col[3:]] += int((vals > 0).sum())
        rejected, accepted = [], []
        for i in range(n):
            key, source = str(batch["key"][i]), str(batch["source"][i])
            reason = batch["reject"][i]
            if reason is not None and str(reason) != "":
                rejected.append(dict(key=key, source=source, reason=str(reason), detail=str(batch["detail"][i])))
                continue
            s = {c: _py(batch[c][i]) for c in ("sha256", "width", "height", "bucket_h", "bucket_w",
                                                "latent_scaling_factor")}
            s.update(key=key, source=source, mode=str(batch["mode"][i]) if "mode" in batch else "",
                     latent=np.asarray(batch["latent"][i]),
                     captions={v: str(batch[caption_column(v)][i]) for v in self.vlms},
                     clip_scores={v: float(batch[clip_column(v)][i]) for v in self.vlms})
            if "jpg" in batch:
                s["jpg"] = bytes(batch["jpg"][i])
            accepted.append(s)
        return rejected, accepted

    def stage_times(self) -> dict[str, dict[str, float]]:
        return {k: {"rows": self.rows[k], "busy_s": round(self.busy[k], 3),
                    "rows_per_s": round(self.rows[k] / self.busy[k], 2) if self.busy[k] > 0 else None}
                for k in self.busy}


def output_summary(out: Path) -> dict[str, Any]:
    """Whole-output numbers from manifest.parquet and rejected.parquet (all attempts together)."""
    import pyarrow.parquet as pq

    man = pq.read_table(out / "manifest.parquet").to_pylist()
    rej = pq.read_table(out / "rejected.parquet").to_pylist()
    by_reason: dict[str, int] = defaultdict(int)
    for r in rej:
        by_reason[r["reason"]] += 1
    per_vlm: dict[str, dict[str, float]] = {}
    vlms = man[0]["vlms"] if man else []
    for j, v in enumerate(vlms):
        caps = [m["captions"][j] for m in man]
        scores = [m["clip_scores"][j] for m in man]
        per_vlm[v] = {"captions": sum(1 for c in caps if c.strip()),
                      "mean_words": round(float(np.mean([len(c.split()) for c in caps])), 2),
                      "mean_clip": round(float(np.mean(scores)), 3)}
    buckets: dict[str, int] = defaultdict(int)
    for m in man:
        buckets[f"{m['bucket_h']}x{m['bucket_w']}"] += 1
    return {"accepted": len(man), "rejected": len(rej), "rejected_by_reason": dict(sorted(by_reason.items())),
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
