"""Inputs: a folder tree of images, WebDataset tars, or Parquet lists of paths / URLs.

Listing is distributed: the driver only plans (the sub-folders of a folder input, the tar names of a
WebDataset input, the Parquet files of a list) and Ray tasks on the workers list the names, index the tars
and compute every input's key (`listing_dataset`). `list_inputs` runs the same listing functions in one
process, for small inputs and tests.

Every input is one row of LISTING_SCHEMA:
  key      first 32 hex of sha256(source): stable across runs, so a resumed run knows what it has done
  source   what the manifest records: the path or URL (credentials stripped), `TAR::MEMBER` for a tar member
  member   the member name inside a WebDataset tar, "" otherwise (its own field: never parsed out of a path)
  locator  how `read_bytes` finds the bytes: the path or URL itself, or for a tar member
           `TAR\\0OFFSET\\0SIZE`. NUL cannot occur in a path or a URL, so no real file name (`a::b.jpg`,
           `x@1:2.png`) can be mistaken for a member span.
"""
from __future__ import annotations

import glob
import hashlib
import os
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass

import pyarrow as pa

from sana_core.errors import SanaError
from sana_core.secrets import strip_url_credentials

LISTING_SCHEMA = pa.schema([("key", pa.string()), ("source", pa.string()), ("member", pa.string()),
                            ("locator", pa.string())])
SEP = "\0"  # separates a tar's path from a member's byte span in a locator (illegal in paths and URLs)
LIST_CHUNK = 20_000  # rows per block a listing task yields (bounded memory for folders of millions of files)
PARQUET_BATCH = 100_000  # rows of a Parquet list per listing task
LIST_CPUS = 0.25  # listing waits on the filesystem, not the CPU; a full CPU each would queue behind actor pools


def key_of(source: str) -> str:
    """The sample key: first 32 hex characters of sha256(source) (no dots, stable across runs)."""
    return hashlib.sha256(source.encode("utf-8")).hexdigest()[:32]


@dataclass
class InputItem:
    source: str  # what the manifest records
    locator: str  # how read_bytes finds the bytes
    member: str = ""  # tar member name, "" for a plain file or URL

    @property
    def key(self) -> str:
        return key_of(self.source)


def member_locator(tar: str, offset: int, size: int) -> str:
    return f"{tar}{SEP}{offset}{SEP}{size}"


def _is_url(path: str) -> bool:
    return "://" in path


def _open(path: str, mode: str = "rb"):
    if _is_url(path):
        import fsspec

        return fsspec.open(path, mode).open()
    return open(path, mode)


class InputTooLarge(Exception):
    """An input over input.max_bytes, told from its size before any byte is read."""

    def __init__(self, size: int):
        super().__init__(f"{size} bytes")
        self.size = size


def _size(path: str) -> int:
    if _is_url(path):
        import fsspec

        fs, p = fsspec.core.url_to_fs(path)
        return int(fs.size(p) or 0)
    return os.stat(path).st_size


def read_bytes(locator: str, max_bytes: int = 0) -> bytes:
    """The bytes of one input; OSError (incl. FileNotFoundError, PermissionError) when unreadable,
    InputTooLarge when max_bytes > 0 and the input is larger (checked before reading)."""
    if SEP in locator:
        tar, offset, size = locator.split(SEP)
        offset, size = int(offset), int(size)
        if max_bytes and size > max_bytes:
            raise InputTooLarge(size)
        with _open(tar) as f:
            f.seek(offset)
            data = f.read(size)
        if len(data) != size:
            raise OSError(f"{strip_url_credentials(tar)} ends before member at offset {offset} (tar truncated)")
        return data
    if max_bytes and (size := _size(locator)) > max_bytes:
        raise InputTooLarge(size)
    with _open(locator) as f:
        data = f.read(max_bytes + 1) if max_bytes else f.read()  # also caps a file that grew since the stat
    if max_bytes and len(data) > max_bytes:
        raise InputTooLarge(len(data))
    return data


def norm_exts(exts: list[str]) -> set[str]:
    return {e.lower() if e.startswith(".") else "." + e.lower() for e in exts}


# ---------------------------------------------------------------------------------------------- listing units
# Each function below lists one unit on a worker and returns / yields pyarrow tables of LISTING_SCHEMA.

def _table(sources: list[str], members: list[str], locators: list[str]) -> pa.Table:
    return pa.table({"key": [key_of(s) for s in sources], "source": sources, "member": members,
                     "locator": locators}, schema=LISTING_SCHEMA)


def _plain(paths: list[str]) -> pa.Table:
    return _table([strip_url_credentials(p) for p in paths], [""] * len(paths), paths)


def list_dir(path: str, recursive: bool, exts: set[str], chunk: int = LIST_CHUNK) -> Iterator[pa.Table]:
    """Image files in one folder (and below it when recursive), symlinks (also dangling) included, sorted,
    in blocks of at most `chunk` rows."""
    buf: list[str] = []
    for dirpath, dirnames, filenames in os.walk(path, followlinks=False):
        dirnames.sort()
        if not recursive:
            dirnames.clear()
        for name in sorted(filenames):
            if os.path.splitext(name)[1].lower() in exts:
                buf.append(os.path.abspath(os.path.join(dirpath, name)))
                if len(buf) >= chunk:
                    yield _plain(buf)
                    buf = []
    if buf:
        yield _plain(buf)


def list_tar(path: str, exts: set[str]) -> pa.Table:
    """Image members of one (uncompressed) WebDataset tar, with their byte spans for random access."""
    src, members, locs = [], [], []
    shown = strip_url_credentials(path)
    try:
        with _open(path) as f, tarfile.open(fileobj=f, mode="r:") as tf:
            for m in tf:
                if m.isfile() and os.path.splitext(m.name)[1].lower() in exts:
                    src.append(f"{shown}::{m.name}")
                    members.append(m.name)
                    locs.append(member_locator(path, m.offset_data, m.size))
    except tarfile.TarError as e:
        raise SanaError(f"input tar {shown} cannot be read: {e}") from None
    return _table(src, members, locs)


def resolve_paths(paths: list, base: str) -> list[str]:
    """Non-empty entries of a Parquet list; relative paths are relative to the list's folder `base`."""
    out = []
    for p in paths:
        if p is None or p == "":
            continue
        p = str(p)
        if not _is_url(p) and not os.path.isabs(p):
            p = os.path.join(base, p)
        out.append(p)
    return out


def check_protocols(locators) -> None:
    """URLs whose fsspec filesystem is not installed (e.g. s3 without s3fs) fail in one line per job, not
    once per input in the decode stage."""
    import fsspec

    for proto in sorted({str(x).split("://", 1)[0] for x in locators if _is_url(str(x))}):
        try:
            fsspec.get_filesystem_class(proto)
        except (ImportError, ValueError) as e:
            raise SanaError(f"inputs use {proto}:// URLs but fsspec cannot open them: "
                            f"{str(e).splitlines()[0] if str(e) else type(e).__name__}") from None


def parquet_rows(batch: pa.Table, column: str, base: str) -> pa.Table:
    """A block of a Parquet list -> listing rows (the map function after ray.data.read_parquet)."""
    paths = resolve_paths(batch.column(column).to_pylist(), base)
    check_protocols(paths)
    return _plain(paths)


# ---------------------------------------------------------------------------------------------- planning (driver)

def detect_format(path: str) -> str:
    low = path.lower()
    if low.endswith(".parquet"):
        return "parquet"
    if low.endswith(".tar") or any(c in path for c in "*{?"):
        return "webdataset"
    if _is_url(path) or os.path.isdir(path):
        return "folder"
    if not os.path.exists(path):
        raise SanaError(f"input not found: {path}")
    raise SanaError(f"input {path} is neither a folder, a .tar (WebDataset) nor a .parquet; set input.format")


def _expand_tars(path: str) -> list[str]:
    import braceexpand

    if _is_url(path):
        return list(braceexpand.braceexpand(path))
    if os.path.isdir(path):
        return sorted(glob.glob(os.path.join(path, "**", "*.tar"), recursive=True))
    out = []
    for p in braceexpand.braceexpand(path):
        out += sorted(glob.glob(p)) if any(c in p for c in "*?[") else [p]
    return list(dict.fromkeys(out))  # a tar named twice by a pattern is one input tar


@dataclass
class Plan:
    """What the driver decides before any input is listed: the format and its listing units."""
    fmt: str
    path: str
    units: list[dict]  # folder: {"dir", "recursive"}; webdataset: {"tar"}; parquet: one {"parquet"}


def plan_inputs(path: str, fmt: str, parquet_column: str) -> Plan:
    """The listing units of an input (one level of a folder, the names of the tars, the Parquet list)."""
    if not _is_url(path):
        path = os.path.abspath(path)
    fmt = detect_format(path) if fmt == "auto" else fmt
    if fmt == "folder":
        if _is_url(path):
            raise SanaError(f"folder inputs must be local; list remote files in a parquet instead: {path}")
        if not os.path.isdir(path):
            raise SanaError(f"input folder not found: {path}")
        # The root's own files in one unit, every sub-folder (recursively) in its own task.
        subs = sorted(e.path for e in os.scandir(path) if e.is_dir(follow_symlinks=False))
        units = [{"dir": path, "recursive": False}] + [{"dir": s, "recursive": True} for s in subs]
        return Plan(fmt, path, units)
    if fmt == "webdataset":
        tars = _expand_tars(path)
        if not tars:
            raise SanaError(f"no .tar files match the input {path}")
        return Plan(fmt, path, [{"tar": t} for t in tars])
    if fmt == "parquet":
        check_parquet_column(path, parquet_column)
        return Plan(fmt, path, [{"parquet": path}])
    raise SanaError(f"unknown input.format '{fmt}'")


def _parquet_files(path: str) -> list[str]:
    if os.path.isdir(path):
        return sorted(glob.glob(os.path.join(path, "**", "*.parquet"), recursive=True))
    return [path]


def check_parquet_column(path: str, column: str) -> None:
    """One footer read on the driver: a missing column fails in one line, not in every read task."""
    import pyarrow.parquet as pq

    files = _parquet_files(path) if not _is_url(path) else [path]
    if not files:
        raise SanaError(f"input parquet {path}: no .parquet files")
    try:
        if _is_url(files[0]):
            import fsspec

            with fsspec.open(files[0], "rb") as f:
                names = pq.read_schema(f).names
        else:
            names = pq.read_schema(files[0]).names
    except (OSError, ValueError) as e:
        raise SanaError(f"input parquet {files[0]}: cannot read it ({str(e).splitlines()[0]})") from None
    if column not in names:
        raise SanaError(f"input parquet {files[0]}: no column '{column}' (it has {names}); set input.parquet_column")


def parquet_base(path: str) -> str:
    """The folder relative paths in a Parquet list are relative to."""
    if _is_url(path):
        return ""
    return path if os.path.isdir(path) else os.path.dirname(path)


def list_unit(unit: dict, exts: set[str], chunk: int = LIST_CHUNK) -> Iterator[pa.Table]:
    if "dir" in unit:
        yield from list_dir(unit["dir"], unit["recursive"], exts, chunk)
    elif "tar" in unit:
        yield list_tar(unit["tar"], exts)
    else:
        raise SanaError(f"unknown listing unit {unit}")


# ---------------------------------------------------------------------------------------------- in one process

def list_inputs(path: str, fmt: str, extensions: list[str], parquet_column: str) -> tuple[list[InputItem], int]:
    """All inputs, listed in this process (deduplicated by source, first occurrence kept), and how many
    duplicates were dropped. The job lists with `listing_dataset` instead; both use the functions above."""
    import pyarrow.parquet as pq

    plan = plan_inputs(path, fmt, parquet_column)
    exts = norm_exts(extensions)
    if plan.fmt == "parquet":
        tables = [parquet_rows(pq.read_table(f, columns=[parquet_column]), parquet_column,
                               parquet_base(plan.path)) for f in _parquet_files(plan.path)]
    else:
        tables = [t for u in plan.units for t in list_unit(u, exts)]
    rows = pa.concat_tables(tables).to_pylist() if tables else []
    seen: set[str] = set()
    unique = []
    for r in rows:
        if r["source"] not in seen:
            seen.add(r["source"])
            unique.append(InputItem(r["source"], r["locator"], r["member"]))
    return unique, len(rows) - len(unique)


# ---------------------------------------------------------------------------------------------- on the cluster

def _list_units_batch(batch: pa.Table, exts: list[str], chunk: int) -> Iterator[pa.Table]:
    for unit in batch.column("unit").to_pylist():
        yield from list_unit({k: v for k, v in unit.items() if v is not None}, set(exts), chunk)


def _parquet_batch(batch: pa.Table, column: str, base: str) -> pa.Table:
    return parquet_rows(batch, column, base)


def _read_parquet_list(path: str, column: str):
    """ray.data.read_parquet of the list's one column, through Ray Data's V1 Parquet datasource where there is a
    choice. Ray 2.60's default V2 reader starts a pool of 32 footer-reader actors (one worker process each) for
    every read: on a 4-CPU local cluster its ListFiles task took 13 s for one 60 MB file (42 s with the
    anti-join's own tasks starting beside it); V1 reads the same 10^6 rows in 1-5 s. Listing is planning, not I/O-bound work
    that needs an actor pool; on a cluster reading 10^4 list files V1 still splits them over read tasks."""
    import ray.data

    ctx = ray.data.DataContext.get_current()
    v2 = getattr(ctx, "use_datasource_v2", None)  # absent before Ray 2.5x: there is only V1
    if v2:
        ctx.use_datasource_v2 = False
    try:
        return ray.data.read_parquet(path, num_cpus=LIST_CPUS).select_columns([column])
    finally:
        if v2:
            ctx.use_datasource_v2 = v2


def listing_dataset(plan: Plan, extensions: list[str], parquet_column: str, chunk: int = LIST_CHUNK):
    """The lazy Ray Dataset of LISTING_SCHEMA rows: listed, indexed and keyed by tasks on the workers."""
    import ray.data

    if plan.fmt == "parquet":
        ds = _read_parquet_list(plan.path, parquet_column)
        # The V1 reader yields ~1 MB blocks (17,544 paths): one map task each cost ~0.5 s of scheduling on a
        # loaded 2-core node; bundle them into PARQUET_BATCH-row tasks (~10 MB of paths and keys).
        return ds.map_batches(_parquet_batch, batch_format="pyarrow", batch_size=PARQUET_BATCH, zero_copy_batch=True,
                              num_cpus=LIST_CPUS, fn_kwargs=dict(column=parquet_column, base=parquet_base(plan.path)))
    units = ray.data.from_items([{"unit": u} for u in plan.units], override_num_blocks=len(plan.units))
    return units.map_batches(_list_units_batch, batch_size=1, batch_format="pyarrow", num_cpus=LIST_CPUS,
                             fn_kwargs=dict(exts=sorted(norm_exts(extensions)), chunk=chunk))
