"""Pick one caption per image per step, weighted by its CLIP score (Sana, arXiv 2410.10629, sec. 2.4).

Two weightings:

  softmax   P(i) = exp(s_i / T) / sum_j exp(s_j / T)                the paper's formula; T -> 0 picks the best
  sana      P(i) ~ s_i ** (1 / max(T, 0.01)), only s_i >= threshold  NVlabs/Sana's `weighted_sample_clipscore`
            (diffusion/data/datasets/sana_data.py); no caption passing the threshold -> the best-scored one

A caption with a missing or non-finite score is never picked. An image left with no caption is skipped
(`pick` returns None) and counted, so the loader can warn once with the total.

The choice is a pure function of (seed, epoch, key): exact resume needs no sampler state, and two ranks
reading the same sample would agree.
"""
from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from typing import Literal

import numpy as np

from sana_core.errors import SanaError


@dataclass
class CaptionSamplerConfig:
    mode: Literal["softmax", "sana", "best", "uniform"] = "softmax"
    temperature: float = 1.0  # CLIP scores are cosine x 100, so T ~ 1 separates captions a few points apart
    threshold: float = 0.0  # "sana" mode only: scores below it are excluded
    seed: int = 0


def softmax_probs(scores: np.ndarray, temperature: float) -> np.ndarray:
    if temperature <= 0:
        out = np.zeros(len(scores))
        out[int(np.argmax(scores))] = 1.0
        return out
    z = (scores - scores.max()) / temperature  # shift for stability; the softmax is unchanged
    p = np.exp(z)
    return p / p.sum()


def sana_probs(scores: np.ndarray, temperature: float, threshold: float) -> np.ndarray:
    keep = scores >= threshold
    if not keep.any():
        out = np.zeros(len(scores))
        out[int(np.argmax(scores))] = 1.0
        return out
    # score ** (1/T) is only defined for non-negative scores; CLIP cosine x 100 below 0 never carries weight.
    w = np.where(keep, np.clip(scores, 0.0, None), 0.0) ** (1.0 / max(temperature, 0.01))
    if w.sum() <= 0 or not np.isfinite(w.sum()):
        out = np.zeros(len(scores))
        out[int(np.argmax(np.where(keep, scores, -np.inf)))] = 1.0
        return out
    return w / w.sum()


class CaptionSampler:
    def __init__(self, cfg: CaptionSamplerConfig):
        if cfg.mode not in ("softmax", "sana", "best", "uniform"):
            raise SanaError(f"caption_sampler.mode {cfg.mode!r} is not one of softmax, sana, best, uniform")
        if cfg.temperature < 0 or not math.isfinite(cfg.temperature):
            raise SanaError(f"caption_sampler.temperature must be >= 0, got {cfg.temperature}")
        self.cfg = cfg
        self.skipped = 0  # images with no usable caption

    def probabilities(self, captions: dict[str, str], scores: dict[str, float]) -> tuple[list[str], np.ndarray]:
        """The candidate VLM names (non-empty caption, finite score) and their probabilities."""
        names, vals = [], []
        for name in sorted(captions):
            s = scores.get(name)
            if not captions[name] or s is None:
                continue
            try:
                s = float(s)
            except (TypeError, ValueError):
                continue
            if math.isfinite(s):
                names.append(name)
                vals.append(s)
        if not names:
            return [], np.zeros(0)
        s = np.asarray(vals, dtype=np.float64)
        mode = self.cfg.mode
        if mode == "softmax":
            p = softmax_probs(s, self.cfg.temperature)
        elif mode == "sana":
            p = sana_probs(s, self.cfg.temperature, self.cfg.threshold)
        elif mode == "best":
            p = softmax_probs(s, 0.0)
        else:
            p = np.full(len(s), 1.0 / len(s))
        return names, p

    def rng(self, key: str, epoch: int, draw: int = 0) -> np.random.Generator:
        h = int.from_bytes(hashlib.sha256(f"{key}/{epoch}/{draw}".encode()).digest()[:8], "little")
        return np.random.default_rng([self.cfg.seed, h])

    def pick(self, key: str, captions: dict[str, str], scores: dict[str, float], epoch: int = 0,
             draw: int = 0) -> tuple[str, str, float] | None:
        """(vlm name, caption, score) for this image at this epoch, or None if it has no usable caption."""
        names, p = self.probabilities(captions, scores)
        if not names:
            self.skipped += 1
            return None
        i = int(self.rng(key, epoch, draw).choice(len(names), p=p))
        return names[i], captions[names[i]], float(scores[names[i]])
