"""Curation at full row count: a Parquet list of N inputs, a few hundred real images, the rest missing files.

    python bench/bench_curation_scale.py --rows 100000 1000000 --real 300 --out bench/results/curation_scale_cpu.json

For each N: `python -m jobs.curate --preset tiny` (the real pipeline: distributed listing, anti-join, decode,
four vLLM captioners, CLIP, DC-AE, writers on the workers) on a fresh output, then the same command again on
the finished output (a no-op: listing + anti-join only). Missing files are rejected as `unreadable` in the
decode stage, so listing, planning, rejection bookkeeping and writing all run at N rows. Reported per run:
wall time, rows/s, the driver's peak RSS (VmHWM of the jobs.curate process, polled from /proc), accepted,
rejected, and whether accepted + rejected = N exactly. Goals (issue 12): driver peak RSS <= 1.5 GiB and at
most +10% from the smallest to the largest N; no-op re-run <= 60 s; accepted + rejected = inputs.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def make_inputs(root: Path, rows: int, real: int, seed: int = 0) -> Path:
    """list.parquet with `rows` paths: `real` small real images at seeded random positions, the rest missing."""
    from PIL import Image

    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    img_dir = root / "real"
    img_dir.mkdir(exist_ok=True)
    real_paths = []
    for i in range(real):
        p = img_dir / f"img_{i:05d}.jpg"
        if not p.exists():
            h, w = (int(x) for x in rng.integers(48, 160, size=2))
            a = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
            Image.fromarray(a).save(p, quality=90)
        real_paths.append(str(p))
    paths = np.array([f"{root}/missing/{i // 1000:05d}/img_{i:08d}.jpg" for i in range(rows)], dtype=object)
    pos = rng.choice(rows, size=real, replace=False)
    paths[pos] = real_paths
    out = root / f"list_{rows}.parquet"
    pq.write_table(pa.table({"path": list(paths)}), out, row_group_size=100_000)
    return out


def run_curate(inputs: Path, out: Path, overrides: list[str]) -> dict:
    cmd = [sys.executable, "-m", "jobs.curate", "--input", str(inputs), "--output", str(out), "--preset", "tiny",
           *[a for o in overrides for a in ("--set", o)]]
    env = dict(os.environ, RAY_USAGE_STATS_ENABLED="0", PYTHONUNBUFFERED="1")
    log_path = out.parent / f"{out.name}.{int(time.time())}.log"
    t0 = time.time()
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
        peak = 0
        while proc.poll() is None:
            try:
                for line in Path(f"/proc/{proc.pid}/status").read_text().splitlines():
                    if line.startswith("VmHWM:"):
                        peak = max(peak, int(line.split()[1]))
            except (FileNotFoundError, ProcessLookupError):
                pass
            time.sleep(0.2)
    wall = time.time() - t0
    text = log_path.read_text()
    if proc.returncode != 0:
        raise SystemExit(f"jobs.curate failed ({proc.returncode}); log {log_path}:\n{text[-4000:]}")
    record = json.loads((out / "run.json").read_text())
    return {"wall_s": round(wall, 1), "driver_peak_rss_mib": round(peak / 1024, 1), "log": str(log_path),
            "counts": record["counts"], "job_wall_s": record["timings"]["wall_s"],
            "stages": record["timings"]["stages"],
            "inputs_line": next((x for x in text.splitlines() if x.startswith("inputs:")), "")}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=int, nargs="+", default=[100_000, 1_000_000])
    p.add_argument("--real", type=int, default=300, help="real images among the rows")
    p.add_argument("--work", default="/tmp/bench_curation_scale", help="scratch folder (inputs and outputs)")
    p.add_argument("--out", default=str(REPO / "bench/results/curation_scale_cpu.json"))
    p.add_argument("--set", action="append", default=[], help="extra jobs.curate --set overrides")
    p.add_argument("--rerun-only", action="store_true",
                   help="measure again only the no-op re-runs of the finished outputs of an earlier run (kept in "
                        "--work), updating their entries in --out")
    args = p.parse_args()

    from sana_core.zoo import ensure_zoo

    ensure_zoo()
    work = Path(args.work)
    # Missing files fail in microseconds: decode them in big batches so each rejected part holds ~1000 rows.
    overrides = ["input.resources.batch_size=1000", "writer.samples_per_shard=64", *args.set]
    if args.rerun_only:
        doc = json.loads(Path(args.out).read_text())
        for r in doc["results"]:
            if r["rows"] in args.rows:
                r.setdefault("earlier_reruns", []).append(r["rerun"])
                r["rerun"] = run_curate(work / f"list_{r['rows']}.parquet", work / f"out_{r['rows']}", overrides)
                print(f"{r['rows']:>9} rows: re-run {r['rerun']['wall_s']:.1f} s (job {r['rerun']['job_wall_s']} s), "
                      f"driver peak {r['rerun']['driver_peak_rss_mib']:.1f} MiB", flush=True)
        results = doc["results"]
        doc["rerun_command"] = " ".join(["python", "bench/bench_curation_scale.py", *sys.argv[1:]])
    else:
        results = run_all(args, work, overrides)
        doc = {"benchmark": "curation_scale", "command": " ".join(["python", "bench/bench_curation_scale.py",
                                                                    *sys.argv[1:]])}
    peaks = [max(r["first"]["driver_peak_rss_mib"], r["rerun"]["driver_peak_rss_mib"]) for r in results]
    goals = {"driver_peak_rss_le_1_5_gib": max(peaks) <= 1536,
             "driver_rss_growth_le_10pct": peaks[-1] <= 1.10 * peaks[0],
             "noop_rerun_le_60_s": results[-1]["rerun"]["wall_s"] <= 60,
             "exact_counts": all(r["accepted_plus_rejected_equals_inputs"] for r in results)}
    doc.update({"machine": {"cpus": os.cpu_count(), "python": platform.python_version(),
                            "load_avg_at_end": os.getloadavg()},
                "overrides": overrides, "results": results, "driver_peak_growth_pct":
                    round(100 * (peaks[-1] / peaks[0] - 1), 1), "goals": goals})
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(doc, indent=2))
    print(json.dumps(goals), f"-> {args.out}")


def run_all(args, work: Path, overrides: list[str]) -> list[dict]:
    results = []
    for n in args.rows:
        inputs = make_inputs(work, n, args.real)
        out = work / f"out_{n}"
        shutil.rmtree(out, ignore_errors=True)
        first = run_curate(inputs, out, overrides)
        again = run_curate(inputs, out, overrides)
        c = first["counts"]
        row = {"rows": n, "real_images": args.real, "first": first, "rerun": again,
               "rows_per_s": round(n / first["wall_s"], 1),
               "accepted_plus_rejected_equals_inputs": c["accepted"] + c["rejected"] == n == c["inputs"],
               "rerun_is_noop": again["counts"]["processed_this_attempt"] == 0}
        results.append(row)
        print(f"{n:>9} rows: first {first['wall_s']:7.1f} s ({row['rows_per_s']:8.1f} rows/s), driver peak "
              f"{first['driver_peak_rss_mib']:7.1f} MiB; accepted {c['accepted']} + rejected {c['rejected']} "
              f"= {c['accepted'] + c['rejected']} ({'exact' if row['accepted_plus_rejected_equals_inputs'] else 'WRONG'})"
              f"; re-run {again['wall_s']:.1f} s, driver peak {again['driver_peak_rss_mib']:.1f} MiB", flush=True)
    return results


if __name__ == "__main__":
    main()
