"""The stage contract of the curation pipeline (in the manner of NeMo Curator's stage classes).

A stage is a callable class that Ray Data runs with `map_batches`: constructed once per actor
(load models there), then called on batches in numpy format (dict of column -> np.ndarray; ragged
columns such as images of different buckets are object arrays). Each stage declares the resources
its actors need in a `StageResources`, taken from config, so that on a cluster every model stage
gets its own actor pool and scales independently.

Columns flowing between stages (see docs/data_contract.md for what finally lands on disk):
  key (str), source (str), sha256 (str), width (int), height (int), mode (str) -- from reading/validation
  bucket_h (int), bucket_w (int), image (uint8 HxWx3 at the bucket size) -- from resizing
  caption__<vlm> (str)                                                 -- one per captioner
  clip__<vlm> (float32)                                                -- from CLIP scoring
  latent (float16 C x h x w, already multiplied by the DC-AE scaling factor) -- from encoding
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np

Batch = dict[str, np.ndarray]


@dataclass
class StageResources:
    num_cpus: float = 1.0
    num_gpus: float = 0.0
    concurrency: int = 1  # actor-pool size (or tasks in flight for stateless stages)
    batch_size: int = 16


class Stage:
    """Subclasses set `name`, load their model in __init__ and transform a batch in __call__."""

    name: ClassVar[str] = "stage"
    stateful: ClassVar[bool] = True  # stateful stages run as an actor pool

    def __call__(self, batch: Batch) -> Batch:  # pragma: no cover - interface
        raise NotImplementedError

    @classmethod
    def map_batches_kwargs(cls, resources: StageResources, **ctor_kwargs: Any) -> dict[str, Any]:
        """The keyword arguments for `Dataset.map_batches(cls, **kwargs)` that honour `resources`."""
        from ray.data import ActorPoolStrategy, TaskPoolStrategy

        kw: dict[str, Any] = dict(batch_size=resources.batch_size, batch_format="numpy",
                                  num_cpus=resources.num_cpus, num_gpus=resources.num_gpus)
        if cls.stateful:
            kw["compute"] = ActorPoolStrategy(size=resources.concurrency)
            kw["fn_constructor_kwargs"] = ctor_kwargs
        else:
            kw["compute"] = TaskPoolStrategy(size=resources.concurrency)
        return kw


def error_reason(stage: str, e: BaseException) -> tuple[str, str]:
    """(reason, detail) for an unexpected exception on one input: `error:<Type>` groups them in reports,
    the detail names the stage and keeps the message's first line."""
    msg = str(e).strip().splitlines()[0][:500] if str(e).strip() else ""
    name = type(e).__name__
    return f"error:{name}", f"{stage}: {name}: {msg}" if msg else f"{stage}: {name}"


def caption_column(vlm: str) -> str:
    return f"caption__{vlm}"


def clip_column(vlm: str) -> str:
    return f"clip__{vlm}"
