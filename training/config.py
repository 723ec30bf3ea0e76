"""The typed training configuration and its presets (loaded with sana_core.config.load_config)."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Literal

from sana_core.dit import DIT_CONFIGS, DiTConfig
from sana_core.flow import FlowConfig
from sana_core.text_encoder import CAPTION_BUCKET
from training.caption_sampler import CaptionSamplerConfig


@dataclass
class DataConfig:
    batch_size: int = 16  # per rank; every batch holds one latent shape (one aspect-ratio bucket)
    num_workers: int = 2  # DataLoader worker processes per rank
    shuffle_buffer: int = 1000  # samples held by the seeded shuffle buffer of each worker
    seed: int = 0
    drop_last: bool = False  # at an epoch's end, drop each bucket's partial batch instead of yielding it
    pin_memory: bool = True  # only on CUDA
    caption_dropout: float = 0.1  # share of samples trained on the empty prompt (classifier-free guidance)
    # A shard that cannot be opened or read to the end is re-read read_retries times (transient errors on shared
    # or object storage), waiting retry_wait seconds doubled each time, then skipped with one warning; a sample
    # without a finite latent of its json's shape is skipped too. Both are counted in the logs and summary.json.
    # fail: stop at the first such shard or sample with one line naming it.
    on_error: Literal["skip", "fail"] = "skip"
    read_retries: int = 2
    retry_wait: float = 1.0


@dataclass
class ModelConfig:
    dit: DiTConfig = field(default_factory=lambda: dataclasses.replace(DIT_CONFIGS["tiny"]))
    # Paths or HF ids; "zoo:gemma" / "zoo:dcae" are the tiny random-weight models sana_core.zoo builds.
    text_encoder: str = "zoo:gemma"
    autoencoder: str = "zoo:dcae"
    max_length: int = 300  # text tokens
    # Each batch's captions are cut to its longest caption, rounded up to a multiple of this (0: always
    # max_length). Exact (padding keys have weight 0 in the cross-attention; sana_core.text_encoder.trim_padding)
    # and cheaper: cross-attention and its projections scale with the tokens kept. With cuda_graphs each length
    # is one more captured graph (they share one memory pool, training/graphs.py).
    caption_bucket: int = CAPTION_BUCKET
    # Embeddings of recent captions kept on the host (entries; 0 = off). The encoder is frozen and, with the cache
    # on, encodes each missed caption on its own (batched, the last bits depend on the batch's padded length), so
    # a hit equals a recomputation and resume stays exact; it only saves time on small data.
    text_cache: int = 0
    gradient_checkpointing: bool = False
    # Replay the DiT's forward and backward as CUDA graphs, one per input shape (training/graphs.py): removes
    # the host's launch overhead, which bounded Sana-0.6B's eager step on the H200. One process, CUDA only.
    cuda_graphs: bool = False


@dataclass
class OptimConfig:
    name: Literal["adamw", "came"] = "adamw"
    lr: float = 1e-4
    betas: tuple[float, float] = (0.9, 0.999)
    weight_decay: float = 0.0
    eps: float = 1e-8
    # AdamW's fused kernel (one pass over parameters, gradients and moments) instead of the foreach kernels:
    # None = fused when every parameter is on CUDA (as bench/bench_train_step.py measures and torchtitan
    # defaults to; it works on FSDP2's DTensors), foreach elsewhere
    fused: bool | None = None
    # Our Triton AdamW (kernels.adamw, sana_core.adamw.TritonAdamW) instead of torch's fused kernel: the same step,
    # and it writes the bf16 weight copies the next forward reads instead of a cast pass (one pass over the
    # parameters instead of two: 17.9 ms against 24.3 for a Sana-1.6B step on an H100, bench/bench_adamw.py).
    # None = it wherever torch's fused kernel would run on plain CUDA tensors (not FSDP2's DTensors, whose steps
    # it would hand to torch's kernel anyway); false = torch's kernel
    triton: bool | None = None
    grad_clip: float = 1.0  # max global grad norm; 0 disables clipping
    # Micro-batches per optimizer step: the global batch is data.batch_size x processes x grad_accum_steps.
    # The data order and noise depend only on processes x grad_accum_steps (see training/data.py), so a
    # 1-GPU run with 2 steps repeats a 2-GPU run, and a checkpoint resumes exactly across such layouts.
    grad_accum_steps: int = 1
    warmup_steps: int = 1000
    schedule: Literal["constant", "cosine"] = "constant"
    min_lr_ratio: float = 0.0  # cosine decays to lr * min_lr_ratio at max_steps


@dataclass
class EMAConfig:
    enabled: bool = True
    decay: float = 0.9999


@dataclass
class DistConfig:
    strategy: Literal["auto", "ddp", "fsdp"] = "auto"  # auto: DDP when there is more than one process
    backend: Literal["auto", "gloo", "nccl"] = "auto"  # auto: nccl on CUDA, gloo on CPU
    bucket_cap_mb: int = 25  # DDP all-reduce bucket size (torch's default; larger across slow links)
    reshard_after_forward: bool = True  # FSDP2: free each block's gathered weights after forward (ZeRO-3)


@dataclass
class CheckpointConfig:
    every: int = 1000  # steps; a final checkpoint is always written at the end
    keep_last: int = 3


@dataclass
class TrackConfig:
    wandb: bool = True
    project: str = "sana-train"
    log_every: int = 10
    sample_every: int = 0  # steps between image grids (0: only at the end)
    sample_prompts: list[str] = field(default_factory=lambda: [
        "a red apple on a wooden table", "a photo of a cat wearing sunglasses",
        "a mountain lake at sunrise", "an astronaut riding a horse"])
    sample_steps: int = 20
    sample_height: int = 512  # pixels
    sample_width: int = 512
    guidance_scale: float = 4.5
    # Debug: each rank appends the sample keys of every micro-batch to RUN/sample_keys/rank-R.jsonl, to audit
    # the data order (each sample once per epoch across ranks, exact continuation on resume).
    log_sample_keys: bool = False
    peak_tflops: float = 989.0  # per device, for the MFU estimate (H100 SXM dense bf16)


# LoRA targets, our module names inside each block (diffusers' names in sana_core.weights.LORA_DIFFUSERS).
LORA_TARGETS = ["attn.qkv", "attn.proj", "cross_attn.q", "cross_attn.kv", "cross_attn.proj", "mlp.inverted",
                "mlp.point"]


@dataclass
class LoraConfig:
    rank: int = 0  # > 0: train LoRA adapters of this rank with peft, base weights frozen (0: train every weight)
    alpha: float = 0.0  # scale alpha / rank; 0 means alpha = rank (scale 1)
    dropout: float = 0.0
    targets: list[str] = field(default_factory=lambda: list(LORA_TARGETS))  # attention and Mix-FFN projections


@dataclass
class TrainConfig:
    data: DataConfig = field(default_factory=DataConfig)
    caption: CaptionSamplerConfig = field(default_factory=CaptionSamplerConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    flow: FlowConfig = field(default_factory=FlowConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    ema: EMAConfig = field(default_factory=EMAConfig)
    dist: DistConfig = field(default_factory=DistConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    track: TrackConfig = field(default_factory=TrackConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    # Weights to start from (jobs.train --init-from): a diffusers SanaTransformer2DModel folder or Hub id, a
    # pipeline folder, or an NVlabs/Sana .pth (FILE.pth#ema / #state_dict picks the entry). "" = random init.
    init_from: str = ""
    max_steps: int = 1000
    seed: int = 0
    precision: Literal["auto", "fp32", "bf16"] = "auto"  # auto: bf16 autocast on CUDA, float32 on CPU
    on_nonfinite: Literal["stop", "skip"] = "stop"


def _tiny() -> TrainConfig:
    c = TrainConfig()
    c.data = DataConfig(batch_size=8, num_workers=1, shuffle_buffer=64)
    c.model.max_length = 32
    c.model.text_cache = 100_000
    c.optim = OptimConfig(lr=1e-3, warmup_steps=20, weight_decay=0.0)
    c.ema.decay = 0.99
    c.flow = FlowConfig(timestep_sampling="logit_normal", shift=1.0)
    c.checkpoint = CheckpointConfig(every=100, keep_last=2)
    c.track.log_every = 10
    c.track.sample_height = c.track.sample_width = 128  # 4x4 latents
    c.track.sample_steps = 10
    c.track.sample_prompts = c.track.sample_prompts[:2]
    c.track.peak_tflops = 0.2  # a 2-core CPU, roughly
    c.max_steps = 300
    return c


def _sana(name: str) -> TrainConfig:
    c = TrainConfig()
    c.model.dit = dataclasses.replace(DIT_CONFIGS[name])
    c.model.text_encoder = "google/gemma-2-2b-it"
    c.model.autoencoder = "mit-han-lab/dc-ae-f32c32-sana-1.0-diffusers"
    c.model.gradient_checkpointing = True
    c.caption = CaptionSamplerConfig(mode="softmax", temperature=1.0)
    c.data = DataConfig(batch_size=32, num_workers=4, shuffle_buffer=2000)
    # Sana trains with CAME at 1e-4 and logit-normal timesteps with flow shift 3 at 1024px.
    c.optim = OptimConfig(name="came", lr=1e-4, weight_decay=0.0, warmup_steps=2000)
    c.flow = FlowConfig(timestep_sampling="logit_normal", shift=3.0)
    c.dist.strategy = "fsdp"
    c.track.sample_every = 2000
    c.max_steps = 100_000
    return c


PRESETS: dict[str, TrainConfig] = {"tiny": _tiny(), "sana-0.6b": _sana("sana-0.6b"), "sana-1.6b": _sana("sana-1.6b")}
