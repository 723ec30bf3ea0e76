"""Text to image: prompts -> Gemma-2 embeddings -> flow sampler over the Linear DiT -> DC-AE decode -> PIL images.

Same steps and conventions as diffusers' SanaPipeline (use_resolution_binning=False): the negative prompt is
encoded without the complex human instruction, guidance runs cond and uncond in one batch, and the sampler
walks the shifted flow time grid (shift 3.0 is the flow_shift of the released Sana schedulers).

What it does for speed and memory at high resolution:
- everything runs under torch.inference_mode;
- the text encoder runs once per call: the prompts in one batch, the negative prompt once (one row, broadcast
  to the batch), both cast to the DiT's dtype and device once, not every step;
- guidance is batched: the uncond and cond halves go through the DiT as one 2B batch (samplers.guided);
- DC-AE decodes one image at a time, and an image larger than `decode_tile` pixels on a side in overlapping
  tiles (diffusers' AutoencoderDC tiled decode, blended seams), so 4096 x 4096 decodes in the memory of a
  decode_tile-sized image;
- on CUDA the DiT's forward is captured in a CUDA graph at the second step and replayed for the others
  (`cuda_graphs`; at small batches the forward is bound by kernel launches, not by the GPU);
- `compile=True` compiles each DiT block (regional torch.compile, dynamic shapes: one compile serves
  every resolution and batch size);
- `timings` holds the last call's seconds per phase (text, denoise, decode), device-synchronised.
"""
from __future__ import annotations

import contextlib
import time

import numpy as np
import torch
from PIL import Image

from kernels.linear import copies_checked_by_caller
from sana_core.autoencoder import Autoencoder
from sana_core.dit import LinearDiT
from sana_core.errors import SanaError
from sana_core.samplers import guided, sample
from sana_core.text_encoder import CAPTION_BUCKET, TextEncoder, trim_padding

DECODE_TILE = 2048  # pixels a side decoded in one piece (bf16 f32c32: a few GiB); larger images are tiled
DECODE_OVERLAP = 128  # pixels two neighbouring tiles share (blended linearly)


def to_pil(images: torch.Tensor) -> list[Image.Image]:
    """(B, 3, H, W) in [-1, 1] -> PIL, rounded like diffusers' image processor."""
    arr = (images.float() / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).cpu().numpy()
    return [Image.fromarray(a) for a in (arr * 255).round().astype(np.uint8)]


def peak_memory_gib(device: torch.device | str | None = None) -> float | None:
    """Peak allocated memory on a CUDA device since the last reset, in GiB (None on the CPU)."""
    device = torch.device(device) if device is not None else None
    if device is not None and device.type != "cuda" or not torch.cuda.is_available():
        return None
    return torch.cuda.max_memory_allocated(device) / 2**30


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@contextlib.contextmanager
def _tiled(vae, tile: int, overlap: int):
    """diffusers' AutoencoderDC tiling switched on for the duration, with our tile size (then restored, so a
    caller sharing the VAE, such as a diffusers pipeline, sees it as it was)."""
    names = ("use_tiling", "tile_sample_min_height", "tile_sample_min_width", "tile_sample_stride_height",
             "tile_sample_stride_width", "tile_latent_min_height", "tile_latent_min_width")
    saved = {n: getattr(vae, n) for n in names}
    vae.enable_tiling(tile_sample_min_height=tile, tile_sample_min_width=tile,
                      tile_sample_stride_height=tile - overlap, tile_sample_stride_width=tile - overlap)
    try:
        yield
    finally:
        for n, v in saved.items():
            setattr(vae, n, v)


def compile_blocks(dit: LinearDiT, backend: str = "inductor", fullgraph: bool = False) -> LinearDiT:
    """Regional compilation: each block compiled (they share one compiled graph), dynamic in batch and tokens.
    Every Triton kernel of the block is a torch.library op, so the whole block, self-attention included, is one
    graph (before the attention became an op, Dynamo traced into its direct launches and failed on the CUDA
    stream query, H200, torch 2.11)."""
    for block in dit.blocks:
        block.compile(dynamic=True, backend=backend, fullgraph=fullgraph)
    return dit


class _GraphedSteps:
    """The DiT's forward replayed from a CUDA graph for the steps of one sampling call.

    At a few thousand tokens the forward is bound by the host (hundreds of launches, ~40 ms a step for
    Sana-0.6B against a few ms of GPU work); a graph replays them in one launch. The first step runs eager on
    a side stream (it is also the warm-up the capture needs: every kernel compiled, every workspace made),
    the second is captured and every step from then on replays it on copies of its inputs. A capture that
    fails falls back to eager for the rest of the call. The graph and its memory live as long as the call."""

    def __init__(self, fn):
        self.fn, self.graph, self.static, self.out, self.failed = fn, None, None, None, False

    def __call__(self, *args):
        if self.failed:
            return self.fn(*args)
        if self.static is None:
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                out = self.fn(*args)
            torch.cuda.current_stream().wait_stream(side)
            self.static = [a.clone() for a in args]
            return out
        if self.graph is None:
            for s, a in zip(self.static, args):
                s.copy_(a)
            try:
                graph = torch.cuda.CUDAGraph()
                # the weights cannot change within the call: the replays may read the persistent weight copies
                with torch.cuda.graph(graph), copies_checked_by_caller():
                    self.out = self.fn(*self.static)
                self.graph = graph
            except RuntimeError:  # noqa: BLE001 - something in the forward is not capturable: stay eager
                self.failed, self.out = True, None
                torch.cuda.synchronize()
                return self.fn(*args)
        else:
            for s, a in zip(self.static, args):
                s.copy_(a)
        self.graph.replay()
        return self.out.clone()


class SanaPipeline:
    def __init__(self, dit: LinearDiT, text_encoder: TextEncoder, autoencoder: Autoencoder, shift: float = 3.0,
                 decode_tile: int = DECODE_TILE, compile: bool = False, cuda_graphs: bool = True,
                 caption_bucket: int = CAPTION_BUCKET):
        if text_encoder.hidden_size != dit.cfg.caption_channels:
            raise SanaError(f"text encoder hidden size {text_encoder.hidden_size} != DiT caption_channels "
                            f"{dit.cfg.caption_channels}")
        if autoencoder.latent_channels != dit.cfg.in_channels:
            raise SanaError(f"autoencoder latent channels {autoencoder.latent_channels} != DiT in_channels "
                            f"{dit.cfg.in_channels}")
        f = autoencoder.spatial_compression
        if decode_tile <= DECODE_OVERLAP or decode_tile % f:
            raise SanaError(f"decode_tile {decode_tile} must be a multiple of {f} above {DECODE_OVERLAP} pixels")
        self.dit, self.text_encoder, self.autoencoder, self.shift = dit.eval(), text_encoder, autoencoder, shift
        self.decode_tile = decode_tile
        self.cuda_graphs = cuda_graphs
        # Prompts cut to the longest of the batch (and the negative prompt), rounded up to this: exact (padding
        # keys have weight 0) and every denoising step's cross-attention shrinks with it (0: pad to max_length).
        self.caption_bucket = caption_bucket
        if compile:
            compile_blocks(self.dit)
        self.timings: dict[str, float] = {}

    @property
    def device(self) -> torch.device:
        return next(self.dit.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return self.dit.x_embedder.weight.dtype

    @torch.inference_mode()
    def encode_prompts(self, prompts: list[str], negative_prompt: str = "") -> tuple[torch.Tensor, ...]:
        """(y, y_mask, y_null, y_null_mask) on the DiT's device and dtype; the negative prompt as one row. Both cut
        to one length: the longest prompt's, rounded up to caption_bucket (trim_padding)."""
        y, y_mask, used = self.text_encoder.encode_lengths(prompts)
        y_null, y_null_mask, used_null = self.text_encoder.encode_lengths([negative_prompt], instruction=False)
        most, max_length = max(used + used_null), self.text_encoder.max_length
        y, y_mask = trim_padding(y, y_mask, most, self.caption_bucket, max_length)
        y_null, y_null_mask = trim_padding(y_null, y_null_mask, most, self.caption_bucket, max_length)
        dev, dtype = self.device, self.dtype
        return y.to(dev, dtype), y_mask.to(dev), y_null.to(dev, dtype), y_null_mask.to(dev)

    @torch.inference_mode()
    def latents(self, prompts: list[str], height: int, width: int, steps: int = 20, guidance_scale: float = 4.5,
                solver: str = "flow_dpm", seed: int = 0, negative_prompt: str = "", shift: float | None = None,
                noise: torch.Tensor | None = None, progress: bool = False) -> torch.Tensor:
        """The sampled (scaled) latents, before decoding; `noise` overrides the seeded starting noise."""
        if isinstance(prompts, str):
            prompts = [prompts]
        f = self.autoencoder.spatial_compression
        if height % f or width % f or height <= 0 or width <= 0:
            raise SanaError(f"image size {height}x{width} must be positive multiples of {f} (the DC-AE compression)")
        B, dtype, dev = len(prompts), self.dtype, self.device
        t0 = time.perf_counter()
        y, y_mask, y_null, y_null_mask = self.encode_prompts(prompts, negative_prompt)
        _sync(dev)
        t1 = time.perf_counter()
        if noise is None:
            # Drawn on the CPU so that a seed gives the same image on any device.
            g = torch.Generator().manual_seed(seed)
            noise = torch.randn(B, self.dit.cfg.in_channels, height // f, width // f, generator=g)
        noise = noise.to(dev, torch.float32)

        dit = _GraphedSteps(self.dit) if self.cuda_graphs and dev.type == "cuda" else self.dit

        def model_fn(x, t, y_, m_):
            # The solver state stays float32 whatever the DiT runs in; t keeps the solver's precision (the DiT
            # scales it by 1000 before embedding).
            return dit(x.to(dtype), t, y_, m_).float()

        fn = guided(model_fn, y, y_mask, y_null, y_null_mask, guidance_scale)
        # flow_dpm: the model sees floor(1000 t) like under diffusers' DPMSolverMultistepScheduler (samplers.py).
        out = sample(fn, noise, steps=steps, solver=solver, shift=self.shift if shift is None else shift,
                     integer_timesteps=solver == "flow_dpm", progress=progress)
        _sync(dev)
        self.timings = {"text": t1 - t0, "denoise": time.perf_counter() - t1}
        return out

    @torch.inference_mode()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Scaled latents (B, C, h, w) -> images (B, 3, h*f, w*f): one image at a time, tiled above decode_tile."""
        ae = self.autoencoder
        f = ae.spatial_compression
        t0 = time.perf_counter()
        big = max(latents.shape[-2:]) * f > self.decode_tile
        with _tiled(ae.vae, self.decode_tile, DECODE_OVERLAP) if big else contextlib.nullcontext():
            images = torch.cat([ae.decode(z[None]) for z in latents])
        _sync(images.device)
        self.timings["decode"] = time.perf_counter() - t0
        return images

    def __call__(self, prompts: list[str], height: int = 1024, width: int = 1024, steps: int = 20,
                 guidance_scale: float = 4.5, solver: str = "flow_dpm", seed: int = 0, negative_prompt: str = "",
                 shift: float | None = None, progress: bool = False, output: str = "pil"):
        """Images for the prompts: PIL (output="pil") or the decoded tensor in [-1, 1] (output="pt")."""
        lat = self.latents(prompts, height, width, steps, guidance_scale, solver, seed, negative_prompt, shift,
                           progress=progress)
        images = self.decode(lat)
        return to_pil(images) if output == "pil" else images
