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
                 nan_keys: int = 0, no_caption: int = 0, huge_keys: int = 0) -> list[dict]:
    """Write `n` samples into OUTPUT/shards/; return their json records (key, latent_shape, captions...).

    Latents are random with a caption-dependent mean (so a text-conditioned model can lower the loss below
    an unconditional one); sample i gets grid grids[i % len(grids)]. The first `nan_keys` samples carry a
    NaN in their latent (the loader skips them); the next `no_caption` have no finite CLIP score at all. The
    first `huge_keys` hold a finite float32 latent of 1e30, which the loader passes and whose loss overflows.
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
        if i < huge_keys:
            latent = np.full(latent.shape, 1e30, np.float32)
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


def write_bad_shards(out: str | Path, seed: int = 0, channels: int = 32) -> dict:
    """Add to OUTPUT/shards/ one shard of each kind a loader must survive, named after the good ones:
    shard-900000.tar truncated in the middle (its first samples readable), shard-900001.tar empty (0 bytes),
    shard-900002.tar not a tar, and shard-900003.tar holding 2 good samples beside one with a NaN latent, one
    whose latent disagrees with its json latent_shape and one without latent.npy. Returns the bad shard names,
    the bad sample keys and the keys of the good samples among them."""
    import tarfile
    import tempfile
    shards = Path(out) / "shards"
    shards.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        recs = write_shards(tmp, n=12, per_shard=12, channels=channels, seed=seed + 1000)
        raw = (Path(tmp) / "shards" / "shard-000000.tar").read_bytes()
    cut = raw[: len(raw) // 2 + 700]  # inside a member's data: "unexpected end of data"
    (shards / "shard-900000.tar").write_bytes(cut)
    readable = []
    try:
        for s in wds.tarfile_samples([{"url": str(shards / "shard-900000.tar")}]):
            readable.append(s["__key__"])
    except tarfile.TarError:
        pass
    assert 0 < len(readable) < len(recs)
    (shards / "shard-900001.tar").write_bytes(b"")
    (shards / "shard-900002.tar").write_bytes(np.random.default_rng(seed).bytes(5000))
    with tempfile.TemporaryDirectory() as tmp:
        write_shards(tmp, n=5, per_shard=5, channels=channels, seed=seed + 2000, nan_keys=1)
        members = list(wds.tarfile_samples([{"url": str(Path(tmp) / "shards" / "shard-000000.tar")}]))
    wrong, missing = members[1], members[2]
    rec = json.loads(wrong["json"])
    rec["latent_shape"] = [channels, 8, 8] if rec["latent_shape"][1:] != [8, 8] else [channels, 4, 4]
    wrong["json"] = json.dumps(rec).encode()
    del missing["latent.npy"]
    with wds.TarWriter(str(shards / "shard-900003.tar")) as w:
        for m in members:
            w.write({k: v for k, v in m.items() if not k.startswith("__") or k == "__key__"})
    return {"bad_shards": ["shard-900000.tar", "shard-900001.tar", "shard-900002.tar"],
            "bad_samples": [m["__key__"] for m in members[:3]],
            "good": readable + [m["__key__"] for m in members[3:]]}
