"""The captioning stage with real vLLM engines on the CPU, one per zoo VLM (each started once).

Each engine start takes 30-90 s on 2 cores, so every per-VLM check runs against one engine in one test.
"""
from __future__ import annotations

import gc

import numpy as np
import pytest
from PIL import Image, ImageDraw

from curation.caption import VLMCaptioner, VLMConfig, caption_error_column, check_model_path
from curation.stage import caption_column
from sana_core.config import load_config
from sana_core.errors import SanaError

VLM_NAMES = ["llava", "qwen2vl", "idefics3", "gemma3"]


def _images() -> list[np.ndarray]:
    """Drawn shapes on coloured backgrounds, at different sizes (the stage sees a ragged object column)."""
    out = []
    for i, (h, w) in enumerate([(64, 64), (64, 96), (96, 64), (32, 128)]):
        im = Image.new("RGB", (w, h), (40 * i, 200 - 30 * i, 90))
        d = ImageDraw.Draw(im)
        d.ellipse([w // 4, h // 4, 3 * w // 4, 3 * h // 4], fill=(250, 250, 20 * i))
        d.rectangle([2, 2, w // 3, h // 3], fill=(10, 10, 240))
        out.append(np.asarray(im))
    return out


def _object_column(arrays: list[np.ndarray]) -> np.ndarray:
    col = np.empty(len(arrays), dtype=object)
    col[:] = arrays
    return col


def _tiny_cfg(name: str, folder: str) -> VLMConfig:
    return load_config(VLMConfig, preset={"name": name, "model": folder},
                       overrides=["max_tokens=12", "max_model_len=512", "max_num_seqs=8", "enforce_eager=true",
                                  "dtype=float32", "prompt=Describe this image in one sentence."])


@pytest.mark.slow
@pytest.mark.parametrize("name", VLM_NAMES)
def test_vlm_captions_through_vllm(zoo, name):
    cap = VLMCaptioner(_tiny_cfg(name, zoo.vlms[name]))
    try:
        images = _images()
        batch = {"key": np.array([f"k{i}" for i in range(len(images))]), "image": _object_column(images)}
        out = cap(batch)
        caps, errs = out[caption_column(name)], out[caption_error_column(name)]
        assert list(out["key"]) == list(batch["key"])
        assert len(caps) == len(images)
        for c, e in zip(caps, errs):
            assert isinstance(c, str) and c and c == c.strip(), (c, e)
            assert e == ""
        # greedy decoding: the same image gives the same caption
        again = cap({"image": _object_column(images[:1])})[caption_column(name)]
        assert again[0] == caps[0]
        # a broken input fails on its own, visibly (None + a reason), the rest of the batch is captioned
        broken = _object_column([images[0], np.zeros((0, 0, 3), np.uint8), images[1]])
        out = cap({"image": broken})
        caps2, errs2 = out[caption_column(name)], out[caption_error_column(name)]
        assert caps2[1] is None and errs2[1]
        assert caps2[0] == caps[0] and caps2[2] == caps[1] and errs2[0] == errs2[2] == ""
    finally:
        cap.close()
        del cap
        gc.collect()


def test_missing_model_folder_is_one_line(tmp_path):
    missing = tmp_path / "no-such-vlm"
    with pytest.raises(SanaError) as e:
        check_model_path(VLMConfig(name="x", model=str(missing)))
    assert str(missing) in str(e.value) and "\n" not in str(e.value)
    (tmp_path / "empty").mkdir()
    with pytest.raises(SanaError, match="config.json"):
        VLMCaptioner({"name": "x", "model": str(tmp_path / "empty")})


def test_resources_follow_config():
    cfg = VLMConfig(name="q", model="Qwen/Qwen2.5-VL-7B-Instruct", num_gpus=2, tensor_parallel_size=2,
                    concurrency=3, batch_size=32)
    kw = VLMCaptioner.map_batches_kwargs(cfg.resources(), cfg=cfg)
    assert kw["num_gpus"] == 2 and kw["compute"].min_size == kw["compute"].max_size == 3 and kw["batch_size"] == 32
    assert kw["fn_constructor_kwargs"] == {"cfg": cfg}
    with pytest.raises(SanaError, match="tensor_parallel_size"):
        VLMConfig(name="q", model="m", num_gpus=1, tensor_parallel_size=2).resources()


@pytest.mark.slow
def test_captioner_as_ray_data_actor(zoo):
    """The stage as the pipeline runs it: a Ray Data actor pool sized from the VLM's config."""
    import ray

    cfg = _tiny_cfg("llava", zoo.vlms["llava"])
    cfg.batch_size, cfg.num_cpus = 3, 1.0
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        images = _images()
        ds = ray.data.from_items([{"key": f"k{i}", "image": im} for i, im in enumerate(images)])
        ds = ds.map_batches(VLMCaptioner, **VLMCaptioner.map_batches_kwargs(cfg.resources(), cfg=cfg))
        rows = sorted(ds.take_all(), key=lambda r: r["key"])
    finally:
        ray.shutdown()
    assert [r["key"] for r in rows] == [f"k{i}" for i in range(len(images))]
    for r in rows:
        assert isinstance(r[caption_column("llava")], str) and r[caption_column("llava")]
        assert r[caption_error_column("llava")] == ""
