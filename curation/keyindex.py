"""What is done, and who has which content: a key index sharded over Ray actors, never held by the driver.

Resume is an anti-join of the listed inputs against the keys of the committed parts (manifest.parquet/ and
rejected.parquet/). Ray Data's own `Dataset.join(join_type="left_anti")` does that with a hash shuffle; on a
2-core machine it took 88-230 s for 10^5-10^6 rows (its aggregator actors start worker processes and hold
CPUs the readers then wait for), so the job does a broadcast-free partitioned anti-join itself:

- `KeyIndex` shards (Ray actors, `writer.index_shards` of them, spread over the cluster) each own the keys whose
  first 8 hex digits fall in their range: a sorted numpy array of 32-byte keys, 32 bytes per committed input
  (10^9 inputs: 32 GB over all shards, e.g. 64 shards of 0.5 GB).
- `count_todo` streams the listing's keys and the committed parts' keys (read by Ray Data tasks on the workers) to
  the shards that own them in one execution; each shard then counts what is listed but not committed: a
  hash-partitioned anti-join whose partitions are the shards. The driver only holds the actor handles.
- `drop_done` (a map over the listing blocks, on the workers) asks each shard which of its keys are neither
  done nor already listed in this run, so a source listed twice (the same URL twice in a Parquet list) is
  processed once. A claim is idempotent per occurrence (block digest, row), so a retried listing task gets
  the same answer and nothing is lost or doubled.
- The same shards own content hashes (`dedup.exact`): the first input of a sha256 wins, later inputs with the
  same bytes are rejected as `duplicate` (detail `duplicate_of:KEY`); the accepted contents of earlier attempts
  are seeded from the manifest's sha256 column, so this holds across resume too.
"""
from __future__ import annotations

import hashlib

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc


def _keys32(arr) -> np.ndarray:
    """A string column of 32-char hex keys (or 64-char sha256, truncated) -> numpy S32 (zero-copy when possible)."""
    a = pa.array(arr, type=pa.string()) if not isinstance(arr, (pa.Array, pa.ChunkedArray)) else arr
    if isinstance(a, pa.ChunkedArray):
        a = a.combine_chunks()
    a = pc.utf8_slice_codeunits(a, 0, 32)
    fixed = a.cast(pa.binary(32))
    if len(fixed) == 0:
        return np.empty(0, dtype="S32")
    return np.frombuffer(fixed.buffers()[1], dtype="S32", count=len(fixed), offset=fixed.offset * 32)


_HEX = np.full(256, 0, dtype=np.int64)
_HEX[np.frombuffer(b"0123456789abcdef", np.uint8)] = np.arange(16)
_HEX[np.frombuffer(b"ABCDEF", np.uint8)] = np.arange(10, 16)


def shard_of(keys: np.ndarray, n: int) -> np.ndarray:
    """Which shard owns each key: its first 4 hex digits modulo n (keys are uniform hashes)."""
    if len(keys) == 0:
        return np.empty(0, dtype=np.int64)
    d = _HEX[np.frombuffer(keys.tobytes(), dtype=np.uint8).reshape(len(keys), 32)[:, :4]]
    return ((d[:, 0] << 12) | (d[:, 1] << 8) | (d[:, 2] << 4) | d[:, 3]) % n


class KeyIndex:
    """One shard. Ray actor; every method takes numpy S32 arrays of the keys this shard owns."""

    def __init__(self):
        self._seed: list[np.ndarray] = []
        self._listed: list[np.ndarray] = []  # keys of the counting pass, dropped once counted
        self.done = np.empty(0, dtype="S32")
        self.done_occ = np.empty(0, dtype=np.int64)  # occurrence that listed a done key this run (0 = none)
        self.claims: dict[bytes, int] = {}  # keys not done, listed this run -> winning occurrence
        self.dups: set[int] = set()  # occurrences that lost to an earlier one of the same key
        self._sha_seed: list[tuple[np.ndarray, np.ndarray]] = []
        self.sha_sorted = np.empty(0, dtype="S32")
        self.sha_keys = np.empty(0, dtype="S32")
        self.sha_claims: dict[bytes, bytes] = {}

    # seeding
    def add_done(self, keys: np.ndarray) -> int:
        self._seed.append(np.asarray(keys, dtype="S32"))
        return len(keys)

    def add_content(self, shas: np.ndarray, keys: np.ndarray) -> int:
        self._sha_seed.append((np.asarray(shas, dtype="S32"), np.asarray(keys, dtype="S32")))
        return len(shas)

    def add_listed(self, keys: np.ndarray) -> int:
        self._listed.append(np.asarray(keys, dtype="S32"))
        return len(keys)

    def seal(self) -> int:
        if self._seed:
            self.done = np.unique(np.concatenate([self.done, *self._seed]))
        self._seed = []
        self.done_occ = np.zeros(len(self.done), dtype=np.int64)
        return len(self.done)

    def anti_join(self) -> dict[str, int]:
        """Seal the committed keys, count the listed rows not among them, forget the listed keys."""
        self.seal()
        listed = np.concatenate(self._listed) if self._listed else np.empty(0, dtype="S32")
        self._listed = []
        todo = int(self.not_done(listed).sum()) if len(listed) else 0
        return {"committed": len(self.done), "listed": len(listed), "todo": todo}

    def seal_contents(self) -> int:
        if self._sha_seed:
            shas = np.concatenate([s for s, _ in self._sha_seed])
            keys = np.concatenate([k for _, k in self._sha_seed])
            order = np.argsort(shas, kind="stable")
            self.sha_sorted, self.sha_keys = shas[order], keys[order]
        self._sha_seed = []
        return len(self.sha_sorted)

    # the anti-join
    def todo(self, keys: np.ndarray, occ: np.ndarray) -> np.ndarray:
        """For each key: True when this occurrence is the one to process (not done, first listing of it)."""
        out = np.zeros(len(keys), dtype=bool)
        if len(self.done):
            pos = np.minimum(np.searchsorted(self.done, keys), len(self.done) - 1)
            is_done = self.done[pos] == keys
        else:
            pos, is_done = np.zeros(len(keys), dtype=np.int64), np.zeros(len(keys), dtype=bool)
        for i in range(len(keys)):
            o = int(occ[i])
            if is_done[i]:
                first = self.done_occ[pos[i]]
                if first == 0:
                    self.done_occ[pos[i]] = o
                elif first != o:
                    self.dups.add(o)
                continue
            k = keys[i].tobytes()
            winner = self.claims.setdefault(k, o)
            if winner == o:
                out[i] = True
            else:
                self.dups.add(o)
        return out

    def not_done(self, keys: np.ndarray) -> np.ndarray:
        if not len(self.done):
            return np.ones(len(keys), dtype=bool)
        pos = np.minimum(np.searchsorted(self.done, keys), len(self.done) - 1)
        return self.done[pos] != keys

    # exact-duplicate content
    def claim_content(self, shas: np.ndarray, keys: np.ndarray) -> np.ndarray:
        """The key that owns each content hash (an earlier attempt's accepted sample, or the first claimant)."""
        out = np.empty(len(shas), dtype="S32")
        for i in range(len(shas)):
            s = shas[i]
            if len(self.sha_sorted):
                j = np.searchsorted(self.sha_sorted, s)
                if j < len(self.sha_sorted) and self.sha_sorted[j] == s:
                    out[i] = self.sha_keys[j]
                    continue
            out[i] = self.sha_claims.setdefault(s.tobytes(), keys[i].tobytes())
        return out

    def counts(self) -> dict[str, int]:
        """Distinct inputs listed this run (already done + to do) and the duplicate listings dropped."""
        return {"done_listed": int((self.done_occ != 0).sum()), "new": len(self.claims), "dup_sources": len(self.dups),
                "committed_before": len(self.done)}


def make_shards(n: int):
    import ray

    actor = ray.remote(num_cpus=0, max_restarts=0)(KeyIndex)
    return [actor.remote() for _ in range(n)]


def _split_call(shards, method: str, keys: np.ndarray, *cols: np.ndarray) -> list:
    """Call `method` on every shard with its part of the rows; returns (row indices, result ref) per shard."""
    owner = shard_of(keys, len(shards))
    calls = []
    for s, h in enumerate(shards):
        idx = np.nonzero(owner == s)[0]
        if len(idx):
            calls.append((idx, getattr(h, method).remote(keys[idx], *[c[idx] for c in cols])))
    return calls


def _feed_block(batch: pa.Table, shards, what: str) -> pa.Table:
    """Send one block's keys to their shards: committed keys ("done"), listed keys ("listed") or the
    (sha256, key) pairs of accepted samples ("content")."""
    import ray

    keys = _keys32(batch.column("key"))
    if what == "content":
        calls = _split_call(shards, "add_content", _keys32(batch.column("sha256")), keys)
    else:
        calls = _split_call(shards, "add_done" if what == "done" else "add_listed", keys)
    n = sum(ray.get([ref for _, ref in calls]))
    return pa.table({"what": [what], "n": [n]})


class _Feeder:
    """fn for curation.writer.parts_dataset: a group of committed parts -> its keys sent to the shards."""

    def __init__(self, shards, what: str):
        self.shards, self.what = shards, what

    def __call__(self, t: pa.Table) -> pa.Table:
        return _feed_block(t, self.shards, self.what)


def _has_parts(folder) -> bool:
    from curation.writer import part_files

    return bool(part_files(folder))


def count_todo(shards, listing, manifest_dir, rejected_dir) -> dict[str, int]:
    """The anti-join's counting pass, in one Ray Data execution: the listing's keys and the committed keys stream
    into the shards that own them, then each shard counts its listed keys that are not committed. Leaves the
    committed keys sealed in the shards for `drop_done`. Returns committed, listed and todo counts."""
    import ray

    from curation.writer import parts_dataset

    ds = listing.map_batches(_feed_block, batch_format="pyarrow", batch_size=None, zero_copy_batch=True,
                             num_cpus=0.25, fn_kwargs=dict(shards=shards, what="listed"))
    done = [f for f in (manifest_dir, rejected_dir) if _has_parts(f)]
    if done:
        ds = ds.union(parts_dataset(done, _Feeder(shards, "done"), ["key"]))
    for _ in ds.iter_batches(batch_size=None):
        pass
    out = {"committed": 0, "listed": 0, "todo": 0}
    for c in ray.get([s.anti_join.remote() for s in shards]):
        for k in out:
            out[k] += c[k]
    return out


def seed_contents(shards, manifest_dir) -> int:
    """Give the shards the content hashes of the accepted samples (exact dedup across attempts)."""
    import ray

    from curation.writer import parts_dataset

    if _has_parts(manifest_dir):
        for _ in parts_dataset(manifest_dir, _Feeder(shards, "content"), ["key", "sha256"]).iter_batches(
                batch_size=None):
            pass
    return sum(ray.get([s.seal_contents.remote() for s in shards]))


def _occurrences(keys: np.ndarray) -> np.ndarray:
    """Ids of the rows of one listing block, the same in a retried task: digest of the block + row, > 0."""
    d = np.uint64(int.from_bytes(hashlib.sha256(keys.tobytes()).digest()[:8], "little") % (1 << 62))
    with np.errstate(over="ignore"):
        occ = (d + np.arange(len(keys), dtype=np.uint64)) % np.uint64(1 << 62) + np.uint64(1)
    return occ.astype(np.int64)


def drop_done(batch: pa.Table, shards, claim: bool = True) -> pa.Table:
    """The anti-join's map: the rows of a listing block still to be processed (on a worker). claim=False only
    asks (the job's first, counting pass); claim=True also drops a second listing of the same source."""
    import ray

    if batch.num_rows == 0:
        return batch
    keys = _keys32(batch.column("key"))
    keep = np.zeros(len(keys), dtype=bool)
    if claim:
        calls = _split_call(shards, "todo", keys, _occurrences(keys))
    else:
        calls = _split_call(shards, "not_done", keys)
    for (idx, _), mask in zip(calls, ray.get([ref for _, ref in calls])):
        keep[idx] = mask
    return batch.filter(pa.array(keep))


def claim_contents(shards, shas: list[str], keys: list[str]) -> list[str]:
    """The owning key of each content hash (the row's own key when it is the first)."""
    import ray

    s = _keys32(shas)
    k = _keys32(keys)
    out = np.empty(len(s), dtype="S32")
    calls = _split_call(shards, "claim_content", s, k)
    for (idx, _), owners in zip(calls, ray.get([ref for _, ref in calls])):
        out[idx] = owners
    return [x.decode() for x in out]


def totals(shards) -> dict[str, int]:
    import ray

    out: dict[str, int] = {}
    for c in ray.get([s.counts.remote() for s in shards]):
        for k, v in c.items():
            out[k] = out.get(k, 0) + v
    return out
