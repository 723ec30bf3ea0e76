"""Training never mixes or loses runs and survives bad data: bad shards and samples skipped and counted
(data.on_error), checkpoint extra state without pickle, the run folder's lock, refusal of a used folder,
--new-output, the config check on --resume, and no secret in any output file."""
import json
import os
import pickle
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from sana_core.config import load_config
from sana_core.errors import SanaError
from training import checkpoint as ckpt
from training.config import PRESETS, TrainConfig
from training.testdata import write_bad_shards, write_shards
from training.trainer import train

REPO = Path(__file__).resolve().parents[1]


def cfg(*overrides: str) -> TrainConfig:
    base = ["data.batch_size=4", "data.num_workers=0", "data.shuffle_buffer=8", "track.wandb=false",
            "track.sample_prompts=[]", "track.log_every=1", "optim.warmup_steps=3", "checkpoint.every=1000",
            "data.retry_wait=0"]
    return load_config(TrainConfig, preset=PRESETS["tiny"], overrides=base + list(overrides))


def metrics(run: Path) -> list[dict]:
    return [json.loads(ln) for ln in (run / "metrics.jsonl").read_text().splitlines()]


def run_cli(*args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    env = {"HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline", "PATH": "/usr/bin:/bin", "HOME": str(Path.home())}
    return subprocess.run([sys.executable, "-m", "jobs.train", *args], cwd=REPO, capture_output=True, text=True,
                          timeout=timeout, env=env, check=False)


@pytest.fixture(scope="module")
def bad_data(tmp_path_factory, zoo):
    d = tmp_path_factory.mktemp("bad")
    write_shards(d, n=8, per_shard=8)
    return d, write_bad_shards(d)


@pytest.fixture(scope="module")
def data(tmp_path_factory, zoo):
    d = tmp_path_factory.mktemp("good")
    write_shards(d, n=16, per_shard=8)
    return d


# --- bad shards and samples -------------------------------------------------------------------------------------

def test_bad_shards_and_samples_train_to_the_end_and_are_counted(bad_data, tmp_path, capfd):
    d, bad = bad_data
    s = train(cfg("max_steps=10"), d, tmp_path)  # 16 usable samples an epoch: 10 steps are 2-3 epochs
    assert s["steps"] == 10 and np.isfinite(s["final_loss"])
    assert s["shards_skipped"] == 3 and sorted(Path(u).name for u in s["skipped_shards"]) == bad["bad_shards"]
    last = metrics(tmp_path)[-1]
    assert 3 <= s["samples_skipped"] <= 3 * (last["epoch"] + 1)  # the 3 bad samples, once in each epoch read
    assert json.loads((tmp_path / "summary.json").read_text())["shards_skipped"] == 3
    assert last["shards_skipped"] == 3 and last["samples_skipped"] == s["samples_skipped"]
    err = capfd.readouterr().err
    for name in bad["bad_shards"]:  # one warning line per bad shard, however many epochs read it
        assert sum(name in ln and ln.startswith("warning: skipped shard") for ln in err.splitlines()) == 1


def test_on_error_fail_stops_with_one_line_naming_the_shard(bad_data, tmp_path):
    d, _ = bad_data
    r = run_cli("--data", str(d), "--output", str(tmp_path / "r"), "--max-steps", "4", "--set", "data.on_error=fail",
                "--set", "data.retry_wait=0", "--set", "track.sample_prompts=[]", "--set", "data.num_workers=1")
    assert r.returncode == 2, r.stderr[-2000:]
    # (stderr also holds the text encoder's loading bar: the error is the last line, and the only error line)
    lines = r.stderr.strip().splitlines()
    err = lines[-1]
    assert err.startswith("error: shard ") and "data.on_error=fail" in err and "shard-9000" in err
    assert sum(ln.startswith("error") or "Traceback" in ln for ln in lines) == 1


def test_exact_resume_holds_when_shards_were_skipped(bad_data, tmp_path):
    d, _ = bad_data
    full = train(cfg("max_steps=8", "data.num_workers=2"), d, tmp_path / "full")
    train(cfg("max_steps=4", "data.num_workers=2"), d, tmp_path / "part")
    part = train(cfg("max_steps=8", "data.num_workers=2"), d, tmp_path / "part", resume=True)
    a = {r["step"]: r["loss"] for r in metrics(tmp_path / "full")}
    b = {r["step"]: r["loss"] for r in metrics(tmp_path / "part")}
    assert sorted(b) == list(range(1, 9)) and [a[i] for i in range(5, 9)] == [b[i] for i in range(5, 9)]
    assert (part["shards_skipped"], part["samples_skipped"]) == (full["shards_skipped"], full["samples_skipped"])
    assert full["shards_skipped"] == 3


# --- checkpoint extra state ---------------------------------------------------------------------------------------

class _Payload:
    """Unpickling this runs code (here: creates a file). A safe loader never gets that far."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_extra_state_round_trips_without_pickle():
    torch.manual_seed(3)
    extra = {"step": 7, "rng": ckpt.rng_state(), "generator": torch.Generator().get_state(),
             "slots": {0: {"workers": {1: (2, 3)}, "x": [1.5, float("inf"), None, "s"]}},
             "arr": np.arange(5, dtype=np.uint32), "__tuple__": "a key that looks like a tag"}
    tensors: dict = {}
    tree = ckpt._encode(extra, tensors, "extra")
    back = ckpt._decode(json.loads(json.dumps(tree)), tensors, "extra")
    assert back["slots"] == {0: {"workers": {1: (2, 3)}, "x": [1.5, float("inf"), None, "s"]}}
    assert back["arr"].dtype == np.uint32 and back["arr"].tolist() == [0, 1, 2, 3, 4]
    assert back["__tuple__"] == "a key that looks like a tag"
    ckpt.set_rng_state(back["rng"])  # python, numpy and torch states are accepted as they come back
    assert torch.equal(back["generator"], extra["generator"])
    with pytest.raises(TypeError, match=r"extra.bad: cannot store a _Payload"):
        ckpt._encode({"bad": _Payload("x")}, {}, "extra")


def test_loading_a_checkpoint_never_unpickles(data, tmp_path):
    run = tmp_path / "run"
    train(cfg("max_steps=2"), data, run)
    step = ckpt.latest(run / "checkpoints")
    assert sorted(p.name for p in step.glob("extra-*")) == ["extra-rank0.json", "extra-rank0.safetensors"]
    marker = tmp_path / "pwned"
    # 1. A pickle where the safetensors file belongs: safetensors reads a JSON header, never pickle.
    good = (step / "extra-rank0.safetensors").read_bytes()
    (step / "extra-rank0.safetensors").write_bytes(pickle.dumps(_Payload(str(marker))))
    with pytest.raises(SanaError, match="extra state .* is unreadable"):
        train(cfg("max_steps=4"), data, run, resume=True)
    assert not marker.exists()
    # 2. An old-style extra-rank0.pt (what torch.load(weights_only=False) used to read) instead of the JSON.
    (step / "extra-rank0.safetensors").write_bytes(good)
    (step / "extra-rank0.json").unlink()
    torch.save({"step": 2, "evil": _Payload(str(marker))}, step / "extra-rank0.pt")
    with pytest.raises(SanaError) as e:
        train(cfg("max_steps=4"), data, run, resume=True)
    assert "pickle" in str(e.value) and "\n" not in str(e.value) and not marker.exists()
    assert not (run / ".sana.lock").exists()  # a refused start frees the folder


# --- the run folder ---------------------------------------------------------------------------------------------

def test_used_folder_refused_new_output_moves_it_aside_and_resume_checks_the_config(data, tmp_path, capsys):
    run = tmp_path / "run"
    train(cfg("max_steps=2"), data, run)
    assert not (run / ".sana.lock").exists()  # released at the end
    with pytest.raises(SanaError) as e:
        train(cfg("max_steps=2"), data, run)
    msg = str(e.value)
    assert "\n" not in msg and "already holds a training run (checkpoints up to step-00000002)" in msg
    assert "--resume" in msg and "--new-output" in msg

    # A changed depth is refused in one line before DCP sees the checkpoint (it used to be a raw traceback).
    with pytest.raises(SanaError) as e:
        train(cfg("max_steps=4", "model.dit.depth=3", "data.batch_size=2"), data, run, resume=True)
    msg = str(e.value)
    assert "\n" not in msg and "model.dit.depth 2 -> 3" in msg and "data.batch_size 4 -> 2" in msg
    assert "optim" not in msg

    # A new lr (and max_steps) is applied, not replaced by the restored optimizer's or scheduler's, and said.
    # The records a run wrote after its last checkpoint before dying (here step 3 and a cut line) are dropped.
    with (run / "metrics.jsonl").open("a") as f:
        f.write(json.dumps({"step": 3, "loss": 9.0, "lr": 1.0}) + "\n" + '{"step": 4, "lo')
    capsys.readouterr()
    s = train(cfg("max_steps=4", "optim.lr=5e-4"), data, run, resume=True)
    out = capsys.readouterr().out
    assert "changed on resume: optim.lr 0.001 -> 0.0005" in out and "changed on resume: max_steps 2 -> 4" in out
    lrs = {r["step"]: r["lr"] for r in metrics(run)}
    assert lrs[1] == pytest.approx(1e-3 * 2 / 3) and lrs[2] == 1e-3 and lrs[3] == 5e-4 and lrs[4] == 5e-4
    assert s["steps"] == 4 and sorted(lrs) == [1, 2, 3, 4]

    # --new-output moves the whole earlier run to a sibling and says so in one line.
    s = train(cfg("max_steps=1"), data, run, new_output=True)
    line = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("--new-output")]
    assert len(line) == 1 and f"moved the earlier run in {run} (checkpoints up to step-00000004)" in line[0]
    old = [p for p in tmp_path.iterdir() if p.name.startswith("run.old-")]
    assert len(old) == 1 and (old[0] / "checkpoints" / "step-00000004").is_dir()
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step-00000001"]
    assert [r["step"] for r in metrics(run)] == [1]


def test_cli_refuses_a_used_folder_and_a_locked_one(data, tmp_path):
    run = tmp_path / "run"
    (run / "checkpoints" / "step-00000003").mkdir(parents=True)
    (run / "checkpoints" / "step-00000003" / "meta.json").write_text("{}")
    common = ("--data", str(data), "--output", str(run), "--max-steps", "1", "--set", "track.sample_prompts=[]")
    r = run_cli(*common)
    assert r.returncode == 2 and r.stderr.strip().count("\n") == 0
    assert "already holds a training run (checkpoints up to step-00000003)" in r.stderr
    # A live job holds the folder: refused, naming its host and pid.
    code = ("import sys, time; from sana_core.lock import OutputLock; "
            "OutputLock(sys.argv[1], what='training run').acquire(); print('held', flush=True); time.sleep(120)")
    holder = subprocess.Popen([sys.executable, "-c", code, str(run)], cwd=REPO, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        r = run_cli(*common, "--resume")
        assert r.returncode == 2 and r.stderr.strip().count("\n") == 0, r.stderr[-2000:]
        assert f"in use by another training run on host {socket.gethostname()} pid {holder.pid}" in r.stderr
    finally:
        holder.kill()
        holder.wait()


def test_no_secret_in_any_output_file(data, tmp_path):
    """A signed URL with user:password (the autoencoder is only loaded to draw samples, which are off here)
    passed with --set: config.yaml, meta.json, summary.json, metrics and every wandb file are free of it."""
    run = tmp_path / "run"
    url = "https://bob:hunter2@models.example/dcae?X-Amz-Signature=s3cr3tsig&X-Amz-Credential=AKIAXYZ&v=1"
    r = run_cli("--data", str(data), "--output", str(run), "--max-steps", "2", "--set", "track.sample_prompts=[]",
                "--set", f"model.autoencoder={url}", "--set", "track.wandb=true")
    assert r.returncode == 0, r.stderr[-2000:]
    files = [p for p in run.rglob("*") if p.is_file()]
    assert any(p.name == "config.yaml" for p in files) and any(p.suffix == ".wandb" for p in files)
    for p in files:
        raw = p.read_bytes()
        for secret in (b"hunter2", b"s3cr3tsig", b"AKIAXYZ"):
            assert secret not in raw, (p, secret)
    assert "https://models.example/dcae?v=1" in (run / "config.yaml").read_text()
