"""Typed configs: dataclasses loaded from YAML, then `a.b=value` overrides from the command line.

Every entry point builds its config the same way:

    cfg = load_config(TrainConfig, preset=PRESETS[args.preset], path=args.config, overrides=args.set)

Unknown keys and wrongly typed values are refused with the dotted key that is wrong.
"""
from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

import yaml

from sana_core.errors import SanaError

T = TypeVar("T")


def _coerce(value: Any, tp: Any, key: str) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(value, a, key)
            except SanaError:
                pass
        raise SanaError(f"config key '{key}': {value!r} matches none of {tp}")
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise SanaError(f"config key '{key}': expected a mapping for {tp.__name__}, got {value!r}")
        return from_dict(tp, value, prefix=key)
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise SanaError(f"config key '{key}': expected a list, got {value!r}")
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(args) != len(value):
                raise SanaError(f"config key '{key}': expected {len(args)} items, got {len(value)}")
            return tuple(_coerce(v, a, f"{key}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
        item = args[0] if args else Any
        out = [_coerce(v, item, f"{key}[{i}]") for i, v in enumerate(value)]
        return tuple(out) if origin is tuple else out
    if origin is dict:
        if not isinstance(value, dict):
            raise SanaError(f"config key '{key}': expected a mapping, got {value!r}")
        vt = args[1] if args else Any
        return {k: _coerce(v, vt, f"{key}.{k}") for k, v in value.items()}
    if origin is typing.Literal:
        if value not in args:
            raise SanaError(f"config key '{key}': {value!r} is not one of {list(args)}")
        return value
    if tp is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if tp is float and isinstance(value, str):
        # YAML 1.1 reads "3e-4" (no dot) as a string; users type it that way on the command line.
        try:
            return float(value)
        except ValueError:
            pass
    if tp is int and isinstance(value, int) and not isinstance(value, bool):
        return value
    if tp is bool and isinstance(value, bool):
        return value
    if tp is str and isinstance(value, str):
        return value
    if tp in (int, float, bool, str):
        raise SanaError(f"config key '{key}': expected {tp.__name__}, got {value!r}")
    return value


def from_dict(cls: type[T], data: dict, prefix: str = "") -> T:
    """Build dataclass `cls` from a (nested) dict, refusing unknown keys."""
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = set(data) - names
    if unknown:
        where = f" under '{prefix}'" if prefix else ""
        raise SanaError(f"unknown config key(s){where}: {sorted(unknown)}; known: {sorted(names)}")
    kwargs = {k: _coerce(v, hints[k], f"{prefix}.{k}" if prefix else k) for k, v in data.items()}
    return cls(**kwargs)


def to_dict(cfg: Any) -> dict:
    return dataclasses.asdict(cfg)


def _set_dotted(d: dict, dotted: str, value: Any) -> None:
    """Set `a.b.0.c=value`; integer parts index into lists (e.g. one of several VLM entries)."""
    parts = dotted.split(".")
    node: Any = d
    for i, p in enumerate(parts):
        last = i == len(parts) - 1
        if isinstance(node, list):
            if not p.isdigit() or int(p) >= len(node):
                raise SanaError(f"override '{dotted}': '{p}' is not an index of a {len(node)}-item list")
            if last:
                node[int(p)] = value
            else:
                node = node[int(p)]
        elif last:
            node[p] = value
        else:
            if not isinstance(node.get(p), (dict, list)):
                node[p] = {}
            node = node[p]


def parse_override(text: str) -> tuple[str, Any]:
    if "=" not in text:
        raise SanaError(f"override '{text}' must look like key.sub=value")
    key, raw = text.split("=", 1)
    return key.strip(), yaml.safe_load(raw) if raw != "" else ""


def load_config(cls: type[T], preset: T | dict | None = None, path: str | Path | None = None,
                overrides: list[str] | None = None) -> T:
    """Preset (dataclass or dict), then the YAML file, then CLI overrides, each on top of the last."""
    if preset is None:
        data: dict = to_dict(cls())
    elif dataclasses.is_dataclass(preset):
        data = to_dict(preset)
    else:
        data = to_dict(from_dict(cls, dict(preset)))
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise SanaError(f"config file not found: {p}")
        try:
            loaded = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as e:
            raise SanaError(f"config file {p} is not valid YAML: {str(e).splitlines()[0]}") from None
        if not isinstance(loaded, dict):
            raise SanaError(f"config file {p} must hold a mapping at the top level")
        _deep_update(data, loaded)
    for text in overrides or []:
        key, value = parse_override(text)
        _set_dotted(data, key, value)
    return from_dict(cls, data)


def _deep_update(base: dict, new: dict) -> None:
    for k, v in new.items():
        if isinstance(v, dict) and isinstance(base.get(k), dict):
            _deep_update(base[k], v)
        else:
            base[k] = v


def add_config_args(parser: argparse.ArgumentParser, presets: list[str] | None = None,
                    default_preset: str | None = None) -> None:
    """The three arguments every entry point shares: --preset, --config FILE, --set key=value (repeatable)."""
    if presets:
        parser.add_argument("--preset", choices=presets, default=default_preset,
                            help=f"starting configuration (default: {default_preset})")
    parser.add_argument("--config", metavar="FILE", help="YAML file applied on top of the preset")
    parser.add_argument("--set", metavar="KEY=VALUE", action="append", default=[],
                        help="override one config value, dotted keys, YAML values (repeatable), "
                             "e.g. --set optim.lr=1e-4")


def dump_config(cfg: Any, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
