"""Multi-process training on the CPU: torchrun with gloo (FSDP2 and DDP) and Ray Train on a private local
cluster, all through `python -m jobs.train`.

The data order and the noise depend only on processes x optim.grad_accum_steps (training/data.py), so:
- a 2-process run and a 1-process run with 2 accumulation steps read the same samples in every step (checked
  on the sample keys each rank logs per micro-batch) and give the same loss curve up to float32 rounding;
- a DCP checkpoint of a 2-process FSDP2 run resumes in 1 process (2 accumulation steps) and a 1-process
  checkpoint resumes in 2 FSDP2 processes, each continuing the uninterrupted run's samples and losses;
- every sample is read once per epoch across ranks.
"""
import json
import os
import shutil
import socket
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

from sana_core.config import load_config
from training.config import PRESETS, TrainConfig
from training.testdata import write_shards
from training.trainer import train

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow

# Float32 on the CPU: the runs differ only in the order of gradient sums (all-reduce vs accumulation), so the
# curves agree to rounding: measured 1.0e-7 relative at most over the 10 steps (2 processes vs 1 with 2
# accumulation steps, and both resumes), 0.0 for DDP with accumulation vs 1 process with 4 steps.
LOSS_RTOL = 1e-5
STEPS, HALF = 10, 5

# 48 samples in 6 shards of 8, 2 grids: 2 slots x 2 workers = 4 streams, each 1 whole shard + a quarter of the
# 2 leftover shards = 12 samples = 4 batches of 4 (2 full, 2 partial buckets) a stream-epoch, so an epoch is
# 8 steps: the 10 steps cover one epoch and part of the next, and step 5 is mid-epoch.
N_SAMPLES = 48
BASE = ["track.sample_prompts=[]", "track.log_every=1", "track.wandb=false", "track.log_sample_keys=true",
        "data.num_workers=2", "data.batch_size=4", "data.shuffle_buffer=8", "optim.warmup_steps=3",
        f"checkpoint.every={HALF}", "checkpoint.keep_last=3", f"max_steps={STEPS}",
        "optim.fused=true"]  # as on CUDA: fused AdamW, on DTensors under FSDP2, its clip scale in the kernel otherwise


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def env() -> dict:
    bindir = str(Path(sys.executable).parent)
    return dict(os.environ, HF_HUB_OFFLINE="1", WANDB_MODE="offline", RAY_USAGE_STATS_ENABLED="0",
                PATH=f"{bindir}:{os.environ.get('PATH', '')}")


def torchrun(data: Path, run: Path, *overrides: str, nproc: int = 2, resume: bool = False) -> None:
    sets = [a for o in [*BASE, *overrides] for a in ("--set", o)]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc), "--master-port",
           str(free_port()), "-m", "jobs.train", "--data", str(data), "--output", str(run), "--preset", "tiny",
           *sets, *(["--resume"] if resume else [])]
    r = subprocess.run(cmd, cwd=REPO, env=env(), capture_output=True, text=True, timeout=600, check=False)
    assert r.returncode == 0, r.stderr[-3000:]


def in_process(data: Path, run: Path, *overrides: str, resume: bool = False) -> dict:
    cfg = load_config(TrainConfig, preset=PRESETS["tiny"], overrides=[*BASE, *overrides])
    return train(cfg, data, run, resume=resume, device="cpu")


def losses(run: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())}


def keys_by_step(run: Path) -> dict[tuple[int, int], dict]:
    """(step, data slot) -> that micro-batch's record (rank, worker, epoch, keys), from every rank's log."""
    out = {}
    for f in sorted((run / "sample_keys").glob("rank-*.jsonl")):
        for r in map(json.loads, f.read_text().splitlines()):
            assert (r["step"], r["slot"]) not in out, f"step {r['step']} slot {r['slot']} logged twice"
            out[r["step"], r["slot"]] = r
    return out


def resumed_copy(src: Path, dst: Path, step: int) -> Path:
    """A run dir holding only src's checkpoint of `step` (what a crash after that checkpoint leaves)."""
    name = f"step-{step:08d}"
    shutil.copytree(src / "checkpoints" / name, dst / "checkpoints" / name)
    shutil.copy(src / "config.yaml", dst / "config.yaml")
    return dst


@pytest.fixture(scope="module")
def data(tmp_path_factory, zoo):
    d = tmp_path_factory.mktemp("shards")
    recs = write_shards(d, n=N_SAMPLES, per_shard=8)
    return d, [r["key"] for r in recs]


@pytest.fixture(scope="module")
def one_proc(data, tmp_path_factory):
    """The reference: 1 process, 2 accumulation steps (2 data slots), checkpoints at steps 5 and 10."""
    run = tmp_path_factory.mktemp("one") / "run"
    s = in_process(data[0], run, "optim.grad_accum_steps=2")
    assert s["world"] == 1 and s["strategy"] == "none"
    return run


@pytest.fixture(scope="module")
def fsdp_two(data, tmp_path_factory):
    """2 FSDP2 processes, 1 micro-batch each (the same 2 data slots), checkpoints at steps 5 and 10."""
    run = tmp_path_factory.mktemp("fsdp") / "run"
    torchrun(data[0], run, "dist.strategy=fsdp")
    return run


def assert_same_samples(a: dict, b: dict, steps: range) -> None:
    for step in steps:
        for slot in (0, 1):
            assert a[step, slot]["keys"] == b[step, slot]["keys"], (step, slot)


def assert_close(a: dict[int, float], b: dict[int, float], steps: range) -> float:
    worst = max(abs(a[i] - b[i]) / abs(b[i]) for i in steps)
    assert worst < LOSS_RTOL, ({i: (a[i], b[i]) for i in steps}, worst)
    return worst


def assert_each_sample_once_per_epoch(rec: dict, all_keys: list[str]) -> None:
    per_epoch: dict[int, Counter] = {}
    for r in rec.values():
        per_epoch.setdefault(r["epoch"], Counter()).update(r["keys"])
    assert per_epoch[0] == Counter(all_keys)  # epoch 0 complete: every sample exactly once over both slots
    assert set(per_epoch) == {0, 1} and max(per_epoch[1].values()) == 1 and len(per_epoch[1]) < len(all_keys)


def test_two_processes_equal_one_process_with_two_accumulation_steps(data, one_proc, fsdp_two):
    ref, two = keys_by_step(one_proc), keys_by_step(fsdp_two)
    assert set(ref) == set(two) == {(s, slot) for s in range(1, STEPS + 1) for slot in (0, 1)}
    assert {r["rank"] for r in two.values()} == {0, 1} and {r["rank"] for r in ref.values()} == {0}
    assert all(two[s, slot]["rank"] == slot for s, slot in two)  # rank r plays slot r
    assert_same_samples(ref, two, range(1, STEPS + 1))
    assert_each_sample_once_per_epoch(two, data[1])
    a, b = losses(one_proc), losses(fsdp_two)
    assert sorted(a) == sorted(b) == list(range(1, STEPS + 1))
    assert_close(b, a, range(1, STEPS + 1))
    assert a[STEPS] < a[1]
    s = json.loads((fsdp_two / "summary.json").read_text())
    assert s["strategy"] == "fsdp" and s["world"] == 2
    ckpt = fsdp_two / "checkpoints" / f"step-{STEPS:08d}"
    assert len(list(ckpt.glob("*.distcp"))) == 2  # one shard file per rank
    assert {p.name for p in ckpt.glob("extra-rank*.json")} == {"extra-rank0.json", "extra-rank1.json"}


def test_fsdp_checkpoint_of_two_processes_resumes_in_one(data, one_proc, fsdp_two, tmp_path):
    run = resumed_copy(fsdp_two, tmp_path / "run", HALF)
    s = in_process(data[0], run, "optim.grad_accum_steps=2", resume=True)
    assert s["steps_this_run"] == STEPS - HALF and s["world"] == 1
    resumed, ref = keys_by_step(run), keys_by_step(one_proc)
    assert min(st for st, _ in resumed) == HALF + 1  # continued from the checkpoint's step
    assert_same_samples(resumed, ref, range(HALF + 1, STEPS + 1))  # ... and its data position
    # with the first half's samples (the same as the reference's), each sample once per epoch across ranks
    first = {k: v for k, v in keys_by_step(fsdp_two).items() if k[0] <= HALF}
    assert_each_sample_once_per_epoch({**first, **resumed}, data[1])
    assert_close(losses(run), losses(one_proc), range(HALF + 1, STEPS + 1))


def test_one_process_checkpoint_resumes_in_two_fsdp_processes(data, one_proc, tmp_path):
    run = resumed_copy(one_proc, tmp_path / "run", HALF)
    torchrun(data[0], run, "dist.strategy=fsdp", resume=True)
    s = json.loads((run / "summary.json").read_text())
    assert s["steps_this_run"] == STEPS - HALF and s["world"] == 2 and s["strategy"] == "fsdp"
    resumed, ref = keys_by_step(run), keys_by_step(one_proc)
    assert min(st for st, _ in resumed) == HALF + 1
    assert {resumed[st, slot]["rank"] for st, slot in resumed} == {0, 1}
    assert_same_samples(resumed, ref, range(HALF + 1, STEPS + 1))
    first = {k: v for k, v in ref.items() if k[0] <= HALF}
    assert_each_sample_once_per_epoch({**first, **resumed}, data[1])
    assert_close(losses(run), losses(one_proc), range(HALF + 1, STEPS + 1))


def test_resume_with_another_slot_count_goes_on_at_the_next_epoch(data, fsdp_two, tmp_path, capsys):
    """2 slots saved, 1 slot now (1 process, no accumulation): the order cannot continue, so the run says so
    and starts the next epoch instead of repeating samples or re-reading earlier epochs."""
    run = resumed_copy(fsdp_two, tmp_path / "run", HALF)
    saved_epoch = max(r["epoch"] for (st, _), r in keys_by_step(fsdp_two).items() if st <= HALF)
    s = in_process(data[0], run, resume=True)
    assert s["steps_this_run"] == STEPS - HALF
    out = capsys.readouterr().out
    assert "saved with 2 slots" in out and f"start of epoch {saved_epoch + 1}" in out
    rec = keys_by_step(run)
    assert sorted(rec) == [(st, 0) for st in range(HALF + 1, STEPS + 1)]
    assert {r["epoch"] for r in rec.values()} == {saved_epoch + 1}
    keys = [k for r in rec.values() for k in r["keys"]]
    assert len(keys) == len(set(keys))


def test_ddp_with_accumulation_equals_one_process_with_four_steps(data, tmp_path):
    """DDP skips the all-reduce of all but the last micro-batch (no_sync); the result is the same as one
    process accumulating all 4 slots."""
    two, one = tmp_path / "two", tmp_path / "one"
    torchrun(data[0], two, "dist.strategy=ddp", "optim.grad_accum_steps=2", f"max_steps={HALF}")
    in_process(data[0], one, "optim.grad_accum_steps=4", f"max_steps={HALF}")
    a, b = keys_by_step(two), keys_by_step(one)
    assert set(a) == set(b) == {(s, slot) for s in range(1, HALF + 1) for slot in range(4)}
    assert {(r["rank"], slot) for (_, slot), r in a.items()} == {(0, 0), (0, 1), (1, 2), (1, 3)}
    for k in a:
        assert a[k]["keys"] == b[k]["keys"], k
    assert_close(losses(two), losses(one), range(1, HALF + 1))
    assert json.loads((two / "summary.json").read_text())["strategy"] == "ddp"


def test_ray_train_two_workers_on_a_local_cluster(data, tmp_path):
    run = tmp_path / "run"
    e = env()
    e.pop("RAY_ADDRESS", None)  # jobs.train then starts its own local cluster (never someone else's)
    sets = [a for o in BASE for a in ("--set", o)]
    cmd = [sys.executable, "-m", "jobs.train", "--data", str(data[0]), "--output", str(run), "--preset", "tiny",
           *sets, "--num-workers", "2"]
    r = subprocess.run(cmd, cwd=REPO, env=e, capture_output=True, text=True, timeout=600, check=False)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "training summary" in r.stdout
    s = json.loads((run / "summary.json").read_text())
    assert s["strategy"] == "ddp" and s["world"] == 2
    assert_each_sample_once_per_epoch(keys_by_step(run), data[1])
    loss = losses(run)
    assert len(loss) == STEPS and loss[STEPS] < loss[1]


BENCH = [sys.executable, str(REPO / "bench" / "bench_distributed.py")]


def test_bench_distributed_on_cpu_with_gloo(tmp_path):
    """bench/bench_distributed.py's CPU mode: one command runs 1 and 2 gloo processes, every strategy."""
    r = subprocess.run([*BENCH, "--device", "cpu", "--config", "tiny", "--batch", "2", "--latent", "4",
                        "--text-tokens", "16", "--warmup", "1", "--steps", "2", "--out", str(tmp_path)],
                       cwd=REPO, env=env(), capture_output=True, text=True, timeout=600, check=False)
    assert r.returncode == 0, r.stderr[-3000:]
    rec = json.loads((tmp_path / "distributed_cpu.json").read_text())
    got = {(row["strategy"], row["world"]) for row in rec["rows"]}
    assert got == {("none", 1)} | {(s, w) for s in ("ddp", "fsdp", "fsdp_keep") for w in (1, 2)}
    for row in rec["rows"]:
        assert row["images_per_s"] > 0 and row["checkpoint_save_s"] > 0 and row["checkpoint_gib"] > 0
        assert len(row["peak_gib_per_rank"]) == row["world"]
    assert set(rec["scaling"]) == {"ddp", "fsdp", "fsdp_keep"} and rec["backend"] == "gloo"
    assert "scaling ddp" in r.stdout


def test_bench_distributed_refuses_without_enough_gpus():
    import torch
    if torch.cuda.device_count() >= 2:
        pytest.skip("this machine has 2 GPUs")
    r = subprocess.run([*BENCH, "--device", "cuda", "--nproc", "2"], cwd=REPO, env=env(), capture_output=True,
                       text=True, timeout=120, check=False)
    assert r.returncode != 0
    assert r.stderr.strip() == (f"bench_distributed: needs 2 CUDA GPUs on this host, found "
                                f"{torch.cuda.device_count()} (use --device cpu --config tiny for the gloo check)")
