"""DC-AE (deep compression autoencoder, 32x / 32 channels for Sana) as a thin wrapper over diffusers.AutoencoderDC.

The DiT sees latents already multiplied by `scaling_factor` (unit-ish variance), as in diffusers' SanaPipeline;
`encode` applies it and `decode` removes it, so no caller ever handles it.
"""
from __future__ import annotations

from pathlib import Path

import torch

from sana_core.errors import SanaError


class Autoencoder:
    def __init__(self, vae):
        self.vae = vae.eval().requires_grad_(False)
        self.scaling_factor: float = float(vae.config.scaling_factor)
        self.spatial_compression: int = int(vae.spatial_compression_ratio)
        self.latent_channels: int = int(vae.config.latent_channels)

    @classmethod
    def from_pretrained(cls, path_or_hf_id: str, device: str | torch.device = "cpu",
                        dtype: torch.dtype = torch.float32) -> Autoencoder:
        """An AutoencoderDC folder or hub id (e.g. mit-han-lab/dc-ae-f32c32-sana-1.0-diffusers), or a diffusers
        Sana repo with a vae/ subfolder."""
        from diffusers import AutoencoderDC

        path_or_hf_id = str(path_or_hf_id)
        kw = {"subfolder": "vae"} if (Path(path_or_hf_id) / "vae").is_dir() else {}
        try:
            vae = AutoencoderDC.from_pretrained(path_or_hf_id, torch_dtype=dtype, **kw)
        except Exception as e:
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise SanaError(f"cannot load the DC-AE autoencoder from {path_or_hf_id!r}: {first}") from e
        return cls(vae.to(device))

    @property
    def device(self) -> torch.device:
        return next(self.vae.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.vae.parameters()).dtype

    def _check(self, x: torch.Tensor, channels: int, multiple: int, what: str) -> None:
        if x.dim() != 4 or x.shape[1] != channels or x.shape[2] % multiple or x.shape[3] % multiple:
            raise SanaError(f"Autoencoder.{what} expects (B, {channels}, H, W) with H, W multiples of {multiple}, "
                            f"got {tuple(x.shape)}")

    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """images (B, 3, H, W) in [-1, 1], H and W multiples of spatial_compression -> scaled latents."""
        self._check(images, 3, self.spatial_compression, "encode")
        latents = self.vae.encode(images.to(self.device, self.dtype)).latent
        return latents * self.scaling_factor

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """scaled latents (B, latent_channels, h, w) -> images (B, 3, h * f, w * f), roughly in [-1, 1]."""
        self._check(latents, self.latent_channels, 1, "decode")
        return self.vae.decode(latents.to(self.device, self.dtype) / self.scaling_factor).sample
