"""Small data-contract shards written with webdataset.TarWriter, for tests and the loader benchmark."""
from __future__ import annotations

import hashlib
import io
import json
from pathlib import Path

import numpy as np
import webdataset as wds

VLMS = ("vlm-a", "vlm-b", "vlm-c")


def sample_key(source: str) -> str:
    return hashlib.sha256(source.encode()).hexdigest()[:32]


def write_shards(out: str | Path, n: int = 48, per_shard: int = 12, channels: int = 32,
                 grids: tuple[tuple[int, int], ...] = ((4, 4), (4, 8)), seed: int = 0,
                 nan_keys: int = 0, no_caption: int = 0) -> list[dict]:
    """Write `n` samples into OUTPUT/shards/; return their json records (key, latent_shape, captions...).

    Latents are random with a caption-dependent mean (so a text-conditioned model can lower the loss below
    an unconditional one); sample i gets grid grids[i % len(grids)]. The first `nan_keys` samples carry a
    NaN in their latent; the next `no_caption` have no finite CLIP score at all.
    """
    rng = np.random.default_rng(seed)
    shards = Path(out) / "shards"
    shards.mkdir(parents=True, exist_ok=True)
    records, writer = [], None
    for i in range(n):
        if i % per_shard == 0:
            if writer is not None:
                writer.close()
            writer = wds.TarWriter(str(shards / f"shard-{i // per_shard:06d}.tar"))
        source = f"synthetic/{seed}/{i}.png"
        key = sample_key(source)
        h, w = grids[i % len(grids)]
        cls = i % 4
        latent = (rng.standard_normal((channels, h, w)) * 0.5 + (cls - 1.5)).astype(np.float16)
        if i < nan_keys:
            latent[0, 0, 0] = np.nan
        captions = {v: f"{v} says class {cls} image {i}" for v in VLMS}
        scores = {v: float(s) for v, s in zip(VLMS, rng.uniform(20, 35, len(VLMS)))}
        if nan_keys <= i < nan_keys + no_caption:
            scores = {VLMS[0]: float("nan")}
        rec = {"key": key, "source": source, "sha256": hashlib.sha256(source.encode()).hexdigest(),
                   "width": w * 32, "height": h * 32, "bucket": [h * 32, w * 32], "latent_shape": [channels, h, w],
                   "latent_scaling_factor": 1.0, "captions": captions, "clip_scores": scores, "clip_model": "synthetic"}
        buf = io.BytesIO()
        np.save(buf, latent)
        writer.write({"__key__": key, "json": json.dumps(rec).encode(), "latent.npy": buf.getvalue()})
        records.append(rec)
    if writer is not None:
        writer.close()
    return records
