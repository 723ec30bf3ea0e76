"""Training runs in one process on the CPU with the tiny zoo models: exact resume, non-finite handling, wandb
offline files, the entry points (jobs.train / jobs.sample)."""
import glob
import json
import math
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from sana_core.config import load_config
from training.config import PRESETS, TrainConfig
from training.testdata import write_shards
from training.trainer import NonFiniteLoss, train

REPO = Path(__file__).resolve().parents[1]


def tiny_cfg(*overrides: str) -> TrainConfig:
    base = ["data.batch_size=4", "data.num_workers=2", "data.shuffle_buffer=8", "track.wandb=false",
            "track.sample_prompts=[]", "track.log_every=1", "optim.warmup_steps=3", "checkpoint.every=1000"]
    return load_config(TrainConfig, preset=PRESETS["tiny"], overrides=base + list(overrides))


def losses(run: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())}


@pytest.fixture(scope="module")
def data(tmp_path_factory, zoo):
    d = tmp_path_factory.mktemp("shards")
    write_shards(d, n=24, per_shard=8)
    return d


def test_resume_gives_the_same_losses_bit_for_bit(data, tmp_path):
    """Steps 7..12 of a run resumed from its step-6 checkpoint equal those of an uninterrupted run, exactly
    (==, not a tolerance): same weights, optimizer and EMA state, RNG, and data position, and caption embeddings
    that do not depend on the text cache's history (the resumed run starts with an empty cache)."""
    full = tmp_path / "full"
    train(tiny_cfg("max_steps=12"), data, full)
    part = tmp_path / "part"
    train(tiny_cfg("max_steps=6"), data, part)
    s = train(tiny_cfg("max_steps=12"), data, part, resume=True)
    assert s["steps_this_run"] == 6
    a, b = losses(full), losses(part)
    assert sorted(b) == list(range(1, 13))
    assert [a[i] for i in range(7, 13)] == [b[i] for i in range(7, 13)]
    assert a[12] < a[1]
    ckpts = sorted(p.name for p in (part / "checkpoints").iterdir())
    assert ckpts == ["step-00000006", "step-00000012"]  # renamed from .tmp-*, none left behind
    assert (part / "config.yaml").is_file()


def test_text_cache_hit_equals_a_recomputation_bit_for_bit(data, tmp_path):
    """A caption's cached embedding does not depend on the batch that first encoded it: batched, the encoder's
    last bits follow the batch's padded length, and a resumed run (empty cache) would re-encode in another batch."""
    from training.trainer import Trainer

    trainer = Trainer(tiny_cfg(), data, tmp_path / "probe")
    try:
        cat, long = "a cat", "a small red house by the sea at night under a sky full of stars"
        first, _ = trainer.encode([cat, long])  # cached beside a longer caption
        assert cat in trainer.text_cache
        trainer.text_cache.clear()
        again, _ = trainer.encode([cat, "a dog"])  # recomputed beside a shorter one
        n = trainer.text_cache[cat][0].shape[0]
        assert torch.equal(first[0, :n], again[0, :n])
    finally:
        trainer.close()
        trainer.release()


def test_captions_cut_to_the_batch_longest_train_the_same(data, tmp_path):
    """model.caption_bucket cuts each batch's caption padding after its longest caption (rounded up): the losses
    equal those of full max_length padding up to rounding, with both the text cache and the CFG drop's null
    embedding in play, and the batches really are shorter."""
    from training.trainer import Trainer

    full = tmp_path / "full"
    train(tiny_cfg("max_steps=4", "model.caption_bucket=0", "data.caption_dropout=0.3"), data, full)
    cut = tmp_path / "cut"
    train(tiny_cfg("max_steps=4", "model.caption_bucket=4", "data.caption_dropout=0.3"), data, cut)
    a, b = losses(full), losses(cut)
    assert sorted(a) == sorted(b) == [1, 2, 3, 4]
    for step in a:
        assert math.isclose(a[step], b[step], rel_tol=1e-5), (step, a[step], b[step])
    trainer = Trainer(tiny_cfg("model.caption_bucket=4"), data, tmp_path / "probe")
    try:
        y, mask = trainer.encode(["a cat", "", "a small red house by the sea at night"])
        assert y.shape[1] % 4 == 0 and y.shape[1] < trainer.cfg.model.max_length
        assert mask[:, -4:].any() and mask[:, 0].all()  # the longest caption reaches the last kept bucket
    finally:
        trainer.close()
        trainer.release()


def test_keep_last_k_checkpoints_came_and_gradient_checkpointing(data, tmp_path):
    s = train(tiny_cfg("max_steps=8", "checkpoint.every=2", "checkpoint.keep_last=2", "data.num_workers=0",
                       "optim.name=came", "model.gradient_checkpointing=true"), data, tmp_path)
    assert s["steps"] == 8 and math.isfinite(s["final_loss"])
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step-00000006", "step-00000008"]


def test_nonfinite_skip_mode_continues(tmp_path, zoo):
    write_shards(tmp_path / "d", n=12, per_shard=12, huge_keys=1)
    s = train(tiny_cfg("max_steps=8", "on_nonfinite=skip", "data.num_workers=0"), tmp_path / "d", tmp_path / "r")
    assert s["steps"] == 8 and s["nonfinite_skipped"] >= 1
    assert math.isfinite(s["final_loss"]) and math.isfinite(list(losses(tmp_path / "r").values())[-1])


def test_nonfinite_stop_names_step_and_key_in_one_line(tmp_path, zoo):
    recs = write_shards(tmp_path / "d", n=12, per_shard=12, huge_keys=1)
    with pytest.raises(NonFiniteLoss) as e:
        train(tiny_cfg("max_steps=8", "data.num_workers=0"), tmp_path / "d", tmp_path / "r")
    msg = str(e.value)
    assert "\n" not in msg and "non-finite loss at step" in msg and recs[0]["key"] in msg
    assert recs[1]["key"] not in msg  # only the sample whose loss was not finite


def _wandb_records(path: str):
    """Records of a .wandb file (a LevelDB-style log of protobuf records: 7-byte header, 32 KiB blocks)."""
    from wandb.proto import wandb_internal_pb2 as pb
    data, pos, buf = Path(path).read_bytes(), 7, b""
    assert data[:4] == b":W&B"
    while pos + 7 <= len(data):
        left = 32768 - pos % 32768
        if left < 7:
            pos += left
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if length == 0 and kind == 0:
            pos += left
            continue
        chunk, pos = data[pos + 7:pos + 7 + length], pos + 7 + length
        if kind in (1, 4):
            r = pb.Record()
            r.ParseFromString(buf + chunk if kind == 4 else chunk)
            yield r
        buf = chunk if kind == 2 else buf + chunk if kind == 3 else b""


def test_wandb_offline_files_hold_the_logged_keys_and_image_grid(data, tmp_path, monkeypatch):
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.setenv("WANDB_SILENT", "true")
    cfg = tiny_cfg("max_steps=4", "track.wandb=true", "track.log_every=2", "track.sample_every=4",
                   "track.sample_prompts=[a red square]", "track.sample_steps=2", "data.num_workers=0")
    train(cfg, data, tmp_path)
    runs = glob.glob(str(tmp_path / "wandb" / "offline-run-*" / "*.wandb"))
    assert len(runs) == 1
    keys, _steps = set(), set()
    for r in _wandb_records(runs[0]):
        if r.WhichOneof("record_type") == "history":
            keys |= {i.key or "/".join(i.nested_key) for i in r.history.item}
    for k in ("loss", "lr", "grad_norm", "samples_per_s", "images_per_s_per_gpu", "mfu", "caption/dropped",
              "samples/_type"):
        assert k in keys, (k, sorted(keys))
    assert any(k.startswith("caption/share/vlm-") for k in keys)
    assert (tmp_path / "samples" / "step-00000004.png").is_file()
    assert [r["step"] for r in map(json.loads, (tmp_path / "metrics.jsonl").read_text().splitlines())] == [2, 4]


def run_cli(*args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    env = {"HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline", "PATH": "/usr/bin:/bin", "HOME": str(Path.home())}
    return subprocess.run([sys.executable, *args], cwd=REPO, capture_output=True, text=True, timeout=timeout,
                          env=env, check=False)


def test_cli_train_then_sample_and_export(data, tmp_path):
    run = tmp_path / "run"
    r = run_cli("-m", "jobs.train", "--data", str(data / "shards"), "--output", str(run), "--preset", "tiny",
                "--max-steps", "4", "--set", "track.sample_prompts=[]", "--set", "data.batch_size=4")
    assert r.returncode == 0, r.stderr[-2000:]
    assert "training summary" in r.stdout
    assert (run / "config.yaml").is_file() and (run / "metrics.jsonl").is_file() and (run / "wandb").is_dir()
    out = tmp_path / "img.png"
    r = run_cli("-m", "jobs.sample", "--checkpoint", str(run), "--prompt", "a red square", "--steps", "3",
                "--out", str(out), "--export-diffusers", str(tmp_path / "diffusers"))
    assert r.returncode == 0, r.stderr[-2000:]
    from PIL import Image
    assert Image.open(out).size == (128, 128)
    assert (tmp_path / "diffusers" / "config.json").is_file()


def test_cli_reports_bad_input_in_one_line(tmp_path):
    write_shards(tmp_path / "d", n=4, channels=16)
    r = run_cli("-m", "jobs.train", "--data", str(tmp_path / "d"), "--output", str(tmp_path / "r"),
                "--max-steps", "2")
    assert r.returncode == 2
    assert r.stderr.strip().count("\n") == 0 and "expects (C=32, h, w)" in r.stderr and "(16, 4, 4)" in r.stderr
