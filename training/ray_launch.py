"""Ray Train launcher: ray.train.torch.TorchTrainer runs the same `train()` on N workers.

Ray creates the torch.distributed process group (gloo on CPU, NCCL on GPU) before the training function
runs; `training.distributed.setup` finds it and uses it, so nothing else differs from torchrun.
"""
from __future__ import annotations

import json
import os

from sana_core.config import from_dict, to_dict
from sana_core.errors import SanaError
from training.config import TrainConfig


def _worker(loop_cfg: dict) -> None:
    import ray.train

    from training.trainer import train
    cfg = from_dict(TrainConfig, loop_cfg["cfg"])
    summary = train(cfg, loop_cfg["data"], loop_cfg["output"], resume=loop_cfg["resume"],
                    device=loop_cfg["device"], new_output=loop_cfg.get("new_output", False))
    ray.train.report({k: v for k, v in summary.items() if isinstance(v, (int, float, str))})


def run_with_ray(cfg: TrainConfig, data: str, output: str, resume: bool, num_workers: int, gpus_per_worker: float,
                 cpus_per_worker: float, address: str | None, new_output: bool = False) -> dict:
    import ray
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    if not ray.is_initialized():
        address = address or os.environ.get("RAY_ADDRESS")
        # Never attach by accident to another user's cluster: without an address start a private local one.
        if address:
            ray.init(address=address)
        else:
            ray.init(address="local", num_cpus=max(1, int(num_workers * cpus_per_worker) + 1),
                     include_dashboard=False)
    use_gpu = gpus_per_worker > 0
    trainer = TorchTrainer(
        _worker,
        train_loop_config={"cfg": to_dict(cfg), "data": data, "output": output, "resume": resume,
                           "new_output": new_output,
                           "device": "cuda" if use_gpu else "cpu"},
        scaling_config=ScalingConfig(num_workers=num_workers, use_gpu=use_gpu,
                                     resources_per_worker={"CPU": cpus_per_worker,
                                                           **({"GPU": gpus_per_worker} if use_gpu else {})}),
        run_config=RunConfig(name="sana-train", storage_path=os.path.join(output, "ray")),
    )
    result = trainer.fit()
    if result.error is not None:
        raise SanaError(f"Ray Train run failed: {str(result.error).splitlines()[0]}")
    # Rank 0 wrote the run's summary; Ray's own result metrics depend on the Train API version.
    summary = os.path.join(output, "summary.json")
    if not os.path.isfile(summary):
        raise SanaError(f"Ray Train run finished without writing {summary}")
    with open(summary) as f:
        return json.load(f)
