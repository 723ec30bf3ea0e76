"""Multi-process training on the CPU: torchrun with gloo (DDP and FSDP2) and Ray Train on a private local
cluster, all through `python -m jobs.train`, each lowering the loss."""
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from training.testdata import write_shards

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def data(tmp_path_factory, zoo):
    d = tmp_path_factory.mktemp("shards")
    write_shards(d, n=32, per_shard=8)
    return d


COMMON = ["--preset", "tiny", "--max-steps", "24", "--set", "track.sample_prompts=[]", "--set", "track.log_every=1",
          "--set", "data.num_workers=0", "--set", "data.batch_size=4", "--set", "optim.warmup_steps=3"]


def env() -> dict:
    bindir = str(Path(sys.executable).parent)
    return dict(os.environ, HF_HUB_OFFLINE="1", WANDB_MODE="offline", RAY_USAGE_STATS_ENABLED="0",
                PATH=f"{bindir}:{os.environ.get('PATH', '')}")


def check_run(run: Path, strategy: str, world: int) -> None:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    loss = [r["loss"] for r in rows]
    assert len(loss) == 24
    assert sum(loss[-4:]) / 4 < 0.8 * sum(loss[:4]) / 4, loss
    s = json.loads((run / "summary.json").read_text())
    assert s["strategy"] == strategy and s["world"] == world
    ckpt = run / "checkpoints" / "step-00000024"
    assert len(list(ckpt.glob("*.distcp"))) == world  # one shard file per rank
    assert {p.name for p in ckpt.glob("extra-rank*.pt")} == {f"extra-rank{r}.pt" for r in range(world)}


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_torchrun_gloo_two_processes(data, tmp_path, strategy):
    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", str(free_port()),
           "-m", "jobs.train", "--data", str(data), "--output", str(run), *COMMON, "--set", f"dist.strategy={strategy}"]
    r = subprocess.run(cmd, cwd=REPO, env=env(), capture_output=True, text=True, timeout=600, check=False)
    assert r.returncode == 0, r.stderr[-3000:]
    check_run(run, strategy, 2)


def test_ray_train_two_workers_on_a_local_cluster(data, tmp_path):
    run = tmp_path / "run"
    e = env()
    e.pop("RAY_ADDRESS", None)  # jobs.train then starts its own local cluster (never someone else's)
    cmd = [sys.executable, "-m", "jobs.train", "--data", str(data), "--output", str(run), *COMMON,
           "--num-workers", "2"]
    r = subprocess.run(cmd, cwd=REPO, env=e, capture_output=True, text=True, timeout=600, check=False)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "training summary" in r.stdout
    check_run(run, "ddp", 2)
