"""Read the caption attributes back out of a (32, g, g) latent, deterministically, and score them.

    signal[h, w]  = the largest per-group channel mean at that cell (the object's group carries ~1.2-1.8,
                    the background ~0 +- 0.05)
    position      = the quadrant holding the most positive signal
    size          = "large" when more cells pass the threshold than halfway between a small and a large object
    colour        = the group with the largest mean over the object's cells (the chosen quadrant's cells
                    above threshold, or its strongest cell when none pass)
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from bench.learning.dataset import (
    ATTRIBUTES,
    CHANCE,
    COLOURS,
    GROUP_SIZE,
    GROUPS,
    POSITIONS,
    SCORE_THRESHOLD,
    Attributes,
    small_side,
)


def decode(latent) -> Attributes:
    x = np.asarray(latent, dtype=np.float32)
    if x.ndim != 3 or x.shape[0] != GROUPS * GROUP_SIZE or x.shape[1] != x.shape[2] or x.shape[1] % 2:
        raise ValueError(f"expected a ({GROUPS * GROUP_SIZE}, g, g) latent with g even, got {x.shape}")
    g = x.shape[1]
    q = g // 2
    groups = x.reshape(GROUPS, GROUP_SIZE, g, g).mean(axis=1)  # (GROUPS, g, g)
    signal = groups.max(axis=0)
    pos = np.clip(signal, 0, None)
    quad_energy = [pos[(i // 2) * q:(i // 2 + 1) * q, (i % 2) * q:(i % 2 + 1) * q].sum() for i in range(4)]
    qi = int(np.argmax(quad_energy))
    on = signal > SCORE_THRESHOLD
    small_area, large_area = small_side(g) ** 2, q * q
    size = "large" if on.sum() > (small_area + large_area) / 2 else "small"
    quad = (slice((qi // 2) * q, (qi // 2 + 1) * q), slice((qi % 2) * q, (qi % 2 + 1) * q))
    mask = on[quad]
    if not mask.any():
        mask = signal[quad] == signal[quad].max()
    colour = int(np.argmax(groups[:, quad[0], quad[1]][:, mask].mean(axis=1)))
    return Attributes(colour=COLOURS[colour], position=POSITIONS[qi], size=size)


def score(latents: Sequence, truths: Sequence[Attributes]) -> dict:
    """Per-attribute and joint accuracy of decoded `latents` against `truths`, with the chance levels."""
    if len(latents) != len(truths):
        raise ValueError(f"{len(latents)} latents for {len(truths)} ground truths")
    if not truths:
        raise ValueError("nothing to score")
    decoded = [decode(x) for x in latents]
    hits = {a: [getattr(d, a) == getattr(t, a) for d, t in zip(decoded, truths)] for a in ATTRIBUTES}
    hits["joint"] = [all(hits[a][i] for a in ATTRIBUTES) for i in range(len(truths))]
    acc = {k: float(np.mean(v)) for k, v in hits.items()}
    return {"n": len(truths), "accuracy": acc,
            "mean_attribute_accuracy": float(np.mean([acc[a] for a in ATTRIBUTES])),
            "chance": dict(CHANCE), "mean_attribute_chance": float(np.mean([CHANCE[a] for a in ATTRIBUTES])),
            "decoded": [d.as_dict() for d in decoded]}
