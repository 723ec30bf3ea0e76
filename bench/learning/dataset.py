"""A synthetic, caption-conditioned latent dataset whose every sample is fully described by its caption.

A sample is a (32, g, g) latent holding one object on a quiet background:

    colour   -> which of 4 channel groups (8 channels each) carries the object's signal
    position -> which quadrant of the grid the object sits in
    size     -> "large" fills its quadrant; "small" is a (g/4 x g/4) block placed anywhere inside it

Everything else is noise the model has to learn as a distribution: the object's amplitude, each channel's
gain inside the group, where a small object sits in its quadrant, and a Gaussian background on all channels.
So a model that ignores the text can at best draw a random object (chance: 1/4 colour, 1/4 position,
1/2 size, 1/32 joint), and one that reads the caption draws the right one.

Shards follow docs/data_contract.md exactly (KEY.json + KEY.latent.npy float16, manifest.parquet,
rejected.parquet, run.json), so training reads them through its real WebDataset loader. Each sample carries
captions from three fake "VLMs" with CLIP-like scores: a canonical caption, a paraphrase, and a third
captioner that is wrong part of the time -- and then scores low -- so a CLIP-score caption sampler matters.
"""
from __future__ import annotations

import hashlib
import io
import itertools
import json
import os
import re
import tarfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from sana_core.errors import SanaError

CHANNELS = 32
GROUPS = 4  # channel groups: a "colour" is which group carries the signal
GROUP_SIZE = CHANNELS // GROUPS
COLOURS = ("red", "green", "blue", "yellow")
POSITIONS = ("top left", "top right", "bottom left", "bottom right")
SIZES = ("small", "large")
ATTRIBUTES = ("colour", "position", "size")
CHANCE = {"colour": 1 / len(COLOURS), "position": 1 / len(POSITIONS), "size": 1 / len(SIZES),
          "joint": 1 / (len(COLOURS) * len(POSITIONS) * len(SIZES))}

# Signal levels. The scorer thresholds at half the smallest amplitude, far above the background.
AMPLITUDE = (1.2, 1.8)  # per-sample object amplitude, uniform
CHANNEL_JITTER = 0.25  # per-channel relative gain noise inside the object's group
BACKGROUND_STD = 0.15
SCORE_THRESHOLD = 0.6  # on the per-cell group mean; see scorer.py

VLMS = ("vlm-canonical", "vlm-paraphrase", "vlm-sloppy")
CLIP_MODEL = "synthetic-clip (bench.learning: scores are a function of caption correctness)"
SCALING_FACTOR = 1.0  # the latents are synthetic: nothing to scale


@dataclass(frozen=True)
class Attributes:
    colour: str
    position: str
    size: str

    def as_dict(self) -> dict[str, str]:
        return asdict(self)


def all_attributes() -> list[Attributes]:
    return [Attributes(c, p, s) for c, p, s in itertools.product(COLOURS, POSITIONS, SIZES)]


def caption(a: Attributes) -> str:
    """The canonical caption; the test prompts use this phrasing."""
    return f"a {a.size} {a.colour} square in the {a.position}"


_PARAPHRASES = (
    "{size} {colour} block, {position} corner",
    "the {position} holds a {size} {colour} square",
    "a {colour} square, {size}, placed in the {position}",
    "{position}: one {size} {colour} patch",
)


def paraphrase(a: Attributes, rng: np.random.Generator) -> str:
    pos = a.position.replace(" ", "-") if rng.random() < 0.5 else a.position
    return _PARAPHRASES[rng.integers(len(_PARAPHRASES))].format(size=a.size, colour=a.colour, position=pos)


def _wrong(a: Attributes, rng: np.random.Generator) -> Attributes:
    """Same object with one attribute swapped: a plausible captioning mistake."""
    which = ATTRIBUTES[rng.integers(len(ATTRIBUTES))]
    choices = {"colour": COLOURS, "position": POSITIONS, "size": SIZES}[which]
    other = [v for v in choices if v != getattr(a, which)]
    return Attributes(**{**a.as_dict(), which: other[rng.integers(len(other))]})


def object_box(a: Attributes, grid: int, rng: np.random.Generator) -> tuple[int, int, int, int]:
    """(row0, col0, rows, cols) of the object; small objects sit at a random place inside the quadrant."""
    q = grid // 2
    qi = POSITIONS.index(a.position)
    r0, c0 = (qi // 2) * q, (qi % 2) * q
    if a.size == "large":
        return r0, c0, q, q
    s = small_side(grid)
    dr, dc = rng.integers(0, q - s + 1, size=2)
    return r0 + int(dr), c0 + int(dc), s, s


def small_side(grid: int) -> int:
    return max(1, grid // 4)


def render(a: Attributes, grid: int, rng: np.random.Generator) -> np.ndarray:
    """One (32, grid, grid) float32 latent for `a`, with fresh per-sample noise."""
    if grid < 4 or grid % 2:
        raise SanaError(f"latent grid must be even and >= 4, got {grid}")
    x = rng.normal(0.0, BACKGROUND_STD, size=(CHANNELS, grid, grid))
    r0, c0, h, w = object_box(a, grid, rng)
    g = COLOURS.index(a.colour)
    amp = rng.uniform(*AMPLITUDE)
    gains = 1.0 + CHANNEL_JITTER * rng.standard_normal(GROUP_SIZE)
    x[g * GROUP_SIZE:(g + 1) * GROUP_SIZE, r0:r0 + h, c0:c0 + w] += (amp * gains)[:, None, None]
    return x.astype(np.float32)


def sample_key(source: str) -> str:
    return hashlib.sha256(source.encode()).hexdigest()[:32]


def omit_words(text: str, attribute: str | None) -> str:
    """The caption without any word of one attribute (colour or size): the object still varies in it, but no
    caption says how (bench.learning.lora pre-trains on such captions)."""
    if attribute is None:
        return text
    words = {"colour": COLOURS, "size": SIZES}[attribute]
    return re.sub(r"\s+", " ", re.sub(rf"\b({'|'.join(words)})\b,?", "", text)).strip(" ,")


def _record(a: Attributes, key: str, source: str, grid: int, latent: np.ndarray,
            rng: np.random.Generator, sloppy_rate: float, omit: str | None = None) -> dict:
    wrong = rng.random() < sloppy_rate
    captions = {
        "vlm-canonical": caption(a),
        "vlm-paraphrase": paraphrase(a, rng),
        "vlm-sloppy": paraphrase(_wrong(a, rng), rng) if wrong else paraphrase(a, rng),
    }
    captions = {k: omit_words(v, omit) for k, v in captions.items()}
    # CLIP-like cosine x 100: right captions ~31, paraphrases a little lower, wrong ones far lower.
    scores = {
        "vlm-canonical": 31.0 + rng.normal(0, 1.0),
        "vlm-paraphrase": 29.5 + rng.normal(0, 1.0),
        "vlm-sloppy": (17.0 if wrong else 29.0) + rng.normal(0, 1.0),
    }
    px = grid * 32
    return {
        "key": key, "source": source, "sha256": hashlib.sha256(latent.tobytes()).hexdigest(),
        "width": px, "height": px, "bucket": [px, px], "latent_shape": [CHANNELS, grid, grid],
        "latent_scaling_factor": SCALING_FACTOR, "captions": captions,
        "clip_scores": {k: round(float(v), 3) for k, v in scores.items()}, "clip_model": CLIP_MODEL,
        # Extra field (the contract allows readers to ignore unknown fields): the ground truth.
        "attributes": a.as_dict(), "sloppy_caption_wrong": bool(wrong),
    }


def _npy_bytes(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, arr)
    return buf.getvalue()


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    # mtime 0 like curation.writer's shards: the same seed writes the same bytes (the build time made two builds
    # differ whenever they straddled a second)
    info.size, info.mtime, info.mode = len(data), 0, 0o644
    tar.addfile(info, io.BytesIO(data))


@dataclass
class DatasetInfo:
    root: str
    grid: int
    samples: int
    shards: int
    seed: int
    sloppy_rate: float
    seconds: float


def build_dataset(root: str | Path, n: int = 4096, grid: int = 8, seed: int = 0,
                  samples_per_shard: int = 1024, sloppy_rate: float = 0.5, omit: str | None = None) -> DatasetInfo:
    """Write `n` samples (balanced over the 32 attribute combinations) as a curated dataset folder; `omit`
    ("colour" / "size") leaves that attribute's words out of every caption."""
    if omit not in (None, "colour", "size"):
        raise SanaError(f"omit must be colour or size (position words are also the grid's), got {omit!r}")
    import pyarrow as pa
    import pyarrow.parquet as pq

    if n < 1:
        raise SanaError(f"dataset size must be >= 1, got {n}")
    t0 = time.time()
    root = Path(root)
    shard_dir = root / "shards"
    shard_dir.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    combos = all_attributes()
    order = np.concatenate([rng.permutation(len(combos)) for _ in range(-(-n // len(combos)))])[:n]
    rows: dict[str, list] = {k: [] for k in ("key", "shard", "source", "sha256", "width", "height", "bucket_h",
                                              "bucket_w", "vlms", "captions", "clip_scores")}
    n_shards = -(-n // samples_per_shard)
    for s in range(n_shards):
        name = f"shard-{s:06d}.tar"
        tmp = shard_dir / f".{name}.tmp"
        with tarfile.open(tmp, "w") as tar:
            for i in range(s * samples_per_shard, min(n, (s + 1) * samples_per_shard)):
                a = combos[order[i]]
                source = f"synthetic://bench.learning/seed{seed}/grid{grid}/{i}"
                key = sample_key(source)
                latent = render(a, grid, rng).astype(np.float16)
                rec = _record(a, key, source, grid, latent, rng, sloppy_rate, omit)
                _add(tar, f"{key}.json", json.dumps(rec).encode())
                _add(tar, f"{key}.latent.npy", _npy_bytes(latent))
                for col, v in (("key", key), ("shard", name), ("source", source), ("sha256", rec["sha256"]),
                               ("width", rec["width"]), ("height", rec["height"]), ("bucket_h", rec["bucket"][0]),
                               ("bucket_w", rec["bucket"][1]), ("vlms", list(rec["captions"])),
                               ("captions", list(rec["captions"].values())),
                               ("clip_scores", [rec["clip_scores"][v] for v in rec["captions"]])):
                    rows[col].append(v)
        os.replace(tmp, shard_dir / name)
    schema = pa.schema([("key", pa.string()), ("shard", pa.string()), ("source", pa.string()),
                        ("sha256", pa.string()), ("width", pa.int32()), ("height", pa.int32()),
                        ("bucket_h", pa.int32()), ("bucket_w", pa.int32()), ("vlms", pa.list_(pa.string())),
                        ("captions", pa.list_(pa.string())), ("clip_scores", pa.list_(pa.float32()))])
    pq.write_table(pa.table(rows, schema=schema), root / "manifest.parquet")
    pq.write_table(pa.table({"source": [], "reason": [], "detail": []},
                            schema=pa.schema([("source", pa.string()), ("reason", pa.string()),
                                              ("detail", pa.string())])), root / "rejected.parquet")
    info = DatasetInfo(root=str(root), grid=grid, samples=n, shards=n_shards, seed=seed, sloppy_rate=sloppy_rate,
                       seconds=round(time.time() - t0, 3))
    (root / "run.json").write_text(json.dumps({
        "generator": "bench.learning.dataset", "config": asdict(info), "vlms": list(VLMS),
        "clip_model": CLIP_MODEL, "counts": {"inputs": n, "accepted": n, "rejected": 0},
        "timings": {"total_s": info.seconds}}, indent=2))
    return info


def eval_prompts(repeats: int = 2) -> list[tuple[str, Attributes]]:
    """Every attribute combination `repeats` times, canonical phrasing: (prompt, ground truth)."""
    return [(caption(a), a) for _ in range(repeats) for a in all_attributes()]
