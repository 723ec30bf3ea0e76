"""Write OUTPUT/report.html for a curated dataset: one self-contained page to eyeball what was made.

    python -m jobs.report OUTPUT [--samples 24]

Shows counts (accepted, rejected by reason), caption-length and CLIP-score histograms per VLM,
original-resolution and bucket counts, and a grid of samples with their captions and CLIP scores.
Images are inlined as base64; plots use matplotlib when it is installed, else plain inline SVG.

Large outputs are sampled, never loaded whole: counts come from the Parquet footers and run.json, the
histograms and tables from at most --max-rows manifest rows read from randomly chosen parts (seeded), and
the grid's images from the few shards that hold the picked samples.
"""
from __future__ import annotations

import argparse
import base64
import html
import io
import json
import tarfile
from collections import Counter
from pathlib import Path

import numpy as np

from sana_core.errors import SanaError, cli_main

PALETTE = ["#4c72b0", "#dd8452", "#55a868", "#c44e52", "#8172b3", "#937860"]


def _svg_hist(series: dict[str, list[float]], title: str, xlabel: str, bins: int = 20) -> str:
    """Overlaid step histograms as inline SVG (no dependencies)."""
    w, h, pad = 460, 240, 40
    vals = [v for s in series.values() for v in s]
    if not vals:
        return f"<p>{html.escape(title)}: no data</p>"
    lo, hi = min(vals), max(vals)
    hi = hi if hi > lo else lo + 1
    edges = np.linspace(lo, hi, bins + 1)
    counts = {k: np.histogram(v, edges)[0] for k, v in series.items()}
    top = max(int(c.max()) for c in counts.values()) or 1
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" font-size="11">',
             f'<text x="{w / 2}" y="14" text-anchor="middle" font-weight="bold">{html.escape(title)}</text>',
             f'<line x1="{pad}" y1="{h - pad}" x2="{w - 10}" y2="{h - pad}" stroke="#000"/>',
             f'<line x1="{pad}" y1="20" x2="{pad}" y2="{h - pad}" stroke="#000"/>',
             f'<text x="{w / 2}" y="{h - 8}" text-anchor="middle">{html.escape(xlabel)}</text>',
             f'<text x="{pad}" y="{h - pad + 14}" text-anchor="start">{lo:.3g}</text>',
             f'<text x="{w - 10}" y="{h - pad + 14}" text-anchor="end">{hi:.3g}</text>',
             f'<text x="{pad - 4}" y="26" text-anchor="end">{top}</text>']
    sx = (w - 10 - pad) / bins
    sy = (h - pad - 24) / top
    for j, (name, c) in enumerate(counts.items()):
        color = PALETTE[j % len(PALETTE)]
        pts = []
        for i, n in enumerate(c):
            y = h - pad - n * sy
            pts += [f"{pad + i * sx:.1f},{y:.1f}", f"{pad + (i + 1) * sx:.1f},{y:.1f}"]
        parts.append(f'<polyline fill="none" stroke="{color}" stroke-width="2" points="{" ".join(pts)}"/>')
        parts.append(f'<text x="{w - 12}" y="{30 + 13 * j}" text-anchor="end" fill="{color}">{html.escape(name)}</text>')
    parts.append("</svg>")
    return "".join(parts)


def _mpl_hist(series: dict[str, list[float]], title: str, xlabel: str, bins: int = 20) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 2.8), dpi=100)
    for j, (name, v) in enumerate(series.items()):
        if v:
            ax.hist(v, bins=bins, histtype="step", linewidth=2, label=name, color=PALETTE[j % len(PALETTE)])
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("samples")
    ax.legend(fontsize=8)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return f'<img src="data:image/png;base64,{base64.b64encode(buf.getvalue()).decode()}">'


def histogram(series: dict[str, list[float]], title: str, xlabel: str) -> str:
    try:
        return _mpl_hist(series, title, xlabel)
    except ImportError:
        return _svg_hist(series, title, xlabel)


def _table(rows: list[tuple], head: tuple) -> str:
    th = "".join(f"<th>{html.escape(str(h))}</th>" for h in head)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in r) + "</tr>" for r in rows)
    return f"<table><tr>{th}</tr>{body}</table>"


def sample_images(shards: Path, picks: list[dict]) -> dict[str, bytes]:
    """KEY.jpg bytes of the picked samples, read from the shards that hold them (their manifest `shard`)."""
    out: dict[str, bytes] = {}
    by_shard: dict[str, set[str]] = {}
    for m in picks:
        by_shard.setdefault(m["shard"], set()).add(m["key"])
    for name, keys in sorted(by_shard.items()):
        if not (shards / name).exists():
            continue
        with tarfile.open(shards / name) as tf:
            for m in tf:
                key, _, ext = m.name.partition(".")
                if ext == "jpg" and key in keys:
                    out[key] = tf.extractfile(m).read()
    return out


def _parts(path: Path) -> list[Path]:
    """The Parquet files of a manifest / rejected table: a folder of parts or a single file."""
    if path.is_dir():
        return sorted(p for p in path.glob("*.parquet") if not p.name.startswith((".", "_")))
    return [path] if path.exists() else []


def count_rows(path: Path) -> int:
    import pyarrow.parquet as pq

    return sum(pq.ParquetFile(p).metadata.num_rows for p in _parts(path))


def sample_rows(path: Path, max_rows: int, seed: int = 0, columns: list[str] | None = None) -> list[dict]:
    """Up to max_rows rows, from parts taken in a seeded random order (whole table when it is smaller)."""
    import pyarrow.parquet as pq

    files = _parts(path)
    rng = np.random.default_rng(seed)
    rows: list[dict] = []
    for i in rng.permutation(len(files)):
        pf = pq.ParquetFile(files[i])
        for g in range(pf.num_row_groups):
            rows += pf.read_row_group(g, columns=columns).to_pylist()
            if len(rows) >= max_rows:
                break
        if len(rows) >= max_rows:
            break
    if len(rows) > max_rows:
        rows = [rows[j] for j in sorted(rng.choice(len(rows), size=max_rows, replace=False))]
    return rows


def build_report(output: Path, n_samples: int = 24, max_rows: int = 20_000) -> str:
    man_path, rej_path = output / "manifest.parquet", output / "rejected.parquet"
    if not man_path.exists():
        raise SanaError(f"{output} has no manifest.parquet: not a finished curation output")
    n_man, n_rej = count_rows(man_path), count_rows(rej_path)
    man = sample_rows(man_path, max_rows)
    run = json.loads((output / "run.json").read_text()) if (output / "run.json").exists() else {}
    reasons = Counter(run.get("summary", {}).get("rejected_by_reason") or {})
    if not reasons and n_rej:
        reasons = Counter(r["reason"] for r in sample_rows(rej_path, max_rows, columns=["reason"]))
    vlms = man[0]["vlms"] if man else []
    words = {v: [len(m["captions"][j].split()) for m in man] for j, v in enumerate(vlms)}
    scores = {v: [m["clip_scores"][j] for m in man] for j, v in enumerate(vlms)}
    sampled = f" (from a sample of {len(man)} of {n_man})" if len(man) < n_man else ""

    parts = ["<!doctype html><html><head><meta charset='utf-8'><title>curation report</title><style>",
             "body{font-family:sans-serif;margin:24px;max-width:1400px} table{border-collapse:collapse;margin:8px 0}"
             "td,th{border:1px solid #ccc;padding:3px 8px;text-align:left;font-size:13px}"
             ".grid{display:grid;grid-template-columns:repeat(auto-fill,minmax(320px,1fr));gap:12px}"
             ".card{border:1px solid #ddd;padding:8px;border-radius:6px;font-size:12px}"
             ".card img{max-width:100%;max-height:220px;display:block;margin:auto}"
             ".cap{margin:4px 0}.vlm{font-weight:bold}.score{color:#555}</style></head><body>",
             f"<h1>Curation report: {html.escape(str(output))}</h1>"]
    counts = run.get("counts", {})
    parts.append(_table([("inputs", counts.get("inputs", n_man + n_rej)), ("accepted", n_man),
                         ("rejected", n_rej)], ("", "count")))
    if reasons:
        parts.append("<h2>Rejected by reason</h2>" + _table(sorted(reasons.items()), ("reason", "count")))
    if vlms:
        parts.append(f"<h2>Captions and CLIP scores per VLM{html.escape(sampled)}</h2>")
        parts.append(_table([(v, len(words[v]), f"{np.mean(words[v]):.1f}", f"{np.mean(scores[v]):.2f}",
                              f"{np.std(scores[v]):.2f}") for v in vlms],
                            ("VLM", "captions", "mean words", "mean CLIP", "std CLIP")))
        parts.append(histogram(words, "caption length", "words"))
        parts.append(histogram(scores, "CLIP score", "100 x cosine"))
    parts.append(f"<h2>Buckets{html.escape(sampled)}</h2>" + _table(
        sorted(Counter(f"{m['bucket_h']}x{m['bucket_w']}" for m in man).items()), ("bucket (h x w)", "samples")))
    parts.append(f"<h2>Original resolutions{html.escape(sampled)}</h2>" + _table(
        Counter(f"{m['height']}x{m['width']}" for m in man).most_common(20), ("h x w", "samples")))

    rng = np.random.default_rng(0)
    picks = [man[i] for i in sorted(rng.choice(len(man), size=min(n_samples, len(man)), replace=False))] if man else []
    images = sample_images(output / "shards", picks)
    parts.append(f"<h2>Samples ({len(picks)} of {n_man})</h2><div class='grid'>")
    for m in picks:
        img = images.get(m["key"])
        tag = f"<img src='data:image/jpeg;base64,{base64.b64encode(img).decode()}'>" if img else "<p>(no image)</p>"
        caps = "".join(f"<div class='cap'><span class='vlm'>{html.escape(v)}</span> "
                       f"<span class='score'>[{s:.2f}]</span> {html.escape(c)}</div>"
                       for v, c, s in zip(m["vlms"], m["captions"], m["clip_scores"]))
        parts.append(f"<div class='card'>{tag}<div class='score'>{html.escape(m['source'])}<br>"
                     f"{m['width']}x{m['height']} -> bucket {m['bucket_h']}x{m['bucket_w']}</div>{caps}</div>")
    parts.append("</div></body></html>")
    return "".join(parts)


@cli_main
def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m jobs.report", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("output", help="a folder written by jobs.curate")
    p.add_argument("--samples", type=int, default=24, help="samples shown in the grid (default 24)")
    p.add_argument("--max-rows", type=int, default=20_000,
                   help="manifest rows read for the histograms and tables (a seeded sample of a larger output)")
    args = p.parse_args(argv)
    out = Path(args.output)
    page = build_report(out, args.samples, args.max_rows)
    (out / "report.html").write_text(page, encoding="utf-8")
    print(f"wrote {out / 'report.html'} ({len(page) / 1024:.0f} KiB)")


if __name__ == "__main__":
    main()
