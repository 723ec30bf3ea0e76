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
already produced (reading tar members, checking latents, computing nothing), so the batch sequence continues
exactly. Given the (epoch, index) of each worker's last consumed batch as well (the trainer saves it), a worker
jumps straight to that epoch, since an epoch's order depends on nothing before it, and re-reads only that
epoch's start.

Bad data (data.on_error=skip, the default): a shard that cannot be opened or read to the end is re-read
data.read_retries times, continuing after the samples it already gave, then the rest of it is skipped; a
sample without both members, or whose latent is unreadable, not finite or not of its json's shape, is skipped.
Each such event rides on the next batch the worker yields (`bad_shards`, `bad_samples`), so a resumed worker,
which discards the batches it had produced, also discards their events: counts stay exact across resume, and
so does the order, which is a function of the files as they are. data.on_error=fail stops at the first one
with one line naming the shard (and sample).
"""
from __future__ import annotations

import hashlib
import io
import itertools
import json
import math
import sys
import tarfile
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import webdataset as wds
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from sana_core.errors import SanaError
from sana_core.secrets import strip_url_credentials
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


# What a shard read can raise: I/O errors (OSError, incl. a failed pipe: command), tar damage (a truncated
# shard: "unexpected end of data"; not a tar: "invalid header"; a 0-byte file: "empty file"), EOF.
READ_ERRORS = (OSError, EOFError, tarfile.TarError)


class ShardReadError(Exception):
    def __init__(self, url: str, reason: str):
        super().__init__(f"{url}: {reason}")
        self.url, self.reason = url, reason


class DataError(SanaError):
    """A bad shard or sample under data.on_error=fail."""


def _reason(e: BaseException) -> str:
    # webdataset appends the stream and url to an exception's args; the first arg is the message.
    msg = e.strerror if isinstance(e, OSError) and e.strerror else (e.args[0] if e.args else "")
    return f"{type(e).__name__}: {msg}" if msg else type(e).__name__


def shown(url: str) -> str:
    """A shard's name for messages: the URL without credentials."""
    return strip_url_credentials(url)


def read_shard(url: str, retries: int = 0, wait: float = 1.0) -> Iterator[dict]:
    """The samples of one shard. A read error re-opens the shard up to `retries` times (waiting `wait` s,
    doubled each time) and continues after the samples already given, so a transient error changes nothing;
    then ShardReadError (after the samples that could be read)."""
    done, attempt = 0, 0
    while True:
        try:
            for i, s in enumerate(wds.tarfile_samples([{"url": url}])):
                if i >= done:
                    done = i + 1
                    yield s
            return
        except READ_ERRORS as e:
            reason = _reason(e) + (f" after {done} sample(s)" if done else "")
        if attempt >= retries:
            raise ShardReadError(url, reason + (f" ({attempt + 1} attempts)" if attempt else ""))
        time.sleep(wait * 2 ** attempt)
        attempt += 1


def _finite(arr: np.ndarray) -> bool:
    if arr.dtype == np.float16:
        # numpy's float16 arithmetic is emulated (isfinite: ~100 us for a 32x16x32 latent, 4x float32's); a
        # half is NaN or inf exactly when its 5 exponent bits are all ones, which integer ops test at full speed.
        return not ((np.ascontiguousarray(arr).view(np.uint16) & 0x7C00) == 0x7C00).any()
    return arr.dtype.kind in "iu" or bool(np.isfinite(arr).all())


def check_sample(s: dict, channels: int | None = None) -> tuple[dict, np.ndarray] | str:
    """(json record, latent) of a raw sample, or why it cannot be trained on."""
    if "json" not in s or "latent.npy" not in s:
        return f"has no {'KEY.json' if 'json' not in s else 'KEY.latent.npy'} member"
    try:
        meta = json.loads(s["json"])
    except ValueError:
        return "KEY.json is not valid JSON"
    if not isinstance(meta, dict):
        return "KEY.json is not a JSON object"
    try:
        arr = np.load(io.BytesIO(s["latent.npy"]), allow_pickle=False)
    except Exception as e:  # noqa: BLE001 - any unreadable member is the same problem
        return f"latent.npy is not a readable numpy array ({type(e).__name__})"
    want = meta.get("latent_shape")
    if arr.ndim != 3 or (want is not None and list(arr.shape) != list(want)):
        return f"latent shape {tuple(arr.shape)} is not its json latent_shape {want}"
    if channels is not None and arr.shape[0] != channels:
        return f"latent has {arr.shape[0]} channels, the model {channels}"
    if arr.dtype.kind not in "fiu":
        return f"latent dtype {arr.dtype} is not numeric"
    if not _finite(arr):
        return "latent is not finite (NaN or inf)"
    return meta, arr


def peek_latent_shape(shards: list[Path], on_error: str = "skip") -> tuple[tuple[int, ...], str, str]:
    """(latent shape, key, shard name) of the first usable sample: checked against the model before any step.
    Bad shards and samples are passed over (on_error=skip; the loader reports them) or stop (fail)."""
    first = None
    for shard in shards:
        try:
            for sample in read_shard(str(shard)):
                checked = check_sample(sample)
                if not isinstance(checked, str):
                    return tuple(checked[1].shape), sample["__key__"], Path(shard).name
                where = f"sample {sample.get('__key__')} in {shown(str(shard))}: {checked}"
                if on_error == "fail":
                    raise DataError(f"{where} (data.on_error=fail)")
                first = first or where
        except ShardReadError as e:
            if on_error == "fail":
                raise DataError(f"shard {shown(e.url)}: {e.reason} (data.on_error=fail)") from None
            first = first or f"shard {shown(e.url)}: {e.reason}"
    raise SanaError(f"no usable sample in any of the {len(shards)} shard(s)" + (f" (first problem: {first})"
                                                                                 if first else ""))


def check_latent_channels(shards: list[Path], channels: int, on_error: str = "skip") -> tuple[int, ...]:
    shape, key, shard = peek_latent_shape(shards, on_error)
    if len(shape) != 3 or shape[0] != channels:
        raise SanaError(f"latent shape mismatch: the model expects (C={channels}, h, w), {shard} sample {key} "
                        f"holds {shape}; set model.dit.in_channels to match the shards")
    return shape


@dataclass
class Plan:
    """A batch before decoding: which samples, which captions."""
    epoch: int
    index: int  # batch number inside this worker's epoch
    samples: list[dict]  # checked latents + the picked caption
    bad_shards: list = None  # (url, reason) met since the worker's previous plan
    bad_samples: list = None  # (key, url, reason) likewise


class ShardStream(IterableDataset):
    """Infinite iterator of bucketed batches for one rank (see the module docstring for the order).

    With `epochs` set, bad data met after a worker's last batch is not reported (it has no batch to ride on)."""

    def __init__(self, shards: list[Path], cfg: DataConfig, caption_cfg: CaptionSamplerConfig,
                 rank: int = 0, world: int = 1, start_batches: int = 0, epochs: int | None = None,
                 positions: dict[int, tuple[int, int]] | None = None, channels: int | None = None):
        self.shards = [str(s) for s in shards]
        self.channels = channels  # latent channels the model takes (None: not checked here)
        self.cfg, self.caption_cfg = cfg, caption_cfg
        self.rank, self.world = rank, world
        self.start_batches = start_batches  # batches of this rank already consumed (the data position)
        # Optional shortcut: worker -> (epoch, index) of its last consumed batch, so a resumed worker starts
        # in that epoch instead of re-reading every earlier one.
        self.positions = positions or {}
        self.epochs = epochs  # None: forever (training); a number: stop after that many (tests, benchmarks)

    # -- order ------------------------------------------------------------------------------------------
    def _read(self, urls: list[str], log: dict) -> Iterator[dict]:
        for url in urls:
            try:
                yield from read_shard(url, self.cfg.read_retries, self.cfg.retry_wait)
            except ShardReadError as e:
                if self.cfg.on_error == "fail":
                    raise DataError(f"shard {shown(e.url)}: {e.reason} (data.on_error=fail)") from None
                log["shards"].append((shown(e.url), e.reason))

    def _stream_samples(self, epoch: int, worker: int, workers: int, log: dict) -> Iterator[dict]:
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
            self._read(mine, log),
            (s for i, s in enumerate(self._read(rest, log)) if i % streams == stream))
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
        log: dict = {"shards": [], "samples": []}  # bad data met since the last plan

        def plan(epoch: int, n: int, group: list[dict]) -> Plan:
            p = Plan(epoch, n, group, log["shards"], log["samples"])
            log["shards"], log["samples"] = [], []
            return p

        empty_epochs = 0
        while self.epochs is None or epoch < self.epochs:
            groups: dict[tuple, list[dict]] = {}
            n = 0
            for s in self._stream_samples(epoch, worker, workers, log):
                key = s["__key__"]
                checked = check_sample(s, self.channels)
                if isinstance(checked, str):
                    url = shown(str(s.get("__url__")))
                    if self.cfg.on_error == "fail":
                        raise DataError(f"sample {key} in {url}: {checked} (data.on_error=fail)")
                    log["samples"].append((key, url, checked))
                    continue
                meta, latent = checked
                picked = sampler.pick(key, meta.get("captions") or {}, meta.get("clip_scores") or {}, epoch)
                if picked is None:
                    continue
                drop = np.random.default_rng(_seed(self.cfg.seed, "dropout", epoch, key)).random() \
                    < self.cfg.caption_dropout
                item = {"key": key, "url": s.get("__url__"), "latent": latent, "vlm": picked[0],
                        "caption": "" if drop else picked[1], "score": picked[2], "dropped": drop}
                shape = tuple(latent.shape)
                g = groups.setdefault(shape, [])
                g.append(item)
                if len(g) == bs:
                    yield plan(epoch, n, g)
                    n += 1
                    groups[shape] = []
            if not self.cfg.drop_last:
                for shape in sorted(groups):
                    if groups[shape]:
                        yield plan(epoch, n, groups[shape])
                        n += 1
            # A stream with nothing usable would otherwise spin through epochs forever, never yielding a batch.
            empty_epochs = 0 if n else empty_epochs + 1
            if empty_epochs >= 8:
                raise DataError(f"no usable batch in {empty_epochs} epochs of data stream rank {self.rank} "
                                f"worker {worker} ({len(self.shards)} shard(s); bad ones: "
                                f"{', '.join(sorted({u for u, _ in log['shards']})) or 'none'})")
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
        try:
            for n, plan in enumerate(self._plans(worker, workers, sampler, start_epoch)):
                if n < skip:
                    continue
                yield self._materialize(plan, worker, sampler.skipped)
        except DataError as e:
            # Raised in a DataLoader worker, an exception reaches the trainer wrapped in a multi-line
            # traceback; handed over as a batch, it is re-raised as the one line it is (Loader.__iter__).
            yield {"error": str(e)}

    @staticmethod
    def _materialize(plan: Plan, worker: int, skipped: int) -> dict:
        arrs = [it["latent"] for it in plan.samples]
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
            "bad_shards": plan.bad_shards or [],  # (url, reason) skipped since this worker's previous batch
            "bad_samples": plan.bad_samples or [],  # (key, url, reason) likewise
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
                 device: torch.device | None = None, accum: int = 1, channels: int | None = None) -> DataLoader:
    """Batches of one rank; with accum > 1, lists of `accum` micro-batches (MicroBatches), and `positions`
    is then a list with one worker -> (epoch, index) dict per micro-batch slot."""
    if accum == 1:
        ds = ShardStream(shards, cfg, caption_cfg, rank, world, start_batches, epochs, positions, channels)
    else:
        pos = positions or [None] * accum
        ds = MicroBatches([ShardStream(shards, cfg, caption_cfg, rank * accum + a, world * accum, start_batches,
                                       epochs, pos[a], channels) for a in range(accum)])
    pin = bool(cfg.pin_memory and device is not None and device.type == "cuda")
    kw = {"persistent_workers": False, "prefetch_factor": 2} if cfg.num_workers > 0 else {}
    return Loader(ds, batch_size=None, num_workers=cfg.num_workers, pin_memory=pin, collate_fn=_identity, **kw)


class Loader(DataLoader):
    """A DataLoader that raises a worker's data.on_error=fail error as the one-line SanaError it is."""

    def __iter__(self):
        for item in super().__iter__():
            for b in item if isinstance(item, list) else (item,):
                if "error" in b:
                    raise DataError(b["error"])
            yield item


class DataHealth:
    """What the loader skipped (data.on_error=skip), fed every batch in the trainer: the distinct bad shards
    (url -> reason; one warning line each) and the bad samples met (a bad sample counts once per epoch)."""

    max_sample_warnings = 5

    def __init__(self, state: dict | None = None):
        state = state or {}
        self.shards: dict[str, str] = dict(state.get("shards", {}))
        self.samples = int(state.get("samples", 0))
        self.warned_samples = 0

    def update(self, batch: dict) -> None:
        for url, reason in batch.get("bad_shards", ()):
            if url not in self.shards:
                self.shards[url] = reason
                _warn(f"warning: skipped shard {url}: {reason} (data.on_error=skip)")
        for key, url, reason in batch.get("bad_samples", ()):
            self.samples += 1
            self.warned_samples += 1
            if self.warned_samples <= self.max_sample_warnings:
                more = "; further bad samples are counted, not printed" \
                    if self.warned_samples == self.max_sample_warnings else ""
                _warn(f"warning: skipped sample {key} in {url}: {reason} (data.on_error=skip{more})")

    def state(self) -> dict:
        return {"shards": dict(self.shards), "samples": self.samples}

    @staticmethod
    def merge(states: list[dict]) -> dict:
        """The run's totals from every rank's state()."""
        shards: dict[str, str] = {}
        for st in states:
            shards.update(st["shards"])
        return {"shards": shards, "samples": sum(st["samples"] for st in states)}


def _warn(line: str) -> None:
    from tqdm import tqdm  # keeps the line clear of a progress bar on the same terminal
    tqdm.write(line, file=sys.stderr)


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
