"""DC-AE encoding: each image at its bucket resolution -> float16 latent (C, H/32, W/32), already scaled."""
from __future__ import annotations

from collections import defaultdict

import numpy as np
import torch

from curation.clip_score import pick_device
from curation.stage import Batch, Stage

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class EncodeStage(Stage):
    """image (uint8 at bucket size) -> latent (float16, C x h x w, x scaling factor), latent_scaling_factor."""

    name = "encode"

    def __init__(self, model: str, device: str = "auto", dtype: str = "float32"):
        from sana_core.autoencoder import Autoencoder

        self.device = pick_device(device)
        self.dtype = DTYPES[dtype]
        self.ae = Autoencoder.from_pretrained(model, device=self.device, dtype=self.dtype)
        self.scaling_factor = float(self.ae.scaling_factor)

    @torch.no_grad()
    def encode(self, images: list[np.ndarray]) -> list[np.ndarray]:
        """Same-shape uint8 HxWx3 images -> float16 latents."""
        x = torch.from_numpy(np.stack(images)).to(self.device).permute(0, 3, 1, 2)
        x = (x.to(self.dtype) / 127.5 - 1.0)
        z = self.ae.encode(x)
        z = z.float().cpu().numpy().astype(np.float16)
        return list(z)

    def __call__(self, batch: Batch) -> Batch:
        n = len(batch["image"])
        latents = np.empty(n, dtype=object)
        by_shape: dict[tuple, list[int]] = defaultdict(list)  # one forward pass per bucket in the batch
        for i, img in enumerate(batch["image"]):
            by_shape[tuple(np.asarray(img).shape)].append(i)
        for idx in by_shape.values():
            for i, z in zip(idx, self.encode([np.asarray(batch["image"][i]) for i in idx])):
                latents[i] = z
        return dict(batch, latent=latents, latent_scaling_factor=np.full(n, self.scaling_factor, np.float32))
