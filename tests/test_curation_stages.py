"""Curation stages one by one, without Ray or vLLM: inputs, validation, resize, CLIP scoring, DC-AE encoding,
the guard that turns bad outputs into rejections, the exactly-once shard writer and the run's config checks.
"""
from __future__ import annotations

import io
import json
import math
import tarfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from curation.read import key_of, list_inputs, read_bytes
from curation.testdata import make_image_folder
from curation.validate import DecodeStage, Rejected, decode
from sana_core.errors import SanaError

EXTS = [".jpg", ".jpeg", ".png"]
TINY = dict(max_pixels=4096 * 4096, min_size=32)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("stages") / "images"
    return root, make_image_folder(root, n_good=6, seed=1)


def _batch(items) -> dict[str, np.ndarray]:
    n = len(items)
    obj = lambda xs: np.array(xs, dtype=object)
    return {"key": obj([key_of(it.source) for it in items]), "source": obj([it.source for it in items]),
            "locator": obj([it.locator for it in items]), "reject": obj([""] * n), "detail": obj([""] * n)}


# ---------------------------------------------------------------------------------------------- inputs

def test_folder_listing_and_every_bad_kind_gets_its_reason(folder):
    root, expected = folder
    items, dups = list_inputs(str(root), "auto", EXTS, "path")
    assert dups == 0 and {it.source for it in items} == expected.all  # notes.txt is not an input
    out = DecodeStage(special_modes="reject", **TINY)(_batch(items))
    got = {s: r for s, r in zip(out["source"], out["reject"]) if r}
    assert got == expected.rejected
    for s, r, d, img in zip(out["source"], out["reject"], out["detail"], out["image"]):
        if r:
            assert img is None and d and "\n" not in d
        else:
            assert img.mode == "RGB" and img.size == Image.open(s).size


def test_special_modes_convert_to_correct_rgb(folder):
    root, expected = folder
    for path, mode in expected.converted.items():
        with pytest.raises(Rejected, match="unsupported_mode"):
            decode(Path(path).read_bytes(), special_modes="reject", **TINY)
        d = decode(Path(path).read_bytes(), special_modes="convert", **TINY)
        assert d.image.mode == "RGB" and (d.width, d.height) == Image.open(path).size, mode
    # alpha is composited on white; 16 bits are scaled to 8
    rgba = Image.new("RGBA", (40, 40), (255, 0, 0, 0))
    rgba.paste((0, 0, 255, 255), (0, 0, 20, 40))
    buf = io.BytesIO()
    rgba.save(buf, "PNG")
    a = np.asarray(decode(buf.getvalue(), special_modes="convert", **TINY).image)
    assert a[5, 5].tolist() == [0, 0, 255] and a[5, 30].tolist() == [255, 255, 255]
    g16 = Image.fromarray(np.full((40, 40), 65535, np.uint16))
    buf = io.BytesIO()
    g16.save(buf, "PNG")
    assert np.asarray(decode(buf.getvalue(), special_modes="convert", **TINY).image).min() == 255


def test_exif_orientation_is_applied():
    img = Image.new("RGB", (64, 40), (10, 20, 30))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 on display
    buf = io.BytesIO()
    img.save(buf, "JPEG", exif=exif)
    d = decode(buf.getvalue(), special_modes="reject", **TINY)
    assert (d.width, d.height) == (40, 64)


def test_webdataset_tar_input_reads_members_in_place(folder, tmp_path):
    import webdataset as wds

    root, expected = folder
    good = sorted(expected.accepted)
    tar = tmp_path / "in-000.tar"
    with wds.TarWriter(str(tar)) as w:
        for i, p in enumerate(good):
            w.write({"__key__": f"s{i:03d}", Path(p).suffix[1:]: Path(p).read_bytes(), "txt": "alt text"})
    items, _ = list_inputs(str(tar), "auto", EXTS, "path")
    assert len(items) == len(good)
    for it, p in zip(items, good):
        assert it.source.startswith(f"{tar}::s") and "@" not in it.source
        assert read_bytes(it.locator) == Path(p).read_bytes()
    out = DecodeStage(special_modes="reject", **TINY)(_batch(items))
    assert all(r == "" for r in out["reject"])
    # brace patterns and folders of tars
    items2, _ = list_inputs(str(tmp_path / "in-{000..000}.tar"), "auto", EXTS, "path")
    assert [it.source for it in items2] == [it.source for it in items]
    items3, _ = list_inputs(str(tmp_path), "webdataset", EXTS, "path")
    assert [it.source for it in items3] == [it.source for it in items]
    # a cut-off tar: members past the end are unreadable, with a reason
    data = tar.read_bytes()
    cut = tmp_path / "cut.tar"
    cut.write_bytes(data[: len(data) // 2])
    locs = [it.locator.replace(str(tar), str(cut)) for it in items]
    batch = _batch(items)
    batch["locator"] = np.array(locs, dtype=object)
    out = DecodeStage(special_modes="reject", **TINY)(batch)
    assert "unreadable" in set(out["reject"])


def test_parquet_input_relative_paths_and_bad_column(folder, tmp_path):
    root, expected = folder
    good = sorted(expected.accepted)
    rel = [str(Path(p).relative_to(root.parent)) for p in good]
    pq.write_table(pa.table({"path": rel + [None, rel[0]], "x": list(range(len(rel) + 2))}), root.parent / "list.parquet")
    items, dups = list_inputs(str(root.parent / "list.parquet"), "auto", EXTS, "path")
    assert [it.source for it in items] == good and dups == 1
    with pytest.raises(SanaError, match="parquet_column"):
        list_inputs(str(root.parent / "list.parquet"), "auto", EXTS, "url")
    # URLs go through fsspec; a protocol it cannot open fails on the driver in one line
    pq.write_table(pa.table({"path": [f"file://{p}" for p in good]}), tmp_path / "urls.parquet")
    items, _ = list_inputs(str(tmp_path / "urls.parquet"), "auto", EXTS, "path")
    assert read_bytes(items[0].locator) == Path(good[0]).read_bytes()
    pq.write_table(pa.table({"path": ["nosuchfs://bucket/a.jpg"]}), tmp_path / "bad.parquet")
    with pytest.raises(SanaError, match="nosuchfs://") as e:
        list_inputs(str(tmp_path / "bad.parquet"), "auto", EXTS, "path")
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("make,needle", [
    (lambda d: d / "missing", "input not found"),
    (lambda d: (d / "x.txt").write_text("x") and d / "x.txt", "neither a folder"),
    (lambda d: d / "none-*.tar", "no .tar files"),
])
def test_bad_inputs_are_one_line(tmp_path, make, needle):
    with pytest.raises(SanaError, match=needle) as e:
        list_inputs(str(make(tmp_path)), "auto", EXTS, "path")
    assert "\n" not in str(e.value)


# ---------------------------------------------------------------------------------------------- resize, CLIP, DC-AE

def test_resize_to_bucket_covers_and_crops():
    from curation.resize import ResizeStage

    stage = ResizeStage(base=128, write_jpg=True, jpg_quality=90)
    imgs = [Image.new("RGB", (w, h), (200, 10, 10)) for w, h in [(300, 100), (100, 300), (97, 97), (64, 48)]]
    n = len(imgs)
    out = stage({"source": np.array(["a", "b", "c", "d"], object), "image": np.array(imgs + [None], object)[:n],
                 "reject": np.array([""] * n, object)})
    for img, bh, bw, jpg in zip(out["image"], out["bucket_h"], out["bucket_w"], out["jpg"]):
        assert img.shape == (bh, bw, 3) and bh % 32 == 0 and bw % 32 == 0
        assert Image.open(io.BytesIO(jpg)).size == (bw, bh)
    assert out["bucket_w"][0] > out["bucket_h"][0] and out["bucket_h"][1] > out["bucket_w"][1]
    assert out["bucket_h"][2] == out["bucket_w"][2]


def test_clip_chunks_long_captions_and_scores_every_chunk(zoo):
    from curation.clip_score import ClipScorer, chunk_caption, count_tokens

    scorer = ClipScorer(zoo.clip_model, zoo.clip_pretrained, device="cpu")
    ctx = scorer.context_length
    long = " ".join(f"word{i} red circle" for i in range(60))
    chunks = chunk_caption(scorer.tokenizer, long, ctx)
    assert len(chunks) > 1 and " ".join(chunks) == long
    assert all(count_tokens(scorer.tokenizer, c) <= ctx for c in chunks)
    assert chunk_caption(scorer.tokenizer, "a red circle", ctx) == ["a red circle"]
    img = np.asarray(Image.new("RGB", (96, 64), (20, 200, 40)))
    feats = scorer.image_features([img, img, img])
    s = scorer.score(feats, [long, "a red circle", ""])
    per_chunk = scorer.score(scorer.image_features([img] * len(chunks)), chunks)
    assert s[0] == pytest.approx(float(np.mean(per_chunk)), abs=1e-4)
    assert math.isfinite(s[1]) and -100 <= s[1] <= 100 and math.isnan(s[2])


def test_encode_stage_latents(zoo):
    import torch

    from curation.encode import EncodeStage
    from sana_core.autoencoder import Autoencoder

    stage = EncodeStage(zoo.dcae, device="cpu", dtype="float32")
    rng = np.random.default_rng(0)
    imgs = [rng.integers(0, 256, (64, 128, 3), dtype=np.uint8), rng.integers(0, 256, (96, 64, 3), dtype=np.uint8),
            rng.integers(0, 256, (64, 128, 3), dtype=np.uint8)]
    out = stage({"image": np.array(imgs + [None], object)[:3]})
    shapes = [z.shape for z in out["latent"]]
    assert shapes == [(32, 2, 4), (32, 3, 2), (32, 2, 4)] and all(z.dtype == np.float16 for z in out["latent"])
    ae = Autoencoder.from_pretrained(zoo.dcae)
    with torch.no_grad():
        ref = ae.encode(torch.from_numpy(imgs[1]).permute(2, 0, 1)[None].float() / 127.5 - 1)[0].numpy()
    np.testing.assert_allclose(out["latent"][1].astype(np.float32), ref, rtol=2e-3, atol=2e-3)
    assert out["latent_scaling_factor"][0] == pytest.approx(ae.scaling_factor)


# ---------------------------------------------------------------------------------------------- the guard

class _FakeCaptioner:
    """Stands in for a model stage only to feed the guard chosen outputs (the real stages are tested above
    and in test_caption.py / test_curation.py)."""

    def __call__(self, batch):
        caps = np.array(["a caption" if k != "k2" else "   " for k in batch["key"]], dtype=object)
        return dict(batch, caption__v=caps, caption_error__v=np.array([""] * len(caps), object))


def test_guard_runs_live_rows_only_and_rejects_bad_outputs():
    from curation.pipeline import guarded_call

    batch = {"key": np.array(["k0", "k1", "k2"], object), "reject": np.array(["", "truncated", ""], object),
             "detail": np.array(["", "cut", ""], object)}
    out = guarded_call(_FakeCaptioner(), "caption:v", batch, {"caption__v": "", "caption_error__v": ""})
    assert list(out["reject"]) == ["", "truncated", "caption_failed"]
    assert out["detail"][1] == "cut" and "caption:v" in out["detail"][2]
    assert out["caption__v"][0] == "a caption" and out["caption__v"][1] == ""
    assert out["t__caption:v"][1] == 0 and out["t__caption:v"][0] > 0


# ---------------------------------------------------------------------------------------------- writer

def _sample(i: int, vlms=("a", "b")) -> dict:
    return dict(key=f"{i:032x}", source=f"/img/{i}.jpg", sha256="0" * 64, width=100, height=80, bucket_h=64,
                bucket_w=96, captions={v: f"caption {i} {v}" for v in vlms},
                clip_scores={v: 20.0 + i for v in vlms}, latent=np.full((32, 2, 3), i, np.float16),
                latent_scaling_factor=0.41, jpg=b"\xff\xd8fake")


def test_writer_commit_protocol_and_recovery(tmp_path):
    from curation.writer import ShardWriter

    w = ShardWriter(tmp_path, 2, ["a", "b"], "clip")
    for i in range(5):
        w.add(_sample(i))
    w.reject([dict(key="r" * 32, source="/img/bad.jpg", reason="truncated", detail="cut")])
    assert sorted(p.name for p in (tmp_path / "shards").iterdir()) == ["shard-000000.tar", "shard-000001.tar"]
    # a crash now: sample 4 is buffered (lost, to redo); also fake the states a kill can leave behind
    (tmp_path / "shards" / ".shard-000002.tar.tmp").write_bytes(b"partial")
    (tmp_path / "parts" / ".part-000002.parquet.tmp").write_bytes(b"partial")
    (tmp_path / "parts" / "part-000001.parquet").unlink()  # shard 1 renamed, its part never committed
    w2 = ShardWriter(tmp_path, 2, ["a", "b"], "clip")
    assert w2.removed_orphans == 1 and w2.next_shard == 1
    assert w2.done_keys == {_sample(0)["key"], _sample(1)["key"], "r" * 32}
    assert not [p for d in ("shards", "parts") for p in (tmp_path / d).iterdir() if p.name.endswith(".tmp")]
    for i in (2, 3, 4):
        w2.add(_sample(i))
    assert w2.close() == (5, 1)
    man = pq.read_table(tmp_path / "manifest.parquet").to_pylist()
    assert sorted(m["key"] for m in man) == sorted(_sample(i)["key"] for i in range(5))
    assert man[0]["vlms"] == ["a", "b"] and man[0]["captions"] == ["caption 0 a", "caption 0 b"]
    with tarfile.open(tmp_path / "shards" / "shard-000002.tar") as tf:
        names = tf.getnames()
        meta = json.loads(tf.extractfile(f"{_sample(4)['key']}.json").read())
    assert sorted(names) == sorted(f"{_sample(4)['key']}.{e}" for e in ("json", "latent.npy", "jpg"))
    assert meta["latent_shape"] == [32, 2, 3] and meta["bucket"] == [64, 96] and meta["clip_model"] == "clip"


# ---------------------------------------------------------------------------------------------- run checks

def test_config_hash_ignores_resources_not_results():
    from curation.config import config_hash, preset

    a = preset("tiny")
    b = preset("tiny")
    b.clip.resources.concurrency = 7
    b.vlms["llava"].concurrency = 3
    b.vlms["llava"].batch_size = 2
    assert config_hash(a, "/in") == config_hash(b, "/in")
    b.vlms["llava"].prompt = "Another prompt."
    assert config_hash(a, "/in") != config_hash(b, "/in")
    assert config_hash(a, "/in") != config_hash(a, "/other")


def test_output_of_another_config_is_refused_or_replaced(tmp_path):
    from curation.pipeline import prepare_output

    (tmp_path / "shards").mkdir()
    (tmp_path / "shards" / "shard-000000.tar").write_bytes(b"x")
    (tmp_path / "run.json").write_text(json.dumps({"config_hash": "aaa", "attempts": 1}))
    assert prepare_output(tmp_path, "aaa", new_output=False)["attempts"] == 1
    with pytest.raises(SanaError, match="--new-output"):
        prepare_output(tmp_path, "bbb", new_output=False)
    assert (tmp_path / "shards" / "shard-000000.tar").exists()
    assert prepare_output(tmp_path, "bbb", new_output=True) is None
    assert not (tmp_path / "shards").exists() and not (tmp_path / "run.json").exists()


def test_curate_cli_help_and_bad_config(tmp_path, capsys):
    from jobs.curate import main

    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0 and "--new-output" in capsys.readouterr().out
    with pytest.raises(SystemExit) as e:
        main(["--input", str(tmp_path), "--output", str(tmp_path / "o"), "--preset", "tiny",
              "--set", "writer.samples_per_shrd=3"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "samples_per_shrd" in err and len(err.strip().splitlines()) == 1
