"""Inputs: a folder tree of images, WebDataset tars, or a Parquet file listing paths.

Listing happens on the driver (it is cheap: names, not bytes) and yields one row per input with a
deterministic key, so a resumed run can tell what it has done. Bytes are read later, inside the
decode stage on the workers, by `read_bytes`.

Sources are strings: a local path, an fsspec URL (s3://..., gs://..., anything fsspec knows), or
`TAR::MEMBER@OFFSET:SIZE` internally for a member of a WebDataset tar (the manifest records it as
`TAR::MEMBER`, the contract's form).
"""
from __future__ import annotations

import glob
import hashlib
import os
import tarfile
from dataclasses import dataclass
from pathlib import Path

from sana_core.errors import SanaError
from sana_core.secrets import strip_url_credentials


def key_of(source: str) -> str:
    """The sample key: first 32 hex characters of sha256(source) (no dots, stable across runs)."""
    return hashlib.sha256(source.encode("utf-8")).hexdigest()[:32]


@dataclass
class InputItem:
    source: str  # what the manifest records
    locator: str  # how read_bytes finds the bytes (== source except for tar members)


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
    if "::" in locator:
        tar, rest = locator.split("::", 1)
        span = rest.rsplit("@", 1)[1]
        offset, size = (int(x) for x in span.split(":"))
        if max_bytes and size > max_bytes:
            raise InputTooLarge(size)
        with _open(tar) as f:
            f.seek(offset)
            data = f.read(size)
        if len(data) != size:
            raise OSError(f"{tar} ends before member at offset {offset} (tar truncated)")
        return data
    if max_bytes and (size := _size(locator)) > max_bytes:
        raise InputTooLarge(size)
    with _open(locator) as f:
        data = f.read(max_bytes + 1) if max_bytes else f.read()  # also caps a file that grew since the stat
    if max_bytes and len(data) > max_bytes:
        raise InputTooLarge(len(data))
    return data


def _norm_exts(exts: list[str]) -> set[str]:
    return {e.lower() if e.startswith(".") else "." + e.lower() for e in exts}


def list_folder(root: Path, exts: set[str]) -> list[InputItem]:
    """Every file under root whose name ends in an image extension, symlinks (also dangling) included."""
    items = []
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        dirnames.sort()
        for name in sorted(filenames):
            if Path(name).suffix.lower() in exts:
                p = os.path.abspath(os.path.join(dirpath, name))
                items.append(InputItem(p, p))
    return items


def list_tar(path: str, exts: set[str]) -> list[InputItem]:
    """Image members of one (uncompressed) WebDataset tar, with their byte spans for random access."""
    items = []
    try:
        with _open(path) as f, tarfile.open(fileobj=f, mode="r:") as tf:
            for m in tf:
                if m.isfile() and Path(m.name).suffix.lower() in exts:
                    src = f"{path}::{m.name}"
                    items.append(InputItem(f"{strip_url_credentials(path)}::{m.name}",
                                           f"{src}@{m.offset_data}:{m.size}"))
    except tarfile.TarError as e:
        raise SanaError(f"input tar {path} cannot be read: {e}") from None
    return items


def list_parquet(path: str, column: str) -> list[InputItem]:
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path, columns=[column])
    except (KeyError, ValueError, OSError) as e:
        raise SanaError(f"input parquet {path}: cannot read column '{column}' ({str(e).splitlines()[0]}); "
                        f"set input.parquet_column") from None
    base = os.path.dirname(os.path.abspath(path)) if not _is_url(path) else ""
    items = []
    for p in table.column(column).to_pylist():
        if p is None or p == "":
            continue
        p = str(p)
        if not _is_url(p) and not os.path.isabs(p):
            p = os.path.join(base, p)  # relative paths are relative to the parquet file
        items.append(InputItem(strip_url_credentials(p), p))  # credentials stay in the locator only
    return items


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
    if _is_url(path):
        import braceexpand

        return list(braceexpand.braceexpand(path))
    if os.path.isdir(path):
        return sorted(glob.glob(os.path.join(path, "**", "*.tar"), recursive=True))
    import braceexpand

    out = []
    for p in braceexpand.braceexpand(path):
        out += sorted(glob.glob(p)) if any(c in p for c in "*?[") else [p]
    return out


def _check_protocols(protocols: set[str]) -> None:
    """Fail on the driver, in one line, for URLs whose filesystem is not installed (e.g. s3 without s3fs),
    instead of on every worker for every input."""
    import fsspec

    for proto in sorted(protocols):
        try:
            fsspec.get_filesystem_class(proto)
        except (ImportError, ValueError) as e:
            raise SanaError(f"inputs use {proto}:// URLs but fsspec cannot open them: "
                            f"{str(e).splitlines()[0] if str(e) else type(e).__name__}") from None


def list_inputs(path: str, fmt: str, extensions: list[str], parquet_column: str) -> tuple[list[InputItem], int]:
    """All inputs (deduplicated by source, first occurrence kept) and how many duplicates were dropped."""
    exts = _norm_exts(extensions)
    if not _is_url(path):
        path = os.path.abspath(path)
    fmt = detect_format(path) if fmt == "auto" else fmt
    if fmt == "folder":
        if _is_url(path):
            raise SanaError(f"folder inputs must be local; list remote files in a parquet instead: {path}")
        if not os.path.isdir(path):
            raise SanaError(f"input folder not found: {path}")
        items = list_folder(Path(path), exts)
    elif fmt == "webdataset":
        tars = _expand_tars(path)
        if not tars:
            raise SanaError(f"no .tar files match the input {path}")
        items = [it for t in tars for it in list_tar(t, exts)]
    elif fmt == "parquet":
        items = list_parquet(path, parquet_column)
    else:
        raise SanaError(f"unknown input.format '{fmt}'")
    _check_protocols({it.locator.split("://", 1)[0] for it in items if _is_url(it.locator)})
    seen: set[str] = set()
    unique = []
    for it in items:
        if it.source not in seen:
            seen.add(it.source)
            unique.append(it)
    return unique, len(items) - len(unique)
