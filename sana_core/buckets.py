"""Aspect-ratio buckets shared by curation (resize target) and training/sampling (latent shapes).

Sana trains on buckets of about base x base pixels with sides that are multiples of the DC-AE's
32x downsampling, so every latent in a bucket has the same shape.
"""
from __future__ import annotations

import math

# Height/width ratios, as in PixArt/Sana's ASPECT_RATIO tables (a subset spanning 1:4 .. 4:1).
RATIOS = (0.25, 0.33, 0.4, 0.5, 0.57, 0.6, 0.67, 0.75, 0.8, 0.875, 1.0,
          1.14, 1.25, 1.33, 1.5, 1.67, 1.75, 2.0, 2.5, 3.0, 4.0)


def make_buckets(base: int, multiple: int = 32) -> list[tuple[int, int]]:
    """(height, width) pairs with area close to base**2, sides multiples of `multiple`, unique."""
    out: list[tuple[int, int]] = []
    for r in RATIOS:
        h = max(multiple, round(base * math.sqrt(r) / multiple) * multiple)
        w = max(multiple, round(base / math.sqrt(r) / multiple) * multiple)
        if (h, w) not in out:
            out.append((h, w))
    return out


def nearest_bucket(height: int, width: int, buckets: list[tuple[int, int]]) -> tuple[int, int]:
    """The bucket whose aspect ratio is closest in log space to height/width."""
    r = math.log(height / width)
    return min(buckets, key=lambda hw: abs(math.log(hw[0] / hw[1]) - r))
