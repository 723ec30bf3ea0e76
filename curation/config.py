"""The curation job's configuration: typed dataclasses, presets `tiny` and `production`.

    cfg = load_config(CurateConfig, preset=PRESETS["tiny"], path=yaml_or_None, overrides=["writer.samples_per_shard=8"])
    cfg = resolve_models(cfg)   # on the driver: "zoo" model names -> absolute folders of the tiny zoo

Every model stage has a `resources` block (StageResources: num_cpus, num_gpus, concurrency = actor-pool
size, batch_size), so on a cluster the captioners, CLIP and DC-AE each get their own GPU actor pool.
"""
from __future__ import annotations

import copy
import hashlib
import json
import os
from dataclasses import dataclass, field
from typing import Literal

from curation.caption import VLMConfig
from curation.stage import StageResources
from sana_core.config import to_dict
from sana_core.errors import SanaError
from sana_core.secrets import strip_url_credentials
from sana_core.zoo import PRODUCTION

ZOO = "zoo"  # a model name that means "the tiny zoo's model", resolved on the driver by resolve_models


@dataclass
class InputConfig:
    format: Literal["auto", "folder", "webdataset", "parquet"] = "auto"
    extensions: list[str] = field(default_factory=lambda: [".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif",
                                                           ".tif", ".tiff"])
    parquet_column: str = "path"  # the column of a Parquet input that holds paths / URLs
    max_pixels: int = 89_478_485  # larger images are decompression bombs (PIL's default limit)
    min_size: int = 256  # shorter side in pixels; smaller images are rejected as too_small
    # convert: palette/alpha (composited over `background`), 16/32-bit, CMYK, ICC and animated images become
    # 8-bit sRGB (curation.validate.to_rgb); reject: only RGB/L/1/YCbCr are kept, the rest is unsupported_mode.
    special_modes: Literal["reject", "convert"] = "convert"
    background: list[int] = field(default_factory=lambda: [255, 255, 255])  # RGB behind transparent pixels
    max_bytes: int = 256 * 1024 * 1024  # larger files are rejected as too_large before being read (0 = no cap)
    resources: StageResources = field(default_factory=lambda: StageResources(num_cpus=1, concurrency=8,
                                                                              batch_size=16))

    def __post_init__(self):
        bg = self.background
        if len(bg) != 3 or not all(isinstance(v, int) and 0 <= v <= 255 for v in bg):
            raise SanaError(f"config key 'input.background': {bg!r} is not three integers 0..255 (R, G, B)")
        if self.max_bytes < 0:
            raise SanaError(f"config key 'input.max_bytes': {self.max_bytes} < 0 (0 means no cap)")


@dataclass
class ResizeConfig:
    base: int = 1024  # buckets of about base x base pixels (sana_core.buckets)
    write_jpg: bool = True  # store the resized image as KEY.jpg in the shards
    jpg_quality: int = 90
    resources: StageResources = field(default_factory=lambda: StageResources(num_cpus=1, concurrency=8,
                                                                              batch_size=16))


@dataclass
class ClipConfig:
    model: str = PRODUCTION["clip_model"]
    pretrained: str = PRODUCTION["clip_pretrained"]
    device: str = "auto"  # auto = cuda when the actor has a GPU
    resources: StageResources = field(default_factory=lambda: StageResources(num_cpus=2, num_gpus=1,
                                                                              concurrency=1, batch_size=64))


@dataclass
class EncodeConfig:
    model: str = PRODUCTION["dcae"]
    device: str = "auto"
    dtype: Literal["float32", "bfloat16", "float16"] = "bfloat16"
    resources: StageResources = field(default_factory=lambda: StageResources(num_cpus=2, num_gpus=1,
                                                                              concurrency=1, batch_size=16))


@dataclass
class WriterConfig:
    samples_per_shard: int = 1000  # at most; a shard holds the accepted rows of one write batch of this size
    num_cpus: float = 1.0  # per write task (they run on the workers, where the data is)
    concurrency: int = 8  # write tasks in flight
    index_shards: int = 8  # actors of the done/content index (curation.keyindex); ~32 bytes per input in all


@dataclass
class DedupConfig:
    # An input whose bytes (sha256) equal an accepted sample's, or an earlier input's of this run, is rejected as
    # `duplicate` (detail duplicate_of:KEY) before any model runs; false keeps every copy.
    exact: bool = True


@dataclass
class RayConfig:
    num_cpus: int = 0  # CPUs of a local cluster the job starts itself (0 = all); ignored on an existing cluster
    # How long to wait for the cluster to grow (autoscaling) before refusing a job whose actor pools cannot fit
    # (curation.resources); 0 = refuse at once. `jobs.curate --wait-for-resources SECONDS` sets it.
    wait_for_resources_s: float = 0.0


@dataclass
class CurateConfig:
    input: InputConfig = field(default_factory=InputConfig)
    resize: ResizeConfig = field(default_factory=ResizeConfig)
    vlms: dict[str, VLMConfig] = field(default_factory=dict)
    clip: ClipConfig = field(default_factory=ClipConfig)
    encode: EncodeConfig = field(default_factory=EncodeConfig)
    writer: WriterConfig = field(default_factory=WriterConfig)
    dedup: DedupConfig = field(default_factory=DedupConfig)
    ray: RayConfig = field(default_factory=RayConfig)


def _production() -> CurateConfig:
    ids = PRODUCTION["vlms"]
    gpu = dict(num_cpus=4, dtype="bfloat16", gpu_memory_utilization=0.85, concurrency=1)
    vlms = {
        "llava": VLMConfig(name="llava", model=ids["llava"], prompt="Describe this image in detail in one paragraph.",
                           max_tokens=200, temperature=0.2, top_p=0.9, tensor_parallel_size=1, num_gpus=1,
                           batch_size=64, max_num_seqs=64, max_model_len=8192, **gpu),
        "qwen2vl": VLMConfig(name="qwen2vl", model=ids["qwen2vl"], prompt="Write a detailed caption for this image: "
                             "the main subjects, their attributes, the setting, and the style.",
                             max_tokens=256, temperature=0.0, top_p=1.0, tensor_parallel_size=1, num_gpus=1,
                             batch_size=64, max_num_seqs=64, max_model_len=8192, **gpu),
        "idefics3": VLMConfig(name="idefics3", model=ids["idefics3"],
                              prompt="Give a short, precise caption of this image.",
                              max_tokens=77, temperature=0.0, top_p=1.0, tensor_parallel_size=1, num_gpus=1,
                              batch_size=128, max_num_seqs=128, max_model_len=8192, **gpu),
        "gemma3": VLMConfig(name="gemma3", model=ids["gemma3"], prompt="Describe the image for a text-to-image "
                            "dataset: objects, colours, composition, lighting.",
                            max_tokens=200, temperature=0.3, top_p=0.95, tensor_parallel_size=2, num_gpus=2,
                            batch_size=32, max_num_seqs=32, max_model_len=8192, **gpu),
    }
    return CurateConfig(vlms=vlms)


def _tiny() -> CurateConfig:
    # One small actor per stage on a 2-core machine: fractional CPUs so all pools fit at once.
    small = lambda bs: StageResources(num_cpus=0.25, num_gpus=0, concurrency=1, batch_size=bs)
    prompts = {"llava": "Describe the image.", "qwen2vl": "What is in the picture?",
               "idefics3": "Write a short caption for this image.", "gemma3": "Describe this image in one sentence."}
    # vLLM on CPU: eager mode, a small context and KV cache, one in-process engine per VLM. Four engines
    # share the cores, so each must not pin its threads to the same core (vLLM's "auto" binding would).
    vlms = {name: VLMConfig(name=name, model=ZOO, prompt=p, max_tokens=24 + 4 * i, min_tokens=4,
                            temperature=0.0 if i % 2 == 0 else 0.7, top_p=1.0 if i % 2 == 0 else 0.9, seed=i,
                            batch_size=16, max_num_seqs=16, tensor_parallel_size=1, max_model_len=512,
                            dtype="float32", num_gpus=0, num_cpus=0.25, concurrency=1, enforce_eager=True,
                            cpu_kvcache_gib=1, in_process=True, env={"VLLM_CPU_OMP_THREADS_BIND": "nobind"})
            for i, (name, p) in enumerate(prompts.items())}
    return CurateConfig(
        input=InputConfig(max_pixels=4096 * 4096, min_size=32, resources=small(8)),
        resize=ResizeConfig(base=128, resources=small(8)),
        vlms=vlms,
        clip=ClipConfig(model=ZOO, pretrained=ZOO, device="cpu", resources=small(16)),
        encode=EncodeConfig(model=ZOO, device="cpu", dtype="float32", resources=small(8)),
        writer=WriterConfig(samples_per_shard=16, num_cpus=0.25, concurrency=1, index_shards=2),
        # Logical CPUs of the private local cluster: the actor pools hold 1.5, and Ray Data's ListFiles task of
        # ray.data.read_parquet asks for a whole CPU that cannot be configured; with only the 2 a small machine
        # has, a Parquet input would wait for it forever.
        ray=RayConfig(num_cpus=4),
    )


PRESETS = {"tiny": _tiny, "production": _production}


def preset(name: str) -> CurateConfig:
    if name not in PRESETS:
        raise SanaError(f"unknown preset '{name}'; choose one of {sorted(PRESETS)}")
    return PRESETS[name]()


def _abs_if_local(path: str) -> str:
    # Relative local paths would break under `ray job submit --working-dir` (the job runs in a copy).
    return os.path.abspath(path) if (path.startswith(".") or os.sep in path) and "://" not in path and \
        os.path.exists(path) else path


def resolve_models(cfg: CurateConfig) -> CurateConfig:
    """Replace "zoo" model names with the tiny zoo's absolute folders (building it once if needed)."""
    cfg = copy.deepcopy(cfg)
    uses_zoo = ZOO in (cfg.clip.model, cfg.clip.pretrained, cfg.encode.model) or \
        any(v.model == ZOO for v in cfg.vlms.values())
    zoo = None
    if uses_zoo:
        from sana_core.zoo import ensure_zoo

        zoo = ensure_zoo(vlms=any(v.model == ZOO for v in cfg.vlms.values()))
    for name, v in cfg.vlms.items():
        if v.name != name:
            raise SanaError(f"vlms.{name}.name is '{v.name}': the key and the name must agree")
        if v.model == ZOO:
            if name not in zoo.vlms:
                raise SanaError(f"vlms.{name}.model=zoo but the tiny zoo has no VLM '{name}' "
                                f"(it has {sorted(zoo.vlms)})")
            v.model = zoo.vlms[name]
        v.model = _abs_if_local(v.model)
    if cfg.clip.model == ZOO:
        cfg.clip.model = zoo.clip_model
    if cfg.clip.pretrained == ZOO:
        cfg.clip.pretrained = zoo.clip_pretrained
    cfg.clip.pretrained = _abs_if_local(cfg.clip.pretrained)
    if cfg.encode.model == ZOO:
        cfg.encode.model = zoo.dcae
    cfg.encode.model = _abs_if_local(cfg.encode.model)
    return cfg


def config_hash(cfg: CurateConfig, input_path: str) -> str:
    """What decides the output: the config without resources (they change speed, not results) + the input."""
    d = to_dict(cfg)
    d.pop("ray", None)
    for section in [d["input"], d["resize"], d["clip"], d["encode"]]:
        section.pop("resources", None)
    for k in ("num_cpus", "concurrency", "index_shards"):
        d["writer"].pop(k, None)
    for v in d["vlms"].values():  # speed and placement, not results
        for k in ("batch_size", "num_gpus", "num_cpus", "concurrency", "gpu_memory_utilization", "cpu_kvcache_gib",
                  "in_process", "env"):
            v.pop(k, None)
    # A re-signed input URL (new signature, same listing) is the same input: credentials are not part of it.
    blob = json.dumps({"config": d, "input": strip_url_credentials(input_path)}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]
