"""Text to image: prompts -> Gemma-2 embeddings -> flow sampler over the Linear DiT -> DC-AE decode -> PIL images.

Same steps and conventions as diffusers' SanaPipeline (use_resolution_binning=False): the negative prompt is
encoded without the complex human instruction, guidance runs cond and uncond in one batch, and the sampler
walks the shifted flow time grid (shift 3.0 is the flow_shift of the released Sana schedulers).
"""
from __future__ import annotations

import numpy as np
import torch
from PIL import Image

from sana_core.autoencoder import Autoencoder
from sana_core.dit import LinearDiT
from sana_core.errors import SanaError
from sana_core.samplers import guided, sample
from sana_core.text_encoder import TextEncoder


def to_pil(images: torch.Tensor) -> list[Image.Image]:
    """(B, 3, H, W) in [-1, 1] -> PIL, rounded like diffusers' image processor."""
    arr = (images.float() / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).cpu().numpy()
    return [Image.fromarray(a) for a in (arr * 255).round().astype(np.uint8)]


class SanaPipeline:
    def __init__(self, dit: LinearDiT, text_encoder: TextEncoder, autoencoder: Autoencoder, shift: float = 3.0):
        if text_encoder.hidden_size != dit.cfg.caption_channels:
            raise SanaError(f"text encoder hidden size {text_encoder.hidden_size} != DiT caption_channels "
                            f"{dit.cfg.caption_channels}")
        if autoencoder.latent_channels != dit.cfg.in_channels:
            raise SanaError(f"autoencoder latent channels {autoencoder.latent_channels} != DiT in_channels "
                            f"{dit.cfg.in_channels}")
        self.dit, self.text_encoder, self.autoencoder, self.shift = dit.eval(), text_encoder, autoencoder, shift

    @property
    def device(self) -> torch.device:
        return next(self.dit.parameters()).device

    @torch.no_grad()
    def latents(self, prompts: list[str], height: int, width: int, steps: int = 20, guidance_scale: float = 4.5,
                solver: str = "flow_dpm", seed: int = 0, negative_prompt: str = "", shift: float | None = None,
                noise: torch.Tensor | None = None, progress: bool = False) -> torch.Tensor:
        """The sampled (scaled) latents, before decoding; `noise` overrides the seeded starting noise."""
        if isinstance(prompts, str):
            prompts = [prompts]
        f = self.autoencoder.spatial_compression
        if height % f or width % f or height <= 0 or width <= 0:
            raise SanaError(f"image size {height}x{width} must be positive multiples of {f} (the DC-AE compression)")
        B, dtype, dev = len(prompts), next(self.dit.parameters()).dtype, self.device
        y, y_mask = self.text_encoder.encode(prompts)
        y_null, y_null_mask = self.text_encoder.encode([negative_prompt] * B, instruction=False)
        if noise is None:
            # Drawn on the CPU so that a seed gives the same image on any device.
            g = torch.Generator().manual_seed(seed)
            noise = torch.randn(B, self.dit.cfg.in_channels, height // f, width // f, generator=g)
        noise = noise.to(dev, torch.float32)

        def model_fn(x, t, y_, m_):
            # The solver state stays float32 whatever the DiT runs in; t keeps the solver's precision (the DiT
            # scales it by 1000 before embedding).
            return self.dit(x.to(dtype), t, y_.to(dev, dtype), m_.to(dev)).float()

        fn = guided(model_fn, y, y_mask, y_null, y_null_mask, guidance_scale)
        # flow_dpm: the model sees floor(1000 t) like under diffusers' DPMSolverMultistepScheduler (samplers.py).
        return sample(fn, noise, steps=steps, solver=solver, shift=self.shift if shift is None else shift,
                      integer_timesteps=solver == "flow_dpm", progress=progress)

    @torch.no_grad()
    def __call__(self, prompts: list[str], height: int = 1024, width: int = 1024, steps: int = 20,
                 guidance_scale: float = 4.5, solver: str = "flow_dpm", seed: int = 0, negative_prompt: str = "",
                 shift: float | None = None, progress: bool = False) -> list[Image.Image]:
        lat = self.latents(prompts, height, width, steps, guidance_scale, solver, seed, negative_prompt, shift,
                           progress=progress)
        return to_pil(self.autoencoder.decode(lat))
