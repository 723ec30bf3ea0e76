"""Metrics: metrics.jsonl and wandb (offline unless the user asked for online), on rank 0 only.

FLOPs for the MFU estimate, per image of h x w latent tokens (patch 1) and L text tokens, forward + backward:
    6 * P * N                       every DiT weight multiplies every image token (P = DiT parameters)
  + 3 * depth * 4 * N * C * d       ReLU linear self-attention: K^T V and Q (K^T V), d = head dim
  + 3 * depth * 4 * N * L * C       softmax cross-attention: Q K^T and A V
The frozen text encoder's forward is not counted (it does no training work).
"""
from __future__ import annotations

import json
import os
import sys
import time
from collections import Counter
from pathlib import Path

from sana_core.dit import DiTConfig
from sana_core.secrets import redact_argv


def train_flops_per_image(params: int, cfg: DiTConfig, h: int, w: int, text_tokens: int) -> float:
    n = (h // cfg.patch_size) * (w // cfg.patch_size)
    c = cfg.hidden_size
    attn = cfg.depth * (4 * n * c * cfg.head_dim + 4 * n * text_tokens * c)
    return 6.0 * params * n + 3.0 * attn


class Tracker:
    def __init__(self, run_dir: Path, config: dict, enabled: bool, use_wandb: bool, project: str,
                 resume_id: str | None = None):
        self.enabled = enabled
        self.run = None
        self.metrics_path = run_dir / "metrics.jsonl"
        self.captions = Counter()  # VLM -> times its caption was taken (rank 0's batches)
        self.captions_window = Counter()
        self.dropped = 0
        self.summary: dict = {}
        if not enabled:
            return
        if use_wandb:
            import wandb
            # Offline unless the user set WANDB_MODE (or has an API key and wants to sync later).
            os.environ.setdefault("WANDB_MODE", "offline")
            os.environ.setdefault("WANDB_SILENT", "true")
            # `config` comes redacted (training.rundir.public_config); wandb also records the command line in
            # the run's metadata, so it sees a redacted one (a --set with a token or a signed URL, say).
            argv, sys.argv = sys.argv, sys.argv[:1] + redact_argv(sys.argv[1:])
            try:
                self.run = wandb.init(project=project, dir=str(run_dir), config=config, id=resume_id,
                                      resume="allow" if resume_id else None, name=run_dir.name)
            finally:
                sys.argv = argv

    @property
    def run_id(self) -> str | None:
        return self.run.id if self.run is not None else None

    def count_captions(self, vlms: list[str], dropped: list[bool]) -> None:
        for v, d in zip(vlms, dropped):
            if d:
                self.dropped += 1
            else:
                self.captions[v] += 1
                self.captions_window[v] += 1

    def log(self, step: int, metrics: dict) -> None:
        if not self.enabled:
            return
        total = sum(self.captions_window.values())
        for v, c in sorted(self.captions_window.items()):
            metrics[f"caption/share/{v}"] = c / total
        for v, c in sorted(self.captions.items()):
            metrics[f"caption/count/{v}"] = c
        metrics["caption/dropped"] = self.dropped
        self.captions_window.clear()
        with open(self.metrics_path, "a") as f:
            f.write(json.dumps({"step": step, "time": time.time(), **metrics}) + "\n")
        if self.run is not None:
            self.run.log(metrics, step=step)

    def log_images(self, step: int, images: list, prompts: list[str]) -> None:
        if not self.enabled or self.run is None:
            return
        import wandb
        self.run.log({"samples": [wandb.Image(im, caption=p) for im, p in zip(images, prompts)]}, step=step)

    def finish(self, summary: dict) -> None:
        if not self.enabled:
            return
        self.summary = summary
        if self.run is not None:
            for k, v in summary.items():
                self.run.summary[k] = v
            self.run.finish()
