"""The learning benchmark's dataset (contract-valid shards) and scorer, plus a short run of the driver."""
from __future__ import annotations

import hashlib
import io
import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from bench.learning.dataset import (
    CHANCE,
    CHANNELS,
    COLOURS,
    POSITIONS,
    SIZES,
    VLMS,
    Attributes,
    all_attributes,
    build_dataset,
    caption,
    eval_prompts,
    render,
)
from bench.learning.scorer import decode, score

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("learning_ds")
    info = build_dataset(root, n=100, grid=8, seed=3, samples_per_shard=40)
    return root, info


def test_shards_follow_the_data_contract(dataset):
    root, info = dataset
    shards = sorted((root / "shards").iterdir())
    assert [p.name for p in shards] == ["shard-000000.tar", "shard-000001.tar", "shard-000002.tar"]
    assert info.shards == 3 and info.samples == 100
    seen = 0
    for shard in shards:
        with tarfile.open(shard) as tar:
            members = {m.name: tar.extractfile(m).read() for m in tar.getmembers()}
        keys = sorted({n.split(".", 1)[0] for n in members})
        assert set(members) == {f"{k}.json" for k in keys} | {f"{k}.latent.npy" for k in keys}
        for key in keys:
            rec = json.loads(members[f"{key}.json"].decode("utf-8"))
            lat = np.load(io.BytesIO(members[f"{key}.latent.npy"]))
            assert len(key) == 32 and all(c in "0123456789abcdef" for c in key)
            assert rec["key"] == key == hashlib.sha256(rec["source"].encode()).hexdigest()[:32]
            assert lat.dtype == np.float16 and list(lat.shape) == rec["latent_shape"] == [CHANNELS, 8, 8]
            assert rec["bucket"] == [rec["height"], rec["width"]] == [256, 256]
            assert rec["sha256"] == hashlib.sha256(lat.tobytes()).hexdigest()
            assert isinstance(rec["latent_scaling_factor"], float) and isinstance(rec["clip_model"], str)
            assert set(rec["captions"]) == set(rec["clip_scores"]) == set(VLMS)
            assert all(isinstance(c, str) and c for c in rec["captions"].values())
            assert all(isinstance(s, float) for s in rec["clip_scores"].values())
            truth = Attributes(**rec["attributes"])
            assert rec["captions"]["vlm-canonical"] == caption(truth)
            # A wrong caption is exactly what the low score marks.
            assert (rec["clip_scores"]["vlm-sloppy"] < 24) == rec["sloppy_caption_wrong"]
            assert decode(lat) == truth
            seen += 1
    assert seen == 100


def test_manifest_rejected_and_run_record(dataset):
    root, _ = dataset
    m = pq.read_table(root / "manifest.parquet")
    assert m.num_rows == 100
    assert m.schema.field("bucket_h").type == "int32" and m.schema.field("clip_scores").type.value_type == "float"
    row = m.slice(0, 1).to_pylist()[0]
    assert row["vlms"] == list(VLMS) and len(row["captions"]) == len(row["clip_scores"]) == 3
    assert (root / "shards" / row["shard"]).is_file()
    assert pq.read_table(root / "rejected.parquet").num_rows == 0
    run = json.loads((root / "run.json").read_text())
    assert run["counts"] == {"inputs": 100, "accepted": 100, "rejected": 0}


def test_plain_webdataset_reads_the_shards(dataset):
    import webdataset as wds

    root, _ = dataset
    urls = [str(p) for p in sorted((root / "shards").iterdir())]
    samples = list(wds.WebDataset(urls, shardshuffle=False).decode())
    assert len(samples) == 100
    s = samples[0]
    assert s["latent.npy"].shape == (CHANNELS, 8, 8) and s["latent.npy"].dtype == np.float16
    assert s["json"]["key"] == s["__key__"]


def test_dataset_is_balanced_and_deterministic(tmp_path):
    a = build_dataset(tmp_path / "a", n=64, grid=4, seed=1)
    b = build_dataset(tmp_path / "b", n=64, grid=4, seed=1)
    ka = pq.read_table(Path(a.root) / "manifest.parquet").column("key").to_pylist()
    kb = pq.read_table(Path(b.root) / "manifest.parquet").column("key").to_pylist()
    assert ka == kb and len(set(ka)) == 64
    assert (Path(a.root) / "shards/shard-000000.tar").read_bytes() == (Path(b.root) / "shards/shard-000000.tar").read_bytes()
    caps = pq.read_table(Path(a.root) / "manifest.parquet").column("captions").to_pylist()
    combos = [c[0] for c in caps]
    assert sorted(set(combos)) == sorted(caption(x) for x in all_attributes())
    assert all(combos.count(c) == 2 for c in set(combos))


@pytest.mark.parametrize("grid", [4, 8, 16])
def test_scorer_is_perfect_on_ground_truth(grid):
    rng = np.random.default_rng(grid)
    prompts = eval_prompts(repeats=4)
    truths = [a for _, a in prompts]
    r = score([render(a, grid, rng) for a in truths], truths)
    assert r["accuracy"] == {"colour": 1.0, "position": 1.0, "size": 1.0, "joint": 1.0}
    assert r["n"] == 128


def test_scorer_is_near_chance_on_noise():
    rng = np.random.default_rng(0)
    truths = [a for _ in range(40) for a in all_attributes()]  # 1280 samples
    r = score([rng.standard_normal((CHANNELS, 8, 8)).astype(np.float32) for _ in truths], truths)
    for attr in ("colour", "position", "size"):
        # 1280 samples: the standard error of an accuracy near 1/4 is 0.012
        assert abs(r["accuracy"][attr] - CHANCE[attr]) < 0.06, (attr, r["accuracy"])
    assert r["accuracy"]["joint"] < 0.08


def test_scorer_reads_each_attribute_independently():
    rng = np.random.default_rng(5)
    for c in COLOURS:
        for p in POSITIONS:
            for s in SIZES:
                a = Attributes(c, p, s)
                assert decode(render(a, 8, rng)) == a
    with pytest.raises(ValueError):
        decode(np.zeros((16, 8, 8)))


@pytest.mark.slow
def test_driver_short_run_writes_the_result(tmp_path):
    out = tmp_path / "learning.json"
    env = dict(os.environ, HF_HUB_OFFLINE="1", WANDB_MODE="offline")
    r = subprocess.run([sys.executable, "-m", "bench.learning.run", "--steps", "6", "--samples", "64",
                        "--repeats", "1", "--sample-steps", "4", "--batch-size", "16", "--workdir", str(tmp_path / "work"),
                        "--out", str(out)], cwd=REPO, env=env, capture_output=True, text=True, timeout=900, check=False)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    res = json.loads(out.read_text())
    for key in ("with_guidance", "without_text", "chance", "training", "sampler", "device", "dataset", "command"):
        assert key in res, key
    assert res["training"]["steps"] == 6 and res["training"]["wall_s"] > 0
    assert res["sampler"]["solver"] == "flow_dpm" and res["sampler"]["guidance_scale"] == 4.5
    for k in ("with_guidance", "without_text"):
        assert set(res[k]["accuracy"]) == {"colour", "position", "size", "joint"}
        assert res[k]["n"] == 32
