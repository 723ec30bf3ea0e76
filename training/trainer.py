"""The training loop: one function that torchrun processes and Ray Train workers both run.

    batch (latents of one bucket, one sampled caption per image, some captions dropped to "")
      -> frozen Gemma-2 text encoder (online) -> LinearDiT under rectified flow (sana_core.flow)
      -> AdamW/CAME, warm-up + constant/cosine, grad clipping, EMA -> metrics, checkpoints, image grids
"""
from __future__ import annotations

import json
import math
import time
from collections import OrderedDict
from pathlib import Path

import torch
from tqdm import tqdm

from sana_core.config import dump_config, to_dict
from sana_core.dit import LinearDiT
from sana_core.errors import SanaError
from sana_core.flow import flow_loss
from training import checkpoint as ckpt
from training import distributed as D
from training.config import TrainConfig
from training.data import SkipWarner, build_loader, check_latent_channels, find_shards
from training.ema import EMA
from training.optim import build_optimizer, build_scheduler
from training.tracking import Tracker, train_flops_per_image


class NonFiniteLoss(SanaError):
    pass


def resolve_model_path(name: str) -> str:
    """'zoo:gemma' / 'zoo:dcae' name the tiny random-weight models sana_core.zoo builds; anything else is a path
    or a Hugging Face id."""
    if name.startswith("zoo:"):
        from sana_core.zoo import ensure_zoo
        return str(getattr(ensure_zoo(vlms=False), name[4:]))
    return name


def load_text_encoder(cfg: TrainConfig, device: torch.device, dtype: torch.dtype):
    from sana_core.text_encoder import TextEncoder
    te = TextEncoder.from_pretrained(resolve_model_path(cfg.model.text_encoder), max_length=cfg.model.max_length,
                                     device=device, dtype=dtype)
    if te.hidden_size != cfg.model.dit.caption_channels:
        raise SanaError(f"text encoder {cfg.model.text_encoder} gives {te.hidden_size}-wide embeddings but "
                        f"model.dit.caption_channels is {cfg.model.dit.caption_channels}")
    return te


class Trainer:
    def __init__(self, cfg: TrainConfig, data: str | Path, output: str | Path, resume: bool = False,
                 device: str | None = None):
        self.cfg = cfg
        self.run_dir = Path(output)
        self.info = D.setup(cfg.dist, device)
        info = self.info
        self.bf16 = cfg.precision == "bf16" or (cfg.precision == "auto" and info.device.type == "cuda")
        if self.bf16 and info.device.type != "cuda":
            raise SanaError("precision=bf16 needs CUDA here; use precision=fp32 (or auto) on the CPU")

        # Everything that can be wrong with the inputs fails here, before any step.
        self.shards = find_shards(data)
        self.latent_shape = check_latent_channels(self.shards, cfg.model.dit.in_channels)
        if info.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            dump_config(cfg, self.run_dir / "config.yaml")
        D.barrier(info)

        torch.manual_seed(cfg.seed)  # same initial weights on every rank
        model = LinearDiT(cfg.model.dit).to(info.device)
        model.gradient_checkpointing = cfg.model.gradient_checkpointing
        self.num_params = sum(p.numel() for p in model.parameters())
        self.strategy = D.strategy_for(cfg.dist, info)
        self.model = D.wrap(model, self.strategy, info, bf16=self.bf16)
        self.raw = D.unwrap(self.model)
        self.ema = EMA(self.raw, cfg.ema.decay) if cfg.ema.enabled else None
        self.opt = build_optimizer(self.model, cfg.optim)
        self.sched = build_scheduler(self.opt, cfg.optim, cfg.max_steps)
        self.gen = torch.Generator(device=info.device)
        self.gen.manual_seed(cfg.seed * 1000 + info.rank)  # per-rank noise and timesteps
        self.text_encoder = load_text_encoder(cfg, info.device, torch.float32)
        with torch.no_grad():
            # Sana / diffusers encode the unconditional prompt without the complex human instruction.
            self.null_emb, self.null_mask = self.text_encoder.encode([""], instruction=False)

        self.text_cache: OrderedDict[str, tuple[torch.Tensor, torch.Tensor]] = OrderedDict()
        self.step = 0
        wandb_id, captions_taken = None, {}
        self.data_positions: dict[int, tuple[int, int]] = {}  # worker -> (epoch, index) of its last batch
        self.ckpt_dir = self.run_dir / "checkpoints"
        if resume:
            path = ckpt.latest(self.ckpt_dir)
            if path is not None:
                extra = ckpt.load(path, self.model, self.opt, self.ema, info)
                self.sched.load_state_dict(extra["scheduler"])
                self.gen.set_state(extra["generator"])
                ckpt.set_rng_state(extra["rng"])
                self.step = extra["step"]
                wandb_id = extra.get("wandb_id")
                captions_taken = extra.get("captions_taken", {})
                pos = extra["data_position"]
                if pos["num_workers"] == cfg.data.num_workers and pos["world"] == info.world:
                    self.data_positions = dict(pos.get("workers", {}))
                else:
                    print(f"warning: resuming with {cfg.data.num_workers} workers x {info.world} ranks, saved "
                          f"with {pos['num_workers']} x {pos['world']}: the sample order will differ")
                if info.is_main:
                    print(f"resumed from {path} at step {self.step}")
            elif info.is_main:
                print(f"--resume: no checkpoint in {self.ckpt_dir}, starting at step 0")
        self.loader = build_loader(self.shards, cfg.data, cfg.caption, info.rank, info.world,
                                   start_batches=self.step, positions=self.data_positions, device=info.device)
        self.tracker = Tracker(self.run_dir, to_dict(cfg), info.is_main, cfg.track.wandb, cfg.track.project,
                               resume_id=wandb_id)
        self.tracker.captions.update(captions_taken)
        self.skips = SkipWarner()
        self.nonfinite_skipped = 0

    # -- one step --------------------------------------------------------------------------------------
    def encode(self, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        cache, size = self.text_cache, self.cfg.model.text_cache
        with torch.no_grad():
            if size <= 0:
                y, mask = self.text_encoder.encode(captions)
            else:
                misses = [c for c in dict.fromkeys(captions) if c not in cache and c != ""]
                if misses:
                    ym, mm = self.text_encoder.encode(misses)
                    for c, e, m in zip(misses, ym, mm):
                        cache[c] = (e.clone(), m.clone())
                for c in captions:
                    if c in cache:
                        cache.move_to_end(c)
                while len(cache) > size:
                    cache.popitem(last=False)
                pairs = [cache[c] if c != "" else (self.null_emb[0], self.null_mask[0]) for c in captions]
                y, mask = torch.stack([p[0] for p in pairs]), torch.stack([p[1] for p in pairs])
        empty = [i for i, c in enumerate(captions) if c == ""]
        if empty:  # classifier-free guidance: dropped captions train on the empty-prompt embedding
            y[empty], mask[empty] = self.null_emb.to(y.dtype), self.null_mask
        return y, mask

    def train_step(self, batch: dict) -> dict:
        dev = self.info.device
        x0 = batch["latents"].to(dev, non_blocking=True)
        y, mask = self.encode(batch["captions"])
        with torch.autocast(device_type=dev.type, dtype=torch.bfloat16, enabled=self.bf16):
            loss, per_sample = flow_loss(self.model, x0, y.to(dev), mask.to(dev), self.cfg.flow, generator=self.gen)
        bad = not bool(torch.isfinite(loss))
        if D.any_true(bad, self.info):
            return self._nonfinite("loss", batch, per_sample)
        loss.backward()
        gn = self._clip()
        if D.any_true(not math.isfinite(gn), self.info):
            self.opt.zero_grad(set_to_none=True)
            return self._nonfinite("grad norm", batch, per_sample)
        self.opt.step()
        self.sched.step()
        self.opt.zero_grad(set_to_none=True)
        if self.ema is not None:
            self.ema.update(self.raw)
        return {"loss": D.all_reduce_mean(loss.detach().float(), self.info).item(), "grad_norm": gn}

    def _clip(self) -> float:
        max_norm = self.cfg.optim.grad_clip if self.cfg.optim.grad_clip > 0 else float("inf")
        gn = torch.nn.utils.clip_grad_norm_(self.model.parameters(), max_norm)
        if hasattr(gn, "full_tensor"):
            gn = gn.full_tensor()
        return float(gn)

    def _nonfinite(self, what: str, batch: dict, per_sample: torch.Tensor) -> dict:
        mine = [k for k, v in zip(batch["keys"], per_sample.tolist()) if not math.isfinite(v)] or batch["keys"]
        keys = [k for ks in D.gather_objects(mine, self.info) for k in ks]
        where = f"non-finite {what} at step {self.step + 1}, sample keys {', '.join(keys)}"
        if self.cfg.on_nonfinite == "stop":
            raise NonFiniteLoss(f"{where} (on_nonfinite=stop; set on_nonfinite=skip to skip such steps)")
        self.nonfinite_skipped += 1
        if self.info.is_main:
            tqdm.write(f"skipped step: {where}")
        self.opt.zero_grad(set_to_none=True)
        self.sched.step()  # the step still happens in the schedule, so step-indexed state stays aligned
        return {"loss": float("nan"), "grad_norm": float("nan"), "skipped": 1}

    # -- the loop --------------------------------------------------------------------------------------
    def fit(self) -> dict:
        cfg, info = self.cfg, self.info
        self.model.train()
        t_start = time.time()
        window_t, window_imgs, window_flops = time.time(), 0, 0
        last, losses = {}, []
        start_step = self.step
        bar = tqdm(total=cfg.max_steps, initial=self.step, disable=not info.is_main, desc="train", unit="step",
                   dynamic_ncols=True)
        it = iter(self.loader)
        try:
            while self.step < cfg.max_steps:
                batch = next(it)
                self.skips.update(batch)
                self.data_positions[batch["worker"]] = (batch["epoch"], batch["index"])
                self.tracker.count_captions(batch["vlms"], batch["dropped"].tolist())
                out = self.train_step(batch)
                self.step += 1
                B, _, h, w = batch["latents"].shape
                window_imgs += B
                window_flops += B * train_flops_per_image(self.num_params, cfg.model.dit, h, w, cfg.model.max_length)
                if math.isfinite(out["loss"]):
                    losses.append(out["loss"])
                bar.update(1)
                bar.set_postfix(loss=f"{out['loss']:.4f}")
                if self.step % cfg.track.log_every == 0 or self.step == cfg.max_steps:
                    dt = max(time.time() - window_t, 1e-9)
                    per_rank = window_imgs / dt
                    last = {"loss": out["loss"], "lr": self.sched.get_last_lr()[0], "grad_norm": out["grad_norm"],
                            "samples_per_s": per_rank * info.world, "images_per_s_per_gpu": per_rank,
                            "mfu": window_flops / dt / (cfg.track.peak_tflops * 1e12),
                            "epoch": batch["epoch"], "nonfinite_skipped": self.nonfinite_skipped,
                            "images_skipped_no_caption": sum(self.skips.per_worker.values())}
                    self.tracker.log(self.step, dict(last))
                    window_t, window_imgs, window_flops = time.time(), 0, 0
                if cfg.track.sample_every and self.step % cfg.track.sample_every == 0:
                    self.sample_grid()
                if self.step % cfg.checkpoint.every == 0 and self.step < cfg.max_steps:
                    self.save()
        finally:
            bar.close()
        path = self.save()
        self.sample_grid()
        secs = time.time() - t_start
        steps = self.step - start_step
        summary = {"steps": self.step, "steps_this_run": steps, "seconds": round(secs, 2),
                   "final_loss": last.get("loss"), "mean_loss_last_10": (sum(losses[-10:]) / len(losses[-10:]))
                   if losses else None, "first_loss": losses[0] if losses else None,
                   "steps_per_s": round(steps / secs, 3) if secs > 0 else None, "checkpoint": str(path),
                   "strategy": self.strategy, "world": info.world, "nonfinite_skipped": self.nonfinite_skipped,
                   "captions_taken": dict(self.tracker.captions), "params": self.num_params}
        self.tracker.finish(summary)
        return summary

    def save(self) -> Path:
        extra = {"step": self.step, "scheduler": self.sched.state_dict(), "generator": self.gen.get_state(),
                 "rng": ckpt.rng_state(), "captions_taken": dict(self.tracker.captions), "wandb_id": self.tracker.run_id if self.info.is_main else None,
                 "data_position": {"batches": self.step, "num_workers": self.cfg.data.num_workers,
                                   "world": self.info.world,
                                   "workers": dict(self.data_positions)}}
        return ckpt.save(self.ckpt_dir, self.step, self.model, self.opt, self.ema, extra,
                         {"config": to_dict(self.cfg), "num_params": self.num_params}, self.info,
                         self.cfg.checkpoint.keep_last)

    def sample_grid(self) -> None:
        """Flow-DPM-Solver samples of the fixed prompts from the EMA weights, decoded by DC-AE, to wandb and
        RUN/samples/step-N.png. The EMA gather is a collective, so every rank calls this."""
        cfg = self.cfg
        if not cfg.track.sample_prompts:
            return
        weights = self.ema.full_state_dict() if self.ema is not None else _full_model_state(self.raw)
        if not self.info.is_main:
            return
        from PIL import Image

        from sana_core.autoencoder import Autoencoder
        from sana_core.pipeline import SanaPipeline
        dit = LinearDiT(cfg.model.dit)
        dit.load_state_dict({**dit.state_dict(), **weights}, strict=True)
        dit.eval()
        if not hasattr(self, "autoencoder"):
            self.autoencoder = Autoencoder.from_pretrained(resolve_model_path(cfg.model.autoencoder), device="cpu")
        te = self.text_encoder
        pipe = SanaPipeline(dit, te, self.autoencoder)
        images = pipe(list(cfg.track.sample_prompts), height=cfg.track.sample_height, width=cfg.track.sample_width,
                      steps=cfg.track.sample_steps, guidance_scale=cfg.track.guidance_scale, solver="flow_dpm", seed=0,
                      shift=cfg.flow.shift)
        grid = Image.new("RGB", (sum(im.width for im in images), max(im.height for im in images)))
        x = 0
        for im in images:
            grid.paste(im, (x, 0))
            x += im.width
        out = self.run_dir / "samples"
        out.mkdir(exist_ok=True)
        grid.save(out / f"step-{self.step:08d}.png")
        self.tracker.log_images(self.step, images, list(cfg.track.sample_prompts))

    def close(self) -> None:
        D.teardown(self.info)


def _full_model_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    out = {}
    for n, p in model.named_parameters():
        t = p.detach()
        out[n] = (t.full_tensor() if hasattr(t, "full_tensor") else t).cpu()
    return out


def train(cfg: TrainConfig, data: str | Path, output: str | Path, resume: bool = False,
          device: str | None = None) -> dict:
    trainer = Trainer(cfg, data, output, resume=resume, device=device)
    try:
        summary = trainer.fit()
    finally:
        trainer.close()
    if trainer.info.is_main:
        (trainer.run_dir / "summary.json").write_text(json.dumps(summary, indent=1))
        print_summary(summary, trainer.run_dir)
    return summary


def print_summary(s: dict, run_dir: Path) -> None:
    print("\n=== training summary")
    for k in ("steps", "steps_this_run", "seconds", "steps_per_s", "first_loss", "final_loss", "mean_loss_last_10",
              "strategy", "world", "params", "nonfinite_skipped", "captions_taken", "checkpoint"):
        print(f"  {k:<20} {s.get(k)}")
    print(f"  {'run dir':<20} {run_dir}  (config.yaml, metrics.jsonl, checkpoints/, wandb/)")

