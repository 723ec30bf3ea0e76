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
from bench.learning.quant_eval import latent_psnr, psnr_stats, unrelated_psnr
from bench.learning.scorer import decode, score
from sana_core.errors import SanaError

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


def test_latent_psnr_definition():
    rng = np.random.default_rng(11)
    ref = rng.standard_normal((3, CHANNELS, 4, 4))
    assert np.isinf(latent_psnr(ref, ref)).all()  # the float model against itself: nothing to report
    got = ref + 0.01 * rng.standard_normal(ref.shape)
    expect = [10 * np.log10(np.abs(r).max() ** 2 / ((g - r) ** 2).mean()) for r, g in zip(ref, got)]
    np.testing.assert_allclose(latent_psnr(ref, got), expect)
    stats = psnr_stats(latent_psnr(ref, ref))
    assert stats["mean_db"] is None and stats["identical"] == 3  # JSON has no inf
    with pytest.raises(ValueError):
        latent_psnr(ref, ref[:2])


def test_quant_modes_are_checked():
    from bench.learning.run import quant_modes

    assert quant_modes("w8a8-int8, w8a8-fp8") == ["w8a8-int8", "w8a8-fp8"] and quant_modes("") == []
    for bad in ("w4a16", "w8a8-int8,w8a8-int8", "none"):
        with pytest.raises(SanaError, match="--quant"):
            quant_modes(bad)


PSNR_FLOOR_DB = {"w8a8-int8": 45.0, "w8a8-fp8": 32.0}


@pytest.mark.slow
def test_driver_quant_eval_only_on_a_trained_run(tmp_path):
    """Train a few steps, then --eval-only the run with both W8A8 modes: each quantised sample must sit near its
    float twin (far above what an unrelated latent or pure noise scores), and the goals follow the numbers."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", WANDB_MODE="offline")
    work, out = tmp_path / "work", tmp_path / "quant.json"
    common = ["--repeats", "1", "--sample-steps", "4"]
    r = subprocess.run([sys.executable, "-m", "bench.learning.run", "--steps", "6", "--samples", "64",
                        "--batch-size", "16", "--workdir", str(work), "--out", str(tmp_path / "float.json"), *common],
                       cwd=REPO, env=env, capture_output=True, text=True, timeout=900, check=False)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "quant" not in json.loads((tmp_path / "float.json").read_text())
    r = subprocess.run([sys.executable, "-m", "bench.learning.run", "--eval-only", str(work / "run"),
                        "--quant", "w8a8-int8,w8a8-fp8", "--out", str(out), *common],
                       cwd=REPO, env=env, capture_output=True, text=True, timeout=900, check=False)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "PSNR mean" in r.stdout and "mlp.point" in r.stdout
    res, flt = json.loads(out.read_text()), json.loads((tmp_path / "float.json").read_text())
    # The same checkpoint and noise give the same float samples as the run that trained it.
    assert res["with_guidance"]["accuracy"] == flt["with_guidance"]["accuracy"]
    assert res["training"]["steps"] == 6 and res["training"]["wall_s"] > 0 and res["dataset"]["samples"] == 64
    assert res["eval_only"] == str(work / "run") and res["trained_by"] == flt["command"]
    q = res["quant"]
    assert q["reference"]["dtype"] == res["sampler"]["dtype"] == "float32" and q["psnr_peak"] == "max_abs_float"
    assert set(q["modes"]) == set(res["goals"]) == {"w8a8-int8", "w8a8-fp8"}
    # What pure noise scores against the float latents (seeded): the level a broken quantisation falls to.
    float_like = np.random.default_rng(0).standard_normal((32, CHANNELS, 4, 4))
    noise_db = unrelated_psnr(float_like)["max_db"]
    for mode, m in q["modes"].items():
        assert m["quantized_layers"] == 7 * 4, mode  # 7 block linears in each of the 4 blocks
        assert set(m["layer_errors"]) == {f"blocks.{i}.{n}" for i in range(4) for n in m["layer_error_summary"]}
        for e in m["layer_error_summary"].values():
            assert 0 < e["mean_rel_err"] <= e["max_rel_err"] < 0.1 and e["min_cos"] > 0.99, (mode, e)
        for name in ("with_guidance", "text_no_guidance", "without_text"):
            c = m["conditions"][name]
            assert c["n"] == 32 and all(0.0 <= v <= 1.0 for v in c["accuracy"].values()), (mode, name)
            ps = c["latent_psnr"]
            assert ps["identical"] == 0 and ps["mean_db"] is not None and np.isfinite(ps["min_db"]), (mode, ps)
            # Far above an unrelated latent of this run and above pure noise: a quantised model that ignores its
            # weights or mis-scales them lands near those levels.
            assert ps["min_db"] > q["unrelated_latent_psnr"][name]["max_db"] + 15, (mode, name, ps)
            assert ps["min_db"] > noise_db + 15, (mode, name, ps, noise_db)
            # And near the level the formats allow: this run gives int8 >= 50.7 dB, fp8 >= 35.7 dB (min over the
            # samples). Every weight scale off by 3% (a subtle quantisation bug) drops int8 to 40 dB.
            assert ps["min_db"] > PSNR_FLOOR_DB[mode], (mode, name, ps)
            worst = c["worst_samples"]
            assert len(worst) == 3 and worst[0]["psnr_db"] == pytest.approx(ps["min_db"], abs=1e-3), (mode, worst)
            d = c["delta_points"]["mean_attribute"]
            assert d == pytest.approx(100 * (c["mean_attribute_accuracy"] - res[name]["mean_attribute_accuracy"]),
                                      abs=1e-2)
        wg = m["conditions"]["with_guidance"]
        assert res["goals"][mode] == {"quant_accuracy_loss_le_1pt": wg["delta_points"]["mean_attribute"] >= -1.0,
                                      "quant_latent_psnr_ge_30db": wg["latent_psnr"]["mean_db"] >= 30}
    # int8 keeps more of each layer than fp8 (e4m3 has 3 mantissa bits).
    assert (q["modes"]["w8a8-int8"]["conditions"]["with_guidance"]["latent_psnr"]["mean_db"]
            > q["modes"]["w8a8-fp8"]["conditions"]["with_guidance"]["latent_psnr"]["mean_db"])
