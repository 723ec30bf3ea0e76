"""Before a curation job starts: can the cluster ever run its actor pools?

Ray Data starts every actor pool at its configured size and keeps it for the whole job, while the stateless
stages (decode, resize) need room for at least one task beside them. If the cluster's total CPUs/GPUs (or the
largest node, for one actor) can never hold that, the job would wait forever with "pending: 20 CPU, 7 GPU";
`check_resources` stops it at once with one line naming each pool's needs and what the cluster has, or, with
`ray.wait_for_resources_s` (`jobs.curate --wait-for-resources`), waits that long for an autoscaling cluster.
Without RAY_ADDRESS the job would start a private local cluster first; `check_local` refuses what that cluster's
CPUs can never hold before starting it (jobs.curate calls it), and check_resources still checks GPUs after.
"""
from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass

from curation.config import CurateConfig
from curation.read import LIST_CPUS
from curation.resize import ResizeStage
from curation.stage import StageResources
from curation.validate import DecodeStage
from sana_core.errors import SanaError

# The model stages (caption.VLMCaptioner, clip_score.ClipStage, encode.EncodeStage) are actor pools (their
# Stage.stateful, checked in tests/test_curation_safety.py); not imported here because they import torch, which
# takes longer than the answer a refused job is owed.


@dataclass
class Pool:
    name: str
    num_cpus: float  # per actor / per task
    num_gpus: float
    actors: int  # actors held for the whole job; 0 for a task pool (which needs room for one task)

    def total(self) -> tuple[float, float]:
        n = max(self.actors, 1)
        return self.num_cpus * n, self.num_gpus * n

    def describe(self) -> str:
        one = f"{_num(self.num_cpus)} CPU" + (f" + {_num(self.num_gpus)} GPU" if self.num_gpus else "")
        return f"{self.name} {self.actors} x ({one})" if self.actors else f"{self.name} tasks of {one}"


def _num(x: float) -> str:
    return f"{x:g}"


def pools(cfg: CurateConfig) -> list[Pool]:
    """Every stage's pool, as the pipeline builds them (curation.pipeline.build_dataset)."""
    stages: list[tuple[str, bool, StageResources]] = [
        ("decode", DecodeStage.stateful, cfg.input.resources), ("resize", ResizeStage.stateful, cfg.resize.resources)]
    stages += [(f"caption:{name}", True, v.resources()) for name, v in cfg.vlms.items()]
    stages += [("clip", True, cfg.clip.resources), ("encode", True, cfg.encode.resources)]
    out = [Pool(name, r.num_cpus, r.num_gpus, r.concurrency if stateful else 0) for name, stateful, r in stages]
    # Listing and writing run as tasks too (curation.read.listing_dataset, pipeline.write_batch); the key index
    # and the tally are actors of 0 CPUs.
    return [Pool("list", LIST_CPUS, 0.0, 0), *out, Pool("write", cfg.writer.num_cpus, 0.0, 0)]


def _needs(pools: list[Pool]) -> tuple[float, float]:
    """CPUs and GPUs held at once: every actor, plus room for the largest single task beside them."""
    cpu = sum(p.total()[0] for p in pools if p.actors) + max((p.num_cpus for p in pools if not p.actors), default=0.0)
    gpu = sum(p.total()[1] for p in pools if p.actors) + max((p.num_gpus for p in pools if not p.actors), default=0.0)
    return cpu, gpu


def fit_problem(pools: list[Pool], total: dict[str, float], nodes: list[dict[str, float]]) -> str | None:
    """Why `pools` can never run on a cluster of `total` resources and `nodes` (each node's totals), or None."""
    need_cpu, need_gpu = _needs(pools)
    have_cpu, have_gpu = total.get("CPU", 0.0), total.get("GPU", 0.0)
    too_big = [p for p in pools if not any(p.num_cpus <= n.get("CPU", 0.0) + 1e-9 and
                                           p.num_gpus <= n.get("GPU", 0.0) + 1e-9 for n in nodes)]
    eps = 1e-9
    if need_cpu <= have_cpu + eps and need_gpu <= have_gpu + eps and not too_big:
        return None
    largest = max(nodes, key=lambda n: (n.get("GPU", 0.0), n.get("CPU", 0.0)), default={})
    why = []
    if need_cpu > have_cpu + eps or need_gpu > have_gpu + eps:
        why.append(f"the actor pools need {_num(need_cpu)} CPU and {_num(need_gpu)} GPU at once")
    if too_big:
        why.append("no node is large enough for one actor of " + ", ".join(p.name for p in too_big))
    return (f"this cluster can never run the job: {'; '.join(why)} "
            f"[{'; '.join(p.describe() for p in pools)}], the cluster has {_num(have_cpu)} CPU and "
            f"{_num(have_gpu)} GPU on {len(nodes)} node(s) (largest {_num(largest.get('CPU', 0.0))} CPU, "
            f"{_num(largest.get('GPU', 0.0))} GPU); shrink the pools (--set vlms.NAME.concurrency=, "
            f"vlms.NAME.num_gpus=, clip.resources.*, encode.resources.*) or, on an autoscaling cluster, pass "
            f"--wait-for-resources SECONDS")


def local_problem(cfg: CurateConfig) -> str | None:
    """Before starting a private local cluster (which takes 15 s to minutes on a loaded machine): why its CPUs
    can never hold cfg's pools, or None. A local cluster gets ray.num_cpus, else every core of this machine, and
    never grows; its GPUs are only known once Ray has looked, so they are left to check_resources."""
    n = float(cfg.ray.num_cpus or os.cpu_count() or 1)
    ps = pools(cfg)
    need_cpu, need_gpu = _needs(ps)
    too_big = [p.name for p in ps if p.num_cpus > n + 1e-9]
    if need_cpu <= n + 1e-9 and not too_big:
        return None
    why = f"the actor pools need {_num(need_cpu)} CPU and {_num(need_gpu)} GPU at once"
    if too_big:
        why += f"; one actor of {', '.join(too_big)} needs more CPUs than there are"
    return (f"this machine can never run the job: {why} [{'; '.join(p.describe() for p in ps)}], and a local Ray "
            f"cluster here gets {_num(n)} CPU ({'ray.num_cpus' if cfg.ray.num_cpus else 'all cores'}); shrink the "
            f"pools (--set vlms.NAME.concurrency=, vlms.NAME.num_cpus=, clip.resources.*, encode.resources.*) or "
            f"submit the job to a cluster (ray job submit / RAY_ADDRESS)")


def check_local(cfg: CurateConfig) -> None:
    """Refuse at once, in one line, a job a private local cluster could never run (no RAY_ADDRESS given)."""
    if os.environ.get("RAY_ADDRESS"):
        return
    problem = local_problem(cfg)
    if problem:
        raise SanaError(problem)


def _cluster() -> tuple[dict[str, float], list[dict[str, float]]]:
    import ray

    nodes = [dict(n.get("Resources", {})) for n in ray.nodes() if n.get("Alive")]
    return dict(ray.cluster_resources()), nodes


def check_resources(cfg: CurateConfig, log: Callable[[str], None] = print,
                    cluster: Callable[[], tuple[dict[str, float], list[dict[str, float]]]] = _cluster,
                    poll_s: float = 5.0) -> None:
    """Raise SanaError (one line) if the connected Ray cluster can never hold cfg's pools, after waiting up to
    cfg.ray.wait_for_resources_s for it to grow."""
    ps = pools(cfg)
    deadline = time.monotonic() + cfg.ray.wait_for_resources_s
    said = False
    while True:
        problem = fit_problem(ps, *cluster())
        if problem is None:
            return
        if time.monotonic() >= deadline:
            waited = f" (waited {cfg.ray.wait_for_resources_s:g} s)" if cfg.ray.wait_for_resources_s else ""
            raise SanaError(problem + waited)
        if not said:
            log(f"waiting up to {cfg.ray.wait_for_resources_s:g} s for the cluster to grow: {problem}")
            said = True
        time.sleep(min(poll_s, max(0.0, deadline - time.monotonic())))
