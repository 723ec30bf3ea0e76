"""The config system every entry point uses: preset -> YAML -> --set overrides, typed and strict."""
from __future__ import annotations

import argparse
import subprocess
import sys
from dataclasses import dataclass, field
from typing import Literal, Optional

import pytest

from sana_core.config import add_config_args, dump_config, load_config
from sana_core.errors import SanaError


@dataclass
class Optim:
    lr: float = 1e-4
    betas: tuple[float, float] = (0.9, 0.999)
    schedule: Literal["constant", "cosine"] = "constant"


@dataclass
class Cfg:
    name: str = "run"
    steps: int = 10
    optim: Optim = field(default_factory=Optim)
    tags: list[str] = field(default_factory=list)
    resume_from: Optional[str] = None
    extra: dict[str, int] = field(default_factory=dict)
    stages: list[Optim] = field(default_factory=lambda: [Optim(), Optim()])


def test_layers_apply_in_order(tmp_path):
    y = tmp_path / "c.yaml"
    y.write_text("steps: 20\noptim:\n  lr: 0.001\n  schedule: cosine\n")
    cfg = load_config(Cfg, preset={"name": "p", "steps": 5}, path=y,
                      overrides=["optim.lr=3e-4", "tags=[a, b]", "extra.x=3"])
    assert cfg.name == "p" and cfg.steps == 20
    assert cfg.optim.lr == pytest.approx(3e-4) and cfg.optim.schedule == "cosine"
    assert cfg.optim.betas == (0.9, 0.999) and cfg.tags == ["a", "b"] and cfg.extra == {"x": 3}


def test_overrides_index_into_lists():
    cfg = load_config(Cfg, overrides=["stages.1.lr=0.5", "stages.0.schedule=cosine"])
    assert cfg.stages[1].lr == 0.5 and cfg.stages[0].schedule == "cosine" and cfg.stages[0].lr == 1e-4
    with pytest.raises(SanaError, match="not an index"):
        load_config(Cfg, overrides=["stages.2.lr=1"])


def test_int_is_accepted_for_float_and_yaml_round_trip(tmp_path):
    cfg = load_config(Cfg, overrides=["optim.lr=1"])
    assert isinstance(cfg.optim.lr, float)
    dump_config(cfg, tmp_path / "out.yaml")
    assert load_config(Cfg, path=tmp_path / "out.yaml") == cfg


@pytest.mark.parametrize("override,needle", [
    ("optim.lrr=1", "optim"),
    ("steps=ten", "'steps'"),
    ("optim.schedule=linear", "'optim.schedule'"),
    ("optim.betas=[1, 2, 3]", "'optim.betas'"),
    ("nokey", "key.sub=value"),
])
def test_bad_overrides_name_the_key(override, needle):
    with pytest.raises(SanaError) as e:
        load_config(Cfg, overrides=[override])
    assert needle in str(e.value) and "\n" not in str(e.value)


def test_missing_and_bad_yaml_files(tmp_path):
    with pytest.raises(SanaError, match="not found"):
        load_config(Cfg, path=tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("steps: [1,\n")
    with pytest.raises(SanaError, match="not valid YAML"):
        load_config(Cfg, path=bad)


def test_cli_args_and_one_line_error(tmp_path):
    p = argparse.ArgumentParser()
    add_config_args(p, presets=["tiny", "big"], default_preset="tiny")
    a = p.parse_args(["--set", "steps=3", "--set", "name=x"])
    assert a.preset == "tiny" and a.set == ["steps=3", "name=x"]
    code = ("from sana_core.errors import cli_main, SanaError\n"
            "@cli_main\ndef main():\n    raise SanaError('model path /nope does not exist')\nmain()\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 2
    assert r.stderr.strip() == "error: model path /nope does not exist"
