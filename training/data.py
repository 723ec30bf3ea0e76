"""The WebDataset loader over curation shards (docs/data_contract.md), built for exact resume.

Order of samples, a pure function of (seed, epoch, rank, worker):
  1. each epoch the shard list is permuted with a seed derived from (seed, epoch) -- the same on every rank;
  2. shards are split over the rank x worker streams, n // streams whole shards each; the leftover shards
     are read by every stream, each keeping every streams-th sample, so each sample is read exactly once per
     epoch and streams differ in size by at most one sample per leftover shard;
  3. a seeded shuffle buffer mixes samples inside a stream;
  4. each sample gets its caption from the CLIP-score caption sampler (a function of seed, epoch, key);
  5. samples are grouped per latent shape (aspect-ratio bucket), a full group is a batch, so every batch has
     one shape; at an epoch's end the partial groups are yielded (or dropped: data.drop_last);
  6. epochs repeat forever; the trainer decides when to stop.

The DataLoader hands out batches from its workers strictly in turn, so after T batches the next one comes
from worker T mod W, which has produced ceil((T - w) / W) batches. That count is the whole data position:
a resumed loader renumbers its workers by T mod W and each one regenerates and discards the batches it had
already produced (reading tar members, decoding nothing), so the batch sequence continues exactly. Given the
(epoch, index) of each worker's last consumed batch as well (the trainer saves it), a worker jumps straight
to that epoch, since an epoch's order depends on nothing before it, and re-reads only that epoch's start.
"""
from __future__ import annotations

import hashlib
import io
import itertools
import json
import math
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import webdataset as wds
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from sana_core.errors import SanaError
from training.caption_sampler import CaptionSampler, CaptionSamplerConfig
from training.config import DataConfig


def find_shards(path: str | Path) -> list[Path]:
    """The complete shards of a curation OUTPUT dir or of its shards/ dir, sorted by name."""
    p = Path(path)
    if not p.is_dir():
        raise SanaError(f"--data {p}: no such directory")
    d = p / "shards" if (p / "shards").is_dir() else p
    shards = sorted(d.glob("shard-*.tar"))
    if not shards:
        raise SanaError(f"--data {p}: no shard-*.tar files in {d}")
    return shards


def _seed(*parts: object) -> int:
    return int.from_bytes(hashlib.sha256("/".join(map(str, parts)).encode()).digest()[:8], "little")


def _decode_latent(raw: bytes, key: str) -> np.ndarray:
    try:
        return np.load(io.BytesIO(raw), allow_pickle=False)
    except Exception as e:  # noqa: BLE001 - any unreadable member is the same user-facing problem
        raise SanaError(f"sample {key}: latent.npy is not a readable numpy array ({e})") from None


def peek_latent_shape(shards: list[Path]) -> tuple[tuple[int, ...], str, str]:
    """(latent shape, key, shard name) of the first sample: checked against the model before any step."""
    for sample in wds.tarfile_samples([{"url": str(s)} for s in shards[:1]]):
        if "latent.npy" not in sample:
            raise SanaError(f"{shards[0].name}: sample {sample.get('__key__')} has no latent.npy member")
        arr = _decode_latent(sample["latent.npy"], sample["__key__"])
        return tuple(arr.shape), sample["__key__"], shards[0].name
    raise SanaError(f"{shards[0]}: shard holds no samples")


def check_latent_channels(shards: list[Path], channels: int) -> tuple[int, ...]:
    shape, key, shard = peek_latent_shape(shards)
    if len(shape) != 3 or shape[0] != channels:
        raise SanaError(f"latent shape mismatch: the model expects (C={channels}, h, w), {shard} sample {key} "
                        f"holds {shape}; set model.dit.in_channels to match the shards")
    return shape


@dataclass
class Plan:
    """A batch before decoding: which samples, which captions."""
    epoch: int
    index: int  # batch number inside this worker's epoch
    samples: list[dict]  # raw tar members + the picked caption


class ShardStream(IterableDataset):
    """Infinite iterator of bucketed batches for one rank (see the module docstring for the order)."""

    def __init__(self, shards: list[Path], cfg: DataConfig, caption_cfg: CaptionSamplerConfig,
                 rank: int = 0, world: int = 1, start_batches: int = 0, epochs: int | None = None,
                 positions: dict[int, tuple[int, int]] | None = None):
        self.shards = [str(s) for s in shards]
        self.cfg, self.caption_cfg = cfg, caption_cfg
        self.rank, self.world = rank, world
        self.start_batches = start_batches  # batches of this rank already consumed (the data position)
        # Optional shortcut: worker -> (epoch, index) of its last consumed batch, so a resumed worker starts
        # in that epoch instead of re-reading every earlier one.
        self.positions = positions or {}
        self.epochs = epochs  # None: forever (training); a number: stop after that many (tests, benchmarks)

    # -- order ------------------------------------------------------------------------------------------
    def _stream_samples(self, epoch: int, worker: int, workers: int) -> Iterator[dict]:
        n = len(self.shards)
        perm = np.random.default_rng(_seed(self.cfg.seed, "shards", epoch)).permutation(n)
        ordered = [self.shards[i] for i in perm]
        streams = self.world * workers
        stream = self.rank * workers + worker
        # Balanced split: each stream reads n // streams whole shards; the n % streams shards left over are
        # read by every stream, each keeping every streams-th sample of them. A plain shard split would give
        # some streams one shard more than others: with 10 shards over 8 streams, 2 streams read twice as much
        # as 6, so their epochs last twice as long while every rank takes one batch per step, and the samples
        # of the short streams are trained on twice as often. Here stream sizes differ by at most one sample
        # per leftover shard, and with fewer shards than streams this is the old split by sample.
        full = n // streams * streams
        mine, rest = ordered[:full][stream::streams], ordered[full:]
        raw = itertools.chain(
            wds.tarfile_samples([{"url": u} for u in mine]),
            (s for i, s in enumerate(wds.tarfile_samples([{"url": u} for u in rest])) if i % streams == stream))
        rng = np.random.default_rng(_seed(self.cfg.seed, "buffer", epoch, self.rank, worker))
        buf: list[dict] = []
        for s in raw:
            if len(buf) < max(1, self.cfg.shuffle_buffer):
                buf.append(s)
                continue
            j = int(rng.integers(len(buf)))
            buf[j], s = s, buf[j]
            yield s
        rng.shuffle(buf)
        yield from buf

    def _plans(self, worker: int, workers: int, sampler: CaptionSampler, epoch: int = 0) -> Iterator[Plan]:
        bs = self.cfg.batch_size
        while self.epochs is None or epoch < self.epochs:
            groups: dict[tuple, list[dict]] = {}
            n = 0
            for s in self._stream_samples(epoch, worker, workers):
                key = s["__key__"]
                if "json" not in s or "latent.npy" not in s:
                    raise SanaError(f"sample {key} in {s.get('__url__')}: needs KEY.json and KEY.latent.npy")
                meta = json.loads(s["json"])
                picked = sampler.pick(key, meta.get("captions") or {}, meta.get("clip_scores") or {}, epoch)
                if picked is None:
                    continue
                drop = np.random.default_rng(_seed(self.cfg.seed, "dropout", epoch, key)).random() \
                    < self.cfg.caption_dropout
                item = {"key": key, "url": s.get("__url__"), "latent": s["latent.npy"], "vlm": picked[0],
                            "caption": "" if drop else picked[1], "score": picked[2], "dropped": drop}
                shape = tuple(meta.get("latent_shape") or ())
                g = groups.setdefault(shape, [])
                g.append(item)
                if len(g) == bs:
                    yield Plan(epoch, n, g)
                    n += 1
                    groups[shape] = []
            if not self.cfg.drop_last:
                for shape in sorted(groups):
                    if groups[shape]:
                        yield Plan(epoch, n, groups[shape])
                        n += 1
            epoch += 1

    # -- batches ----------------------------------------------------------------------------------------
    def __iter__(self) -> Iterator[dict]:
        info = get_worker_info()
        phys, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        # Renumber so that the worker serving the next batch plays the stream that the original run would use.
        worker = (phys + self.start_batches) % workers
        skip = max(0, math.ceil((self.start_batches - worker) / workers))
        start_epoch = 0
        if skip and worker in self.positions:
            start_epoch, last = self.positions[worker]
            skip = last + 1
        sampler = CaptionSampler(self.caption_cfg)
        for n, plan in enumerate(self._plans(worker, workers, sampler, start_epoch)):
            if n < skip:
                continue
            yield self._materialize(plan, worker, sampler.skipped)

    @staticmethod
    def _materialize(plan: Plan, worker: int, skipped: int) -> dict:
        arrs = [_decode_latent(it["latent"], it["key"]) for it in plan.samples]
        shapes = {a.shape for a in arrs}
        if len(shapes) != 1:
            bad = [(it["key"], a.shape) for it, a in zip(plan.samples, arrs) if a.shape != arrs[0].shape]
            raise SanaError(f"sample {bad[0][0]}: latent.npy shape {bad[0][1]} disagrees with its json "
                            f"latent_shape (batch of {arrs[0].shape})")
        return {
            "latents": torch.from_numpy(np.stack(arrs).astype(np.float32)),
            "keys": [it["key"] for it in plan.samples],
            "captions": [it["caption"] for it in plan.samples],
            "vlms": [it["vlm"] for it in plan.samples],
            "scores": torch.tensor([it["score"] for it in plan.samples], dtype=torch.float32),
            "dropped": torch.tensor([it["dropped"] for it in plan.samples]),
            "epoch": plan.epoch,
            "index": plan.index,
            "worker": worker,
            "skipped": skipped,  # images without a usable caption so far in this worker
        }


def _identity(x):
    return x


class MicroBatches(IterableDataset):
    """Gradient accumulation: the ShardStreams of A data slots zipped, one list of A batches per step.

    A process of rank r with A micro-batches per step plays slots r*A .. r*A+A-1 of world*A, so the data
    order depends only on world*A: a 1-process run with A=2 reads, per step, exactly the batches that ranks
    0 and 1 of a 2-process run read. Each worker yields whole steps, so one step's micro-batches come from
    the same worker and the DataLoader's turn-taking over workers stays what the resume logic expects."""

    def __init__(self, streams: list[ShardStream]):
        self.streams = streams

    def __iter__(self) -> Iterator[list[dict]]:
        return (list(step) for step in zip(*self.streams))


def build_loader(shards: list[Path], cfg: DataConfig, caption_cfg: CaptionSamplerConfig, rank: int = 0,
                 world: int = 1, start_batches: int = 0, epochs: int | None = None,
                 positions: dict[int, tuple[int, int]] | list[dict] | None = None,
                 device: torch.device | None = None, accum: int = 1) -> DataLoader:
    """Batches of one rank; with accum > 1, lists of `accum` micro-batches (MicroBatches), and `positions`
    is then a list with one worker -> (epoch, index) dict per micro-batch slot."""
    if accum == 1:
        ds = ShardStream(shards, cfg, caption_cfg, rank, world, start_batches, epochs, positions)
    else:
        pos = positions or [None] * accum
        ds = MicroBatches([ShardStream(shards, cfg, caption_cfg, rank * accum + a, world * accum, start_batches,
                                       epochs, pos[a]) for a in range(accum)])
    pin = bool(cfg.pin_memory and device is not None and device.type == "cuda")
    kw = {"persistent_workers": False, "prefetch_factor": 2} if cfg.num_workers > 0 else {}
    return DataLoader(ds, batch_size=None, num_workers=cfg.num_workers, pin_memory=pin, collate_fn=_identity, **kw)


class SkipWarner:
    """Warns once per new total of images skipped for lack of a usable caption (summed over workers)."""

    def __init__(self):
        self.per_worker: dict[int, int] = {}
        self.warned = 0

    def update(self, batch: dict) -> int:
        self.per_worker[batch["worker"]] = batch["skipped"]
        total = sum(self.per_worker.values())
        if total > self.warned:
            warnings.warn(f"{total} image(s) skipped so far: no caption with a finite CLIP score", stacklevel=2)
            self.warned = total
        return total
