"""Curation stages one by one, without Ray or vLLM: inputs, validation and conversion of every image mode to
sRGB RGB (checked pixel by pixel against reference conversions), resize, CLIP scoring, DC-AE encoding, the guard
that turns bad outputs into rejections, the exactly-once shard writer and the run's config checks.
"""
from __future__ import annotations

import io
import json
import math
import re
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image, ImageCms

from curation.read import key_of, list_inputs, read_bytes
from curation.testdata import make_image_folder
from curation.validate import DecodeStage, Rejected, decode
from sana_core.errors import SanaError

EXTS = [".jpg", ".jpeg", ".png", ".gif"]
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
    out = DecodeStage(**TINY)(_batch(items))  # the default policy converts special modes
    got = {s: r for s, r in zip(out["source"], out["reject"]) if r}
    assert got == expected.rejected and expected.converted
    for s, r, d, img, mode in zip(out["source"], out["reject"], out["detail"], out["image"], out["mode"]):
        if r:
            assert img is None and d and "\n" not in d and mode == ""
        else:
            assert img.mode == "RGB" and img.size == Image.open(s).size
            assert mode == expected.converted.get(s, Image.open(s).mode)
    # special_modes=reject keeps only plain modes
    out = DecodeStage(special_modes="reject", **TINY)(_batch(items))
    got = {s: r for s, r in zip(out["source"], out["reject"]) if r}
    assert got == {**expected.rejected, **{p: "unsupported_mode" for p in expected.converted}}


def _png(img: Image.Image, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "PNG", **kw)
    return buf.getvalue()


def _composite(rgb: np.ndarray, alpha: np.ndarray, bg) -> np.ndarray:
    """Reference alpha compositing in 8-bit sRGB (what browsers show)."""
    a = alpha.astype(np.float64)[..., None] / 255.0
    return rgb.astype(np.float64) * a + np.asarray(bg, np.float64) * (1 - a)


@pytest.mark.parametrize("bg", [(255, 255, 255), (10, 120, 250)])
def test_palette_with_transparency_composited_over_the_background(bg):
    pal = [255, 0, 0, 0, 0, 255, 0, 200, 0] + [0] * (256 * 3 - 9)  # 0 red (transparent), 1 blue, 2 green (half)
    idx = np.zeros((40, 60), np.uint8)
    idx[:, 20:40], idx[:, 40:] = 1, 2
    img = Image.fromarray(idx, "P")
    img.putpalette(pal)
    d = decode(_png(img, transparency=bytes([0, 255, 128])), background=bg, **TINY)
    a = np.asarray(d.image).astype(int)
    assert d.mode == "P+transparency"
    assert a[5, 5].tolist() == list(bg) and a[5, 30].tolist() == [0, 0, 255]
    np.testing.assert_allclose(a[5, 50], _composite(np.array([0, 200, 0]), np.array(128), bg), atol=1)
    # the GIF form of palette transparency: one transparent index
    buf = io.BytesIO()
    img.save(buf, "GIF", transparency=0)
    g = decode(buf.getvalue(), background=bg, **TINY)
    assert g.mode == "P+transparency" and np.asarray(g.image)[5, 5].tolist() == list(bg)
    assert np.asarray(g.image)[5, 30].tolist() == [0, 0, 255]


@pytest.mark.parametrize("mode", ["RGBA", "LA"])
def test_alpha_images_composited_over_the_background(mode):
    rng = np.random.default_rng(3)
    bg = (30, 60, 90)
    colour = rng.integers(0, 256, (48, 64, 3 if mode == "RGBA" else 1), dtype=np.uint8)
    alpha = rng.integers(0, 256, (48, 64), dtype=np.uint8)
    alpha[0, 0], alpha[0, 1] = 0, 255
    arr = np.concatenate([colour, alpha[..., None]], axis=2)
    d = decode(_png(Image.fromarray(arr, mode)), background=bg, **TINY)
    got = np.asarray(d.image).astype(np.float64)
    ref = _composite(np.repeat(colour, 3, axis=2) if mode == "LA" else colour, alpha, bg)
    assert d.mode == mode and np.abs(got - ref).max() <= 1
    assert got[0, 0].tolist() == list(bg) and got[0, 1].tolist() == np.broadcast_to(colour[0, 1], 3).tolist()


def test_high_bit_depth_scaled_to_8_bits():
    rng = np.random.default_rng(4)
    g16 = rng.integers(0, 65536, (40, 50), dtype=np.uint16)
    g16[0, 0], g16[0, 1] = 0, 65535
    d = decode(_png(Image.fromarray(g16)), **TINY)
    assert d.mode == "I;16"
    ref = np.round(g16 / 65535.0 * 255).astype(np.uint8)
    np.testing.assert_array_equal(np.asarray(d.image), np.repeat(ref[..., None], 3, axis=2))
    # 32-bit integer and float TIFFs
    for values in ([-2**31, 0, 2**31 - 1], [0, 2**30, 2**31 - 1]):  # signed, and beyond 16 bits
        i32 = np.repeat(np.array(values, np.int32), 16)[None].repeat(40, axis=0)
        buf = io.BytesIO()
        Image.fromarray(i32, "I").save(buf, "TIFF")
        d = decode(buf.getvalue(), **TINY)
        assert d.mode == "I" and np.asarray(d.image)[0, ::16, 0].tolist() == [0, 128, 255], values
    f = np.linspace(0, 1, 40 * 40, dtype=np.float32).reshape(40, 40)
    buf = io.BytesIO()
    Image.fromarray(f, "F").save(buf, "TIFF")
    d = decode(buf.getvalue(), **TINY)
    assert d.mode == "F" and np.asarray(d.image)[0, 0, 0] == 0 and np.asarray(d.image)[-1, -1, 0] == 255


def _cmyk_blocks() -> Image.Image:
    """Flat blocks of pure inks (JPEG keeps block centres nearly exact): white, C, M, Y, K."""
    img = Image.new("CMYK", (5 * 32, 32), (0, 0, 0, 0))
    for i, ink in enumerate([(0, 0, 0, 0), (255, 0, 0, 0), (0, 255, 0, 0), (0, 0, 255, 0), (0, 0, 0, 255)]):
        img.paste(ink, (32 * i, 0, 32 * i + 32, 32))
    return img


def test_cmyk_without_profile_plain_conversion():
    buf = io.BytesIO()
    _cmyk_blocks().save(buf, "JPEG", quality=95)
    d = decode(buf.getvalue(), **TINY)
    assert d.mode == "CMYK"
    ref = np.asarray(Image.open(io.BytesIO(buf.getvalue())).convert("RGB")).astype(int)
    got = np.asarray(d.image).astype(int)
    np.testing.assert_array_equal(got, ref)
    plain = [[255, 255, 255], [0, 255, 255], [255, 0, 255], [255, 255, 0], [0, 0, 0]]
    for i, rgb in enumerate(plain):
        assert np.abs(got[16, 32 * i + 16] - rgb).max() <= 6, (i, got[16, 32 * i + 16])


def test_cmyk_with_icc_profile_converted_through_it():
    from curation.testdata import cmyk_icc_profile, swapped_cmyk

    profile = cmyk_icc_profile(swapped_cmyk)  # cyan ink shows as yellow, yellow ink as cyan
    buf = io.BytesIO()
    _cmyk_blocks().save(buf, "JPEG", quality=95, icc_profile=profile)
    d = decode(buf.getvalue(), **TINY)
    assert d.mode == "CMYK+icc"
    got = np.asarray(d.image).astype(int)
    src = Image.open(io.BytesIO(buf.getvalue()))
    ref = ImageCms.profileToProfile(src, ImageCms.ImageCmsProfile(io.BytesIO(profile)),
                                    ImageCms.createProfile("sRGB"), outputMode="RGB")
    assert np.abs(got - np.asarray(ref).astype(int)).max() <= 1
    swapped = [[255, 255, 255], [255, 255, 0], [255, 0, 255], [0, 255, 255], [0, 0, 0]]
    for i, rgb in enumerate(swapped):
        assert np.abs(got[16, 32 * i + 16] - rgb).max() <= 10, (i, got[16, 32 * i + 16])
    # a profile LittleCMS cannot parse: plain conversion, said in the mode
    buf = io.BytesIO()
    _cmyk_blocks().save(buf, "JPEG", quality=95, icc_profile=b"not a profile" * 20)
    bad = decode(buf.getvalue(), **TINY)
    assert bad.mode == "CMYK+icc_invalid" and np.abs(np.asarray(bad.image)[16, 48].astype(int) - [0, 255, 255]).max() <= 6


def test_lab_image_converted_through_the_lab_profile():
    lab = np.array([[[255, 128, 128], [0, 128, 128], [136, 208, 195]]], np.uint8)  # white, black, ~sRGB red
    buf = io.BytesIO()
    Image.fromarray(np.repeat(np.repeat(lab, 16, axis=0), 16, axis=1), "LAB").save(buf, "TIFF")
    a = np.asarray(decode(buf.getvalue(), max_pixels=10**6, min_size=8).image).astype(int)
    assert np.abs(a[0, 0] - 255).max() <= 2 and np.abs(a[0, 16]).max() <= 2
    assert np.abs(a[0, 40] - [255, 0, 0]).max() <= 12


def test_animated_gif_uses_its_first_frame():
    frames = [Image.new("RGB", (48, 40), c) for c in [(0, 255, 0), (255, 0, 0), (0, 0, 255)]]
    buf = io.BytesIO()
    frames[0].save(buf, "GIF", save_all=True, append_images=frames[1:], duration=50, loop=0)
    assert Image.open(io.BytesIO(buf.getvalue())).n_frames == 3
    d = decode(buf.getvalue(), **TINY)
    assert d.mode.endswith("+animated") and (d.width, d.height) == (48, 40)
    assert np.asarray(d.image)[10, 10].tolist() == [0, 255, 0]
    # animated WebP likewise
    buf = io.BytesIO()
    frames[1].save(buf, "WEBP", save_all=True, append_images=frames[2:], lossless=True)
    w = decode(buf.getvalue(), **TINY)
    assert w.mode.endswith("+animated") and np.asarray(w.image)[10, 10].tolist() == [255, 0, 0]


def test_special_modes_reject_policy_and_background_checked():
    for path_mode, img in [("P", Image.new("P", (40, 40))), ("RGBA", Image.new("RGBA", (40, 40))),
                           ("I;16", Image.new("I;16", (40, 40)))]:
        with pytest.raises(Rejected, match=f"unsupported_mode:{re.escape(path_mode)}"):
            decode(_png(img), special_modes="reject", **TINY)
    from curation.config import CurateConfig
    from sana_core.config import load_config

    cfg = load_config(CurateConfig, overrides=["input.background=[0, 0, 0]"])
    assert cfg.input.background == [0, 0, 0] and cfg.input.special_modes == "convert"
    with pytest.raises(SanaError, match="input.background"):
        load_config(CurateConfig, overrides=["input.background=[0, 300, 0]"])


def test_exif_orientation_is_applied():
    img = Image.new("RGB", (64, 40), (10, 20, 30))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 on display
    buf = io.BytesIO()
    img.save(buf, "JPEG", exif=exif)
    d = decode(buf.getvalue(), **TINY)
    assert (d.width, d.height) == (40, 64) and d.mode == "RGB"


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
    out = DecodeStage(**TINY)(_batch(items))
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
    out = DecodeStage(**TINY)(batch)
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

# The writer's commit protocol (retries, sweep, part folders) is tested in tests/test_curation.py
# (test_writer_commit_protocol_retries_and_sweep), beside the cluster-scale pieces it belongs to.


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
    signed = "s3://b/list.parquet?X-Amz-Signature={}&X-Amz-Credential=AKIA/x&v=2"
    assert config_hash(a, signed.format("aaa")) == config_hash(a, signed.format("bbb")) != config_hash(a, "/in")


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
