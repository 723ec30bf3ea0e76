"""Fine-tuning from released weights (training.finetune, sana_core.weights): --init-from a diffusers folder and an
NVlabs .pth reproduces the source's output, contradictions are refused, LoRA trains only its adapter, resumes
exactly, and its export loads into diffusers' own SanaPipeline.load_lora_weights with the same output.

Sources are tiny random models saved to disk in each layout; the NVlabs file is written from a diffusers model
with the key names of diffusers' scripts/convert_sana_to_diffusers.py (inverted here, independently of
sana_core.weights)."""
from __future__ import annotations

import glob
import json
import math
import os
from pathlib import Path

import pytest
import torch
from diffusers import SanaTransformer2DModel
from torch.distributed.checkpoint import FileSystemReader

from jobs import sample as sample_job
from jobs.train import build_config, parser
from sana_core.dit import DIT_CONFIGS, DiTConfig
from sana_core.errors import SanaError
from training.testdata import write_shards
from training.trainer import Trainer, train

TINY = DIT_CONFIGS["tiny"]  # caption width 64 = the zoo's tiny Gemma
BASE = ["--preset", "tiny", "--set", "data.batch_size=4", "--set", "data.num_workers=0", "--set",
        "track.wandb=false", "--set", "track.sample_prompts=[]", "--set", "track.log_every=1", "--set",
        "optim.warmup_steps=2", "--set", "checkpoint.every=1000", "--set", "model.text_encoder=zoo:gemma",
        "--set", "model.autoencoder=zoo:dcae"]


def random_diffusers(cfg: DiTConfig, seed: int) -> SanaTransformer2DModel:
    torch.manual_seed(seed)
    ref = SanaTransformer2DModel(**cfg.to_diffusers_config()).eval()
    with torch.no_grad():  # diffusers zero-initialises some layers; random weights exercise every path
        for p in ref.parameters():
            p.normal_(0, 0.2)
    return ref


def to_nvlabs(d: dict[str, torch.Tensor], depth: int) -> dict[str, torch.Tensor]:
    """diffusers -> NVlabs names, the inverse of diffusers' convert_sana_to_diffusers.py."""
    top = {"patch_embed.proj": "x_embedder.proj", "caption_projection.linear_1": "y_embedder.y_proj.fc1",
           "caption_projection.linear_2": "y_embedder.y_proj.fc2", "time_embed.linear": "t_block.1",
           "time_embed.emb.timestep_embedder.linear_1": "t_embedder.mlp.0",
           "time_embed.emb.timestep_embedder.linear_2": "t_embedder.mlp.2", "proj_out": "final_layer.linear"}
    out = {f"{nv}.{s}": d[f"{di}.{s}"] for di, nv in top.items() for s in ("weight", "bias")}
    out["attention_y_norm.weight"] = d["caption_norm.weight"]
    out["final_layer.scale_shift_table"] = d["scale_shift_table"]
    for i in range(depth):
        b, n = f"transformer_blocks.{i}.", f"blocks.{i}."
        out[n + "scale_shift_table"] = d[b + "scale_shift_table"]
        out[n + "attn.qkv.weight"] = torch.cat([d[b + f"attn1.to_{x}.weight"] for x in "qkv"])
        for s in ("weight", "bias"):
            out[n + f"attn.proj.{s}"] = d[b + f"attn1.to_out.0.{s}"]
            out[n + f"cross_attn.q_linear.{s}"] = d[b + f"attn2.to_q.{s}"]
            out[n + f"cross_attn.kv_linear.{s}"] = torch.cat([d[b + f"attn2.to_{x}.{s}"] for x in "kv"])
            out[n + f"cross_attn.proj.{s}"] = d[b + f"attn2.to_out.0.{s}"]
            out[n + f"mlp.inverted_conv.conv.{s}"] = d[b + f"ff.conv_inverted.{s}"]
            out[n + f"mlp.depth_conv.conv.{s}"] = d[b + f"ff.conv_depth.{s}"]
        out[n + "mlp.point_conv.conv.weight"] = d[b + "ff.conv_point.weight"]
    # Keys a released checkpoint carries that have no counterpart (the conversion script drops them).
    out["y_embedder.y_embedding"] = torch.randn(300, 64)
    out["pos_embed"] = torch.zeros(1, 256, 64)
    return {k: v.clone() for k, v in out.items()}


def inputs(seed: int = 0, B: int = 2, hw: tuple[int, int] = (4, 6), L: int = 7):
    g = torch.Generator().manual_seed(seed)
    mask = torch.ones(B, L, dtype=torch.bool)
    mask[1, 3:] = False
    return (torch.randn(B, 32, *hw, generator=g), torch.rand(B, generator=g),
            torch.randn(B, L, 64, generator=g), mask)


def diffusers_out(model, x, t, y, mask) -> torch.Tensor:
    with torch.no_grad():
        return model(x, encoder_hidden_states=y, timestep=t * 1000, encoder_attention_mask=mask.long()).sample


def rel(a, b) -> float:
    return ((a - b).norm() / b.norm()).item()


def config(*args: str):
    argv = [*BASE, *args]
    return build_config(parser().parse_args(["--data", "x", "--output", "y", *argv]), argv)


def losses(run: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())}


@pytest.fixture(scope="module")
def data(tmp_path_factory, zoo):
    d = tmp_path_factory.mktemp("shards")
    write_shards(d, n=16, per_shard=8)
    return d


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    """A diffusers pipeline-shaped folder: model_index.json + transformer/ (config.json, safetensors)."""
    root = tmp_path_factory.mktemp("src") / "pipe"
    ref = random_diffusers(TINY, seed=1)
    ref.save_pretrained(root / "transformer")
    (root / "model_index.json").write_text(json.dumps({"_class_name": "SanaPipeline"}))
    return root, ref


def test_init_from_diffusers_folder_reproduces_diffusers_output(source, data, tmp_path):
    root, ref = source
    cfg = config("--init-from", str(root / "transformer"), "--set", "model.dit.depth=2")  # agreeing: accepted
    assert cfg.model.dit == TINY and cfg.init_from == str((root / "transformer").resolve())
    assert cfg.model.text_encoder == "zoo:gemma"  # explicit wins over the source's default
    trainer = Trainer(cfg, data, tmp_path / "run")
    try:
        x, t, y, mask = inputs()
        with torch.no_grad():
            ours = trainer.model(x, t, y, mask)
        assert rel(ours, diffusers_out(ref, x, t, y, mask)) <= 1e-5
        assert rel(ours, diffusers_out(random_diffusers(TINY, seed=2), x, t, y, mask)) > 0.1  # can fail
    finally:
        trainer.close()
    assert "init_from: " + str((root / "transformer").resolve()) in (tmp_path / "run" / "config.yaml").read_text()


def test_init_from_nvlabs_pth_picks_ema_or_state_dict(data, tmp_path):
    ema_ref, raw_ref = random_diffusers(TINY, seed=3), random_diffusers(TINY, seed=4)
    pth = tmp_path / "Sana_tiny.pth"
    torch.save({"state_dict": to_nvlabs(raw_ref.state_dict(), TINY.depth),
                "ema": to_nvlabs(ema_ref.state_dict(), TINY.depth), "step": 10}, pth)
    x, t, y, mask = inputs(1)
    for spec, ref in ((str(pth), ema_ref), (f"{pth}#state_dict", raw_ref)):
        cfg = config("--init-from", spec)
        assert cfg.model.dit == TINY
        trainer = Trainer(cfg, data, tmp_path / spec[-6:])
        try:
            with torch.no_grad():
                assert rel(trainer.model(x, t, y, mask), diffusers_out(ref, x, t, y, mask)) <= 1e-5
        finally:
            trainer.close()


def test_init_from_pth_without_our_encoder_settings_defaults_to_the_released_ones(tmp_path):
    pth = tmp_path / "m.pth"
    torch.save({"state_dict": to_nvlabs(random_diffusers(TINY, 0).state_dict(), TINY.depth)}, pth)
    argv = ["--preset", "tiny", "--init-from", str(pth)]
    cfg = build_config(parser().parse_args(["--data", "x", "--output", "y", *argv]), argv)
    assert cfg.model.text_encoder == "google/gemma-2-2b-it"
    assert cfg.model.autoencoder == "mit-han-lab/dc-ae-f32c32-sana-1.0-diffusers"


@pytest.mark.parametrize("bad", [["--set", "model.dit.depth=3"], ["--preset", "sana-0.6b"]])
def test_contradicting_dit_setting_is_refused_in_one_line(source, bad):
    root, _ = source
    with pytest.raises(SanaError) as e:
        config("--init-from", str(root), *bad)
    msg = str(e.value)
    assert "\n" not in msg and "contradicts" in msg
    assert ("model.dit.depth=3" in msg and "depth=2" in msg) if "model.dit.depth=3" in bad else "hidden_size" in msg


def test_lora_trains_only_the_adapter_resumes_exactly_and_exports_to_diffusers(source, data, tmp_path, capsys):
    root, ref = source
    lora = ["--init-from", str(root), "--set", "lora.rank=4", "--set", "lora.alpha=8", "--set", "optim.lr=3e-3",
            "--set", "ema.decay=0.5"]
    full, part = tmp_path / "full", tmp_path / "part"
    s = train(config(*lora, "--max-steps", "6"), data, full)
    assert 0 < s["trainable_params"] < s["params"] / 4
    train(config(*lora, "--max-steps", "3"), data, part)
    train(config(*lora, "--max-steps", "6"), data, part, resume=True)
    a, b = losses(full), losses(part)
    assert [a[i] for i in range(4, 7)] == [b[i] for i in range(4, 7)]  # exact resume

    ckpt = full / "checkpoints" / "step-00000006"
    keys = set(FileSystemReader(str(ckpt)).read_metadata().state_dict_metadata)
    weights = [k for k in keys if k.startswith(("model.", "ema."))]
    assert weights and all(".lora_A." in k or ".lora_B." in k for k in weights), sorted(weights)[:5]
    assert not any("base_layer" in k for k in keys)
    # A full checkpoint holds 4 float32 copies of the model (weights, EMA, two Adam moments); this one far less.
    model_bytes = sum(p.numel() * 4 for p in ref.parameters())
    assert sum(p.stat().st_size for p in ckpt.iterdir()) < 1.5 * model_bytes

    # Only the adapter moved: every base tensor equals the source's; lora_B left zero.
    from sana_core.dit import LinearDiT
    from training.checkpoint import load_weights_for_inference
    from training.finetune import prepare_model
    cfg = config(*lora, "--max-steps", "6")
    adapted = prepare_model(LinearDiT(cfg.model.dit), cfg)
    load_weights_for_inference(ckpt, adapted, prefer_ema=False)
    base = LinearDiT(cfg.model.dit)
    prepare_model(base, config("--init-from", str(root)))
    for k, v in adapted.state_dict().items():
        if ".lora_" in k:
            continue
        assert torch.equal(v, base.state_dict()[k.replace(".base_layer.", ".")]), k
    assert all(v.abs().max() > 0 for k, v in adapted.state_dict().items() if ".lora_B." in k)

    # Export the adapter; diffusers' own loader applies it; same output as ours with the adapter (EMA weights).
    out = tmp_path / "lora"
    sample_job.main(["--checkpoint", str(full), "--prompt", "a red square", "--steps", "2", "--out",
                     str(tmp_path / "a.png"), "--export-diffusers", str(out)])
    assert (tmp_path / "a.png").is_file() and (out / "pytorch_lora_weights.safetensors").is_file()
    from diffusers import FlowMatchEulerDiscreteScheduler
    from diffusers import SanaPipeline as DiffusersSanaPipeline
    theirs = SanaTransformer2DModel.from_pretrained(root / "transformer")
    pipe = DiffusersSanaPipeline(tokenizer=None, text_encoder=None, vae=None, transformer=theirs,
                                 scheduler=FlowMatchEulerDiscreteScheduler())
    pipe.load_lora_weights(str(out))
    x, t, y, mask = inputs(2)
    ema_adapted = prepare_model(LinearDiT(cfg.model.dit), cfg)
    assert load_weights_for_inference(ckpt, ema_adapted, prefer_ema=True) == "ema"
    with torch.no_grad():
        ours = ema_adapted(x, t, y, mask)
    with_adapter = diffusers_out(pipe.transformer, x, t, y, mask)
    assert rel(with_adapter, ours) <= 1e-5
    assert rel(diffusers_out(ref, x, t, y, mask), ours) > 1e-3  # the adapter changes the function
    # The export folder names its base: jobs.sample takes it as --checkpoint, diffusers fusing the adapter.
    from training.finetune import load_lora_export
    fused, fused_cfg = load_lora_export(out)
    with torch.no_grad():
        assert rel(fused(x, t, y, mask), ours) <= 1e-5
    assert fused_cfg.model.text_encoder == "zoo:gemma" and fused_cfg.init_from == str(root.resolve())
    sample_job.main(["--checkpoint", str(out), "--prompt", "a red square", "--steps", "2", "--out",
                     str(tmp_path / "d.png"), "--height", "128", "--width", "128"])
    assert (tmp_path / "d.png").is_file()

    # The merged export is a full diffusers model with the same function, and jobs.sample reads it back.
    merged = tmp_path / "merged"
    sample_job.main(["--checkpoint", str(full), "--prompt", "a red square", "--steps", "2", "--out",
                     str(tmp_path / "b.png"), "--export-diffusers", str(merged), "--merged", "--height", "128"])
    assert rel(diffusers_out(SanaTransformer2DModel.from_pretrained(merged), x, t, y, mask), ours) <= 1e-5
    # Our export names its encoders (sana_stack.json), so --init-from it needs no encoder settings.
    again = build_config(parser().parse_args(["--data", "x", "--output", "y", "--init-from", str(merged)]), [])
    assert again.model.dit == TINY and again.model.text_encoder == "zoo:gemma"
    sample_job.main(["--checkpoint", str(merged), "--prompt", "a red square", "--steps", "2", "--out",
                     str(tmp_path / "c.png"), "--height", "128", "--width", "128", "--guidance-scale", "4.5"])
    import numpy as np
    from PIL import Image
    assert np.array_equal(np.asarray(Image.open(tmp_path / "b.png")), np.asarray(Image.open(tmp_path / "c.png")))


def test_lora_validation_samples_and_the_source_reach_wandb(source, data, tmp_path, monkeypatch):
    """Fixed-prompt samples of the adapted model every N steps, and init_from in wandb's run config."""
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    root, _ = source
    cfg = config("--init-from", str(root), "--set", "lora.rank=2", "--max-steps", "2", "--set",
                 "track.sample_every=2", "--set", "track.sample_prompts=[a red square]", "--set",
                 "track.sample_steps=2", "--set", "track.wandb=true")
    train(cfg, data, tmp_path)
    assert (tmp_path / "samples" / "step-00000002.png").is_file()
    (log,) = glob.glob(str(tmp_path / "wandb" / "offline-run-*" / "*.wandb"))
    raw = Path(log).read_bytes()
    assert str(root.resolve()).encode() in raw and b"samples" in raw


def test_lora_bad_target_is_refused(source, data, tmp_path):
    root, _ = source
    with pytest.raises(SanaError, match="lora.targets"):
        train(config("--init-from", str(root), "--set", "lora.rank=2", "--set", "lora.targets=[attn.qk]",
                     "--max-steps", "1"), data, tmp_path)


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_lora_under_torchrun_gloo_trains_and_resumes(source, data, tmp_path, strategy):
    """2 processes, DDP or FSDP2: the adapter trains from the diffusers source, checkpoints hold only it, and a
    resume from the step-3 checkpoint continues with the same losses."""
    import shutil
    import socket
    import subprocess
    import sys

    root, _ = source
    sets = BASE[2:]  # without --preset tiny (given below)

    def torchrun(run: Path, *extra: str) -> None:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", str(port),
               "-m", "jobs.train", "--data", str(data), "--output", str(run), "--preset", "tiny", *sets,
               "--init-from", str(root), "--set", "lora.rank=4", "--set", "optim.lr=3e-3", "--set",
               f"dist.strategy={strategy}", "--set", "checkpoint.every=3", "--max-steps", "6", *extra]
        env = dict(os.environ, HF_HUB_OFFLINE="1", WANDB_MODE="offline",
                   PATH=f"{Path(sys.executable).parent}:{os.environ.get('PATH', '')}")
        r = subprocess.run(cmd, cwd=Path(__file__).resolve().parents[1], env=env, capture_output=True, text=True,
                           timeout=600, check=False)
        assert r.returncode == 0, r.stderr[-3000:]

    full = tmp_path / "full"
    torchrun(full)
    s = json.loads((full / "summary.json").read_text())
    assert s["strategy"] == strategy and s["world"] == 2 and s["trainable_params"] < s["params"] / 4
    a = losses(full)
    assert sorted(a) == list(range(1, 7)) and all(map(math.isfinite, a.values()))
    for step in ("step-00000003", "step-00000006"):
        keys = FileSystemReader(str(full / "checkpoints" / step)).read_metadata().state_dict_metadata
        weights = [k for k in keys if k.startswith(("model.", "ema."))]
        assert weights and all(".lora_A." in k or ".lora_B." in k for k in weights), sorted(weights)[:4]
    part = tmp_path / "part"
    shutil.copytree(full, part)
    shutil.rmtree(part / "checkpoints" / "step-00000006")
    torchrun(part, "--resume")
    b = losses(part)
    assert [a[i] for i in range(4, 7)] == [b[i] for i in range(4, 7)]


FUSED_CHECK = r"""
import os, sys, torch
from sana_core.dit import DIT_CONFIGS, LinearDiT
from training.config import LoraConfig
from training.finetune import add_lora
torch.manual_seed(0)
model = add_lora(LinearDiT(DIT_CONFIGS["tiny"]), LoraConfig(rank=4))
with torch.no_grad():
    for n, p in model.named_parameters():
        if ".lora_B." in n:
            p.normal_(0, 0.1)
x, t, y = torch.randn(2, 32, 4, 6), torch.rand(2), torch.randn(2, 5, 64)
out = {}
for backend in ("torch", "triton"):
    os.environ["SANA_ATTENTION_BACKEND"] = os.environ["SANA_BLOCK_BACKEND"] = backend
    model.zero_grad()
    o = model(x, t, y)
    o.square().mean().backward()
    grads = torch.cat([p.grad.flatten() for n, p in model.named_parameters() if p.requires_grad])
    out[backend] = (o.detach(), grads)
rel = lambda a, b: ((a - b).norm() / b.norm()).item()
print(rel(out["triton"][0], out["torch"][0]), rel(out["triton"][1], out["torch"][1]), out["torch"][1].norm().item())
"""


@pytest.mark.slow
def test_lora_through_the_fused_triton_kernels_matches_pytorch():
    """The adapted model on the Triton linear-attention and block kernels (interpreter on the CPU): same output
    and same LoRA gradients as on the PyTorch path."""
    import subprocess
    import sys
    env = dict(os.environ, TRITON_INTERPRET="1")
    r = subprocess.run([sys.executable, "-c", FUSED_CHECK], cwd=Path(__file__).resolve().parents[1], env=env,
                       capture_output=True, text=True, timeout=600, check=False)
    assert r.returncode == 0, r.stderr[-3000:]
    out_rel, grad_rel, grad_norm = map(float, r.stdout.split()[-3:])
    assert out_rel <= 1e-5 and grad_rel <= 1e-4 and grad_norm > 0, r.stdout


def test_nvlabs_options_we_do_not_have_and_missing_keys_are_named(tmp_path):
    sd = to_nvlabs(random_diffusers(TINY, 0).state_dict(), TINY.depth)
    torch.save({"state_dict": {**sd, "blocks.0.attn.q_norm.weight": torch.ones(64)}}, tmp_path / "qk.pth")
    with pytest.raises(SanaError, match="q_norm"):
        config("--init-from", str(tmp_path / "qk.pth"))
    del sd["blocks.1.cross_attn.proj.bias"]
    torch.save({"state_dict": sd}, tmp_path / "cut.pth")
    from sana_core.dit import LinearDiT
    from training.finetune import load_source_weights, resolve_source
    src = resolve_source(str(tmp_path / "cut.pth"), TINY)
    with pytest.raises(SanaError, match=r"missing \['blocks.1.cross_attn.proj.bias'\]"):
        load_source_weights(LinearDiT(TINY), src)
    with pytest.raises(SanaError, match="no 'ema' entry"):
        resolve_source(f"{tmp_path / 'cut.pth'}#ema", TINY)


def test_pipeline_folder_gives_its_own_text_encoder_and_vae(source, zoo, tmp_path):
    """A diffusers Sana pipeline folder: the transformer/, and (unless set) its text_encoder/+tokenizer/ and vae/,
    which TextEncoder / Autoencoder load from the folder."""
    import shutil

    from sana_core.autoencoder import Autoencoder
    from sana_core.text_encoder import TextEncoder
    root, _ = source
    pipe = tmp_path / "pipe"
    shutil.copytree(root / "transformer", pipe / "transformer")
    shutil.copytree(zoo.gemma, pipe / "text_encoder")
    shutil.copytree(zoo.gemma, pipe / "tokenizer")
    shutil.copytree(zoo.dcae, pipe / "vae")
    (pipe / "model_index.json").write_text(json.dumps({"_class_name": "SanaPipeline"}))
    argv = ["--init-from", str(pipe)]
    cfg = build_config(parser().parse_args(["--data", "x", "--output", "y", *argv]), argv)
    assert cfg.model.dit == TINY and cfg.model.text_encoder == cfg.model.autoencoder == str(pipe.resolve())
    assert TextEncoder.from_pretrained(cfg.model.text_encoder).hidden_size == TINY.caption_channels
    assert Autoencoder.from_pretrained(cfg.model.autoencoder).latent_channels == 32
    argv = ["--init-from", str(pipe / "transformer")]  # its transformer/ subfolder: the same defaults
    assert build_config(parser().parse_args(["--data", "x", "--output", "y", *argv]), argv).model.autoencoder == \
        str(pipe.resolve())


def test_cli_refuses_a_contradicting_depth_in_one_line(source, data, tmp_path):
    import subprocess
    import sys
    root, _ = source
    r = subprocess.run([sys.executable, "-m", "jobs.train", "--data", str(data), "--output", str(tmp_path / "r"),
                        "--init-from", str(root), "--set", "model.dit.depth=4"], cwd=Path(__file__).resolve().parents[1],
                       capture_output=True, text=True, timeout=300, check=False,
                       env=dict(os.environ, HF_HUB_OFFLINE="1", WANDB_MODE="offline"))
    assert r.returncode == 2 and r.stderr.strip().count("\n") == 0, r.stderr
    assert "model.dit.depth=4 contradicts the source's depth=2" in r.stderr
    assert not (tmp_path / "r").exists()  # refused before anything is written
