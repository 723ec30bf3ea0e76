"""model.cuda_graphs (training/graphs.py): refused in one line where it cannot run; on a GPU, a run with graphs
trains exactly like the eager run (same losses step for step, two aspect-ratio buckets = two captured shapes)."""
import json
from pathlib import Path

import pytest
import torch

from sana_core.config import load_config
from sana_core.errors import SanaError
from training import graphs
from training.config import PRESETS, TrainConfig
from training.testdata import write_shards
from training.trainer import train


def cfg(*overrides: str) -> TrainConfig:
    base = ["data.batch_size=4", "data.num_workers=0", "data.shuffle_buffer=8", "track.wandb=false",
            "track.sample_prompts=[]", "track.log_every=1", "optim.warmup_steps=3", "checkpoint.every=1000",
            "max_steps=8"]
    return load_config(TrainConfig, preset=PRESETS["tiny"], overrides=base + list(overrides))


def losses(run: Path) -> list[float]:
    return [json.loads(ln)["loss"] for ln in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def data(tmp_path_factory, zoo):
    d = tmp_path_factory.mktemp("graphs")
    write_shards(d, n=32, per_shard=8, grids=((4, 4), (4, 8)))
    return d


def test_refused_where_graphs_cannot_run():
    cuda = torch.device("cuda")
    with pytest.raises(SanaError, match="needs a CUDA device, this run is on cpu"):
        graphs.check(True, torch.device("cpu"), "none", False)
    with pytest.raises(SanaError, match="one process only, not under ddp"):
        graphs.check(True, cuda, "ddp", False)
    with pytest.raises(SanaError, match="gradient_checkpointing"):
        graphs.check(True, cuda, "none", True)
    graphs.check(True, cuda, "none", False)
    graphs.check(False, torch.device("cpu"), "fsdp", True)  # off: nothing to refuse


def test_trainer_refuses_graphs_on_the_cpu_before_writing(data, tmp_path):
    with pytest.raises(SanaError, match="model.cuda_graphs=true needs a CUDA device") as e:
        train(cfg("model.cuda_graphs=true"), data, tmp_path / "run", device="cpu")
    assert "\n" not in str(e.value)
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_graphed_run_matches_the_eager_run(data, tmp_path):
    train(cfg(), data, tmp_path / "eager", device="cuda")
    train(cfg("model.cuda_graphs=true"), data, tmp_path / "graphed", device="cuda")
    eager, graphed = losses(tmp_path / "eager"), losses(tmp_path / "graphed")
    assert len(eager) == len(graphed) == 8
    # the same kernels on the same inputs; only the step's launch differs
    assert graphed == pytest.approx(eager, rel=1e-4), (eager, graphed)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_graphed_run_with_the_triton_adamw_matches_the_eager_run(data, tmp_path):
    # optim.triton (the default on CUDA): the optimizer writes the model's persistent bf16 weight copies, which
    # the captured forward reads without a check of its own (GraphedModel refreshes them before each replay);
    # stale copies would train on the step-0 weights. Against torch's AdamW, eager: the same step up to float32
    # rounding.
    train(cfg("optim.triton=false"), data, tmp_path / "eager", device="cuda")
    train(cfg("model.cuda_graphs=true", "optim.triton=true"), data, tmp_path / "graphed", device="cuda")
    eager, graphed = losses(tmp_path / "eager"), losses(tmp_path / "graphed")
    assert len(eager) == len(graphed) == 8
    assert graphed == pytest.approx(eager, rel=1e-3), (eager, graphed)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_graphed_accumulation_and_caption_lengths_match_the_eager_run(data, tmp_path):
    # Two micro-batches a step: without GraphedModel.detach_gradients the second replay overwrites the .grad that
    # autograd took from the graph's static buffer (pytorch/pytorch#181723), and the step's gradient is 2 x the
    # second micro-batch's. caption_bucket 1 cuts each batch to its longest caption: several caption lengths,
    # each one more captured graph in the one shared pool.
    extra = ("optim.grad_accum_steps=2", "model.caption_bucket=1")
    train(cfg(*extra), data, tmp_path / "eager", device="cuda")
    train(cfg(*extra, "model.cuda_graphs=true"), data, tmp_path / "graphed", device="cuda")
    eager, graphed = losses(tmp_path / "eager"), losses(tmp_path / "graphed")
    assert len(eager) == len(graphed) == 8
    assert graphed == pytest.approx(eager, rel=1e-4), (eager, graphed)
    lengths = {json.loads(ln)["caption_tokens"] for ln in (tmp_path / "graphed" / "metrics.jsonl").read_text().splitlines()}
    assert len(lengths) > 1, lengths  # more than one caption length was captured and replayed


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_captured_shapes_share_one_memory_pool():
    # Four caption lengths = four captured graphs of about the same activation memory. In one shared pool they
    # hold about one graph's worth; with a pool each (PyTorch's default) they would hold about four.
    from sana_core.dit import DiTConfig, LinearDiT

    torch.manual_seed(0)
    model = LinearDiT(DiTConfig(hidden_size=256, depth=4, num_heads=8, cross_heads=4, caption_channels=64)).cuda()
    graphed = graphs.GraphedModel(model)

    def step(L: int) -> None:
        x, t = torch.randn(16, 32, 32, 32, device="cuda"), torch.rand(16, device="cuda")
        y = torch.randn(16, L, 64, device="cuda")
        mask = torch.ones(16, L, dtype=torch.bool, device="cuda")
        with torch.autocast("cuda", dtype=torch.bfloat16, cache_enabled=False):
            out = graphed(x, t, y, mask)
        out.float().square().mean().backward()
        model.zero_grad(set_to_none=True)

    torch.cuda.synchronize()
    base = torch.cuda.memory_reserved()
    step(16)
    torch.cuda.synchronize()
    one = torch.cuda.memory_reserved() - base
    for L in (8, 12, 4):
        step(L)
    torch.cuda.synchronize()
    four = torch.cuda.memory_reserved() - base
    assert len(graphed.graphs) == 4
    assert four < 1.5 * one, (one / 2**20, four / 2**20)
