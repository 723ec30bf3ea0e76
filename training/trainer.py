"""The training loop: one function that torchrun processes and Ray Train workers both run.

    batch (latents of one bucket, one sampled caption per image, some captions dropped to "")
      -> frozen Gemma-2 text encoder (online) -> LinearDiT under rectified flow (sana_core.flow)
      -> AdamW/CAME, warm-up + constant/cosine, grad clipping, EMA -> metrics, checkpoints, image grids
"""
from __future__ import annotations

import contextlib
import json
import math
import time
from collections import OrderedDict
from pathlib import Path

import torch
import yaml
from tqdm import tqdm

from sana_core.dit import LinearDiT
from sana_core.errors import SanaError
from sana_core.flow import flow_loss
from sana_core.text_encoder import fit_padding, kept_length
from training import checkpoint as ckpt
from training import distributed as D
from training import finetune, graphs, rundir
from training.config import TrainConfig
from training.data import DataHealth, SkipWarner, build_loader, check_latent_channels, find_shards
from training.ema import EMA
from training.optim import build_optimizer, build_scheduler, clip_gradients
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
                 device: str | None = None, new_output: bool = False):
        self.lock = None
        try:
            self._init(cfg, data, output, resume, device, new_output)
        except BaseException:
            self.release()  # a refused or failed start leaves the folder free for the next attempt
            raise

    def _init(self, cfg: TrainConfig, data: str | Path, output: str | Path, resume: bool, device: str | None,
              new_output: bool) -> None:
        self.cfg = cfg
        self.run_dir = Path(output)
        self.info = D.setup(cfg.dist, device)
        info = self.info
        self.bf16 = cfg.precision == "bf16" or (cfg.precision == "auto" and info.device.type == "cuda")
        if self.bf16 and info.device.type != "cuda":
            raise SanaError("precision=bf16 needs CUDA here; use precision=fp32 (or auto) on the CPU")

        # Everything that can be wrong with the inputs fails here, before any step.
        self.shards = find_shards(data)
        self.latent_shape = check_latent_channels(self.shards, cfg.model.dit.in_channels, cfg.data.on_error)
        # One job per run folder (rank 0 holds the lock), and never a new run over an old one (training/rundir).
        self.lock = rundir.claim(self.run_dir, resume, new_output, info)

        torch.manual_seed(cfg.seed)  # same initial weights on every rank
        # --init-from weights, then LoRA adapters (base frozen) when lora.rank > 0
        model = finetune.prepare_model(LinearDiT(cfg.model.dit), cfg).to(info.device)
        model.gradient_checkpointing = cfg.model.gradient_checkpointing
        self.num_params = sum(p.numel() for p in model.parameters())
        self.trainable_params = finetune.trainable(model)
        self.strategy = D.strategy_for(cfg.dist, info)
        graphs.check(cfg.model.cuda_graphs, info.device, self.strategy, cfg.model.gradient_checkpointing)
        self.model = D.wrap(model, self.strategy, info, bf16=self.bf16, cfg=cfg.dist)
        self.raw = D.unwrap(self.model)
        self.forward = graphs.GraphedModel(self.model) if cfg.model.cuda_graphs else self.model
        self.ema = EMA(self.raw, cfg.ema.decay) if cfg.ema.enabled else None
        self.opt = build_optimizer(self.model, cfg.optim)
        self.sched = build_scheduler(self.opt, cfg.optim, cfg.max_steps)
        # Data slots: this rank's micro-batches are slots rank*A .. rank*A+A-1 of world*A (training/data.py),
        # each with its own noise and timestep generator, so every layout with the same world*A draws the same.
        self.accum = cfg.optim.grad_accum_steps
        if self.accum < 1:
            raise SanaError(f"optim.grad_accum_steps must be at least 1, got {self.accum}")
        self.slots = [info.rank * self.accum + a for a in range(self.accum)]
        self.gens = [torch.Generator(device=info.device) for _ in self.slots]
        for g, slot in zip(self.gens, self.slots):
            g.manual_seed(cfg.seed * 1000 + slot)
        self.gen = self.gens[0]
        self.text_encoder = load_text_encoder(cfg, info.device, torch.float32)
        with torch.no_grad():
            # Sana / diffusers encode the unconditional prompt without the complex human instruction.
            # (1, T, C) with T the positions the empty prompt uses: it does not lengthen a batch's captions
            self.null_emb, self.null_mask, _ = self.text_encoder.encode_lengths([""], instruction=False)

        self.text_cache: OrderedDict[str, tuple[torch.Tensor, torch.Tensor]] = OrderedDict()
        self.step = 0
        wandb_id, captions_taken = None, {}
        # per slot: worker -> (epoch, index) of its last consumed batch
        self.data_positions: list[dict[int, tuple[int, int]]] = [{} for _ in self.slots]
        start_batches = 0
        self.ckpt_dir = self.run_dir / "checkpoints"
        health = None
        if resume:
            path = ckpt.latest(self.ckpt_dir)
            if path is not None:
                changes = rundir.compare_on_resume(path, cfg)  # refuses a changed model/data layout in one line
                if info.is_main:
                    for c in changes:
                        print(f"changed on resume: {c}")
                fresh = ckpt.optimizer_hparams(self.opt)
                extra = ckpt.load(path, self.model, self.opt, self.ema, info)
                self.sched.load_state_dict(extra["scheduler"])
                ckpt.reapply_hparams(self.opt, self.sched, fresh)  # the new optim.* settings, not the saved ones
                health = extra.get("data_health") if info.is_main else None  # run totals: counted once
                ckpt.set_rng_state(extra["rng"])
                self.step = extra["step"]
                start_batches = self._restore_slots(extra)
                wandb_id = extra.get("wandb_id")
                captions_taken = extra.get("captions_taken", {})
                if info.is_main:
                    print(f"resumed from {path} at step {self.step}")
            elif info.is_main:
                print(f"--resume: no checkpoint in {self.ckpt_dir}, starting at step 0")
        if info.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            rundir.trim_metrics(self.run_dir, self.step)
            (self.run_dir / "config.yaml").write_text(yaml.safe_dump(rundir.public_config(cfg), sort_keys=False))
        self.health = DataHealth(health)
        self.loader = build_loader(self.shards, cfg.data, cfg.caption, info.rank, info.world,
                                   start_batches=start_batches,
                                   positions=self.data_positions[0] if self.accum == 1 else self.data_positions,
                                   device=info.device, accum=self.accum, channels=cfg.model.dit.in_channels)
        self.keys_log = None
        if cfg.track.log_sample_keys:
            (self.run_dir / "sample_keys").mkdir(exist_ok=True)
            self.keys_log = self.run_dir / "sample_keys" / f"rank-{info.rank}.jsonl"
        self.tracker = Tracker(self.run_dir, rundir.public_config(cfg), info.is_main, cfg.track.wandb, cfg.track.project,
                               resume_id=wandb_id)
        self.tracker.captions.update(captions_taken)
        self.skips = SkipWarner()
        self.nonfinite_skipped = 0

    def _restore_slots(self, extra: dict) -> int:
        """Restore this rank's slot generators and data positions; return the batches each slot skips.

        Exact when the checkpoint has the same world x grad_accum_steps and data.num_workers (e.g. 2 GPUs
        -> 1 GPU with grad_accum_steps=2): every slot continues its own stream. Otherwise the streams of the
        new layout cannot continue the old ones, and the run says so and goes on at the start of the epoch
        after the furthest saved position: no sample is repeated within an epoch (the rest of the current one
        is skipped) and no earlier epoch is re-read (skipping `step` batches from epoch 0 would re-read all)."""
        cfg, info = self.cfg, self.info
        pos = extra["data_position"]
        saved = pos.get("num_slots", pos["world"])  # checkpoints from before grad accumulation: a slot a rank
        slots = {int(k): v for k, v in extra["slots"].items()} if "slots" in extra else \
            {info.rank: {"generator": extra["generator"], "workers": pos.get("workers", {})}}
        now = info.world * self.accum
        epoch = max((p[0] for v in slots.values() for p in v["workers"].values()), default=-1)
        if saved == now and pos["num_workers"] == cfg.data.num_workers and all(s in slots for s in self.slots):
            for a, slot in enumerate(self.slots):
                self.gens[a].set_state(slots[slot]["generator"])
                self.data_positions[a] = {int(w): tuple(p) for w, p in slots[slot]["workers"].items()}
            return self.step
        if info.is_main:
            print(f"warning: resuming with {info.world} processes x {self.accum} grad_accum_steps = {now} data "
                  f"slots and {cfg.data.num_workers} loader workers; saved with {saved} slots and "
                  f"{pos['num_workers']} workers, so the data order cannot continue: going on at the start of "
                  f"epoch {epoch + 1} (keep processes x optim.grad_accum_steps = {saved} and data.num_workers = "
                  f"{pos['num_workers']} to continue exactly)")
        for a, (g, slot) in enumerate(zip(self.gens, self.slots)):  # fresh noise, not a replay of step 1's
            g.manual_seed((cfg.seed * 1000 + slot) * 1_000_003 + self.step)
            self.data_positions[a] = {w: (epoch + 1, -1) for w in range(max(1, cfg.data.num_workers))}
        return self.step

    # -- one step --------------------------------------------------------------------------------------
    def encode(self, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """-> y (B, L, C), mask (B, L): L = the batch's longest caption rounded up to model.caption_bucket."""
        cache, size = self.text_cache, self.cfg.model.text_cache
        with torch.no_grad():
            found = {c: cache[c] for c in captions if c in cache}
            misses = [c for c in dict.fromkeys(captions) if c not in found and c != ""]
            # With the cache on, each miss is encoded on its own. The encoder's output at a caption's real
            # positions depends, in the last bits, on the length its batch is padded to (the batch's longest
            # prompt: the attention and GEMM shapes change with it), so a caption encoded beside others would be
            # cached with values that depend on which batch first met it: a run resumed from a checkpoint
            # (empty cache) re-encodes it in another batch and drifts by an ulp. Alone, a caption's embedding
            # is a function of the caption only, and a hit equals a recomputation. Without the cache the step's
            # own batch is encoded together: a function of that batch only, which a resumed run sees alike.
            groups = [[c] for c in misses] if size > 0 else [misses]
            for group in (g for g in groups if g):
                ym, mm, um = self.text_encoder.encode_lengths(group)
                found.update((c, (e[:u], m[:u])) for c, e, m, u in zip(group, ym, mm, um))  # the positions used
            if size > 0:
                cache.update((c, (found[c][0].clone(), found[c][1].clone())) for c in misses)
                for c in captions:
                    if c in cache:
                        cache.move_to_end(c)
                while len(cache) > size:
                    cache.popitem(last=False)
            found[""] = (self.null_emb[0], self.null_mask[0])  # dropped captions (CFG) train on the empty prompt
            entries = [found[c] for c in captions]
            keep = kept_length(max(len(m) for _, m in entries), self.cfg.model.caption_bucket,
                               self.cfg.model.max_length)
            fitted = [fit_padding(e[None], m[None], keep) for e, m in entries]
        return torch.cat([f[0] for f in fitted]), torch.cat([f[1] for f in fitted])

    def train_step(self, micro: list[dict]) -> dict:
        """One optimizer step over this rank's optim.grad_accum_steps micro-batches. Each loss is scaled by
        1/A, so the accumulated gradient is their mean, and DDP / FSDP2 average over ranks: the step's gradient
        is the mean over all world x A micro-batches, whatever the layout."""
        dev = self.info.device
        losses, per_samples, tokens = [], [], []
        for a, batch in enumerate(micro):
            x0 = batch["latents"].to(dev, non_blocking=True)
            y, mask = self.encode(batch["captions"])
            tokens.append(y.shape[1])
            last = a == len(micro) - 1
            with contextlib.nullcontext() if last else D.no_grad_sync(self.model, self.strategy):
                # A CUDA-graph capture must not cache autocast's weight casts (they would be stale on replay).
                with torch.autocast(device_type=dev.type, dtype=torch.bfloat16, enabled=self.bf16,
                                    cache_enabled=not self.cfg.model.cuda_graphs):
                    loss, per_sample = flow_loss(self.forward, x0, y.to(dev), mask.to(dev), self.cfg.flow,
                                                 generator=self.gens[a])
                (loss / len(micro)).backward()
            if self.cfg.model.cuda_graphs and a == 0 and not last:
                self.forward.detach_gradients(self.model.parameters())  # else the next replay overwrites them
            losses.append(loss.detach().float())
            per_samples.append(per_sample)
        # One finiteness check a step, after the gradient reduction: a non-finite loss on any rank makes the
        # reduced gradients non-finite, hence the global grad norm, which every rank computes alike (DDP's
        # all-reduced grads are identical; FSDP2's norm is reduced over shards). Checking the loss first as
        # well cost two more all-reduces and host syncs every step.
        gn = self._clip()
        if not math.isfinite(gn):
            self.opt.zero_grad(set_to_none=D.grads_set_to_none(self.strategy))
            return {**self._nonfinite(micro, per_samples), "text_tokens": tokens}
        self.opt.step()
        self.sched.step()
        self.opt.zero_grad(set_to_none=D.grads_set_to_none(self.strategy))
        if self.ema is not None:
            self.ema.update(self.raw)
        loss = torch.stack(losses).mean()
        return {"loss": D.all_reduce_mean(loss, self.info).item(), "grad_norm": gn, "text_tokens": tokens}

    def _clip(self) -> float:
        max_norm = self.cfg.optim.grad_clip if self.cfg.optim.grad_clip > 0 else float("inf")
        gn = clip_gradients(self.opt, self.model.parameters(), max_norm)
        if hasattr(gn, "full_tensor"):
            gn = gn.full_tensor()
        return float(gn)

    def _nonfinite(self, micro: list[dict], per_samples: list[torch.Tensor]) -> dict:
        mine = [k for b, ps in zip(micro, per_samples) for k, v in zip(b["keys"], ps.tolist()) if not math.isfinite(v)]
        keys = [k for ks in D.gather_objects(mine, self.info) for k in ks]
        what = "loss" if keys else "grad norm"
        if not keys:  # finite losses, non-finite gradients: name the step's whole batch
            keys = [k for ks in D.gather_objects([k for b in micro for k in b["keys"]], self.info) for k in ks]
        where = f"non-finite {what} at step {self.step + 1}, sample keys {', '.join(keys)}"
        if self.cfg.on_nonfinite == "stop":
            raise NonFiniteLoss(f"{where} (on_nonfinite=stop; set on_nonfinite=skip to skip such steps)")
        self.nonfinite_skipped += 1
        if self.info.is_main:
            tqdm.write(f"skipped step: {where}")
        self.opt.zero_grad(set_to_none=D.grads_set_to_none(self.strategy))
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
                item = next(it)
                micro = item if isinstance(item, list) else [item]
                for a, batch in enumerate(micro):
                    self.skips.update({**batch, "worker": (a, batch["worker"])})
                    self.health.update(batch)
                    self.data_positions[a][batch["worker"]] = (batch["epoch"], batch["index"])
                    self.tracker.count_captions(batch["vlms"], batch["dropped"].tolist())
                    window_imgs += batch["latents"].shape[0]
                if self.keys_log is not None:
                    with self.keys_log.open("a") as f:
                        for a, b in enumerate(micro):
                            f.write(json.dumps({"step": self.step + 1, "rank": info.rank, "slot": self.slots[a],
                                                "worker": b["worker"], "epoch": b["epoch"], "index": b["index"],
                                                "keys": b["keys"]}) + "\n")
                out = self.train_step(micro)
                step_tokens = out.pop("text_tokens")
                for batch, tokens in zip(micro, step_tokens):
                    B, _, h, w = batch["latents"].shape
                    window_flops += B * train_flops_per_image(self.num_params, cfg.model.dit, h, w, tokens)
                self.step += 1
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
                            "images_skipped_no_caption": sum(self.skips.per_worker.values()),
                            "caption_tokens": max(step_tokens)}  # positions kept (model.caption_bucket)
                    data = self.data_totals()  # a collective: every rank logs at the same steps
                    last.update(shards_skipped=len(data["shards"]), samples_skipped=data["samples"])
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
        data = self.data_totals()
        summary = {"steps": self.step, "steps_this_run": steps, "seconds": round(secs, 2),
                   "final_loss": last.get("loss"), "mean_loss_last_10": (sum(losses[-10:]) / len(losses[-10:]))
                   if losses else None, "first_loss": losses[0] if losses else None,
                   "steps_per_s": round(steps / secs, 3) if secs > 0 else None, "checkpoint": str(path),
                   "strategy": self.strategy, "world": info.world, "nonfinite_skipped": self.nonfinite_skipped,
                   "captions_taken": dict(self.tracker.captions), "params": self.num_params,
                   "trainable_params": self.trainable_params, "init_from": cfg.init_from or None,
                   "shards_skipped": len(data["shards"]), "samples_skipped": data["samples"],
                   "skipped_shards": dict(sorted(data["shards"].items())[:100])}
        self.tracker.finish(summary)
        return summary

    def data_totals(self) -> dict:
        """Bad shards (url -> reason) and bad samples met by every rank so far (DataHealth.merge)."""
        return DataHealth.merge(D.gather_objects(self.health.state(), self.info))

    def save(self) -> Path:
        # Every rank saves every slot's generator and data position, so any layout can resume from any file.
        mine = {slot: {"generator": g.get_state(), "workers": dict(p)}
                for slot, g, p in zip(self.slots, self.gens, self.data_positions)}
        slots = {slot: v for d in D.gather_objects(mine, self.info) for slot, v in d.items()}
        extra = {"step": self.step, "scheduler": self.sched.state_dict(), "generator": self.gen.get_state(),
                 "slots": slots,
                 "rng": ckpt.rng_state(), "captions_taken": dict(self.tracker.captions), "wandb_id": self.tracker.run_id if self.info.is_main else None,
                 "data_position": {"batches": self.step, "num_workers": self.cfg.data.num_workers,
                                   "world": self.info.world, "num_slots": self.info.world * self.accum,
                                   "workers": dict(self.data_positions[0])},
                 "data_health": self.data_totals()}
        return ckpt.save(self.ckpt_dir, self.step, self.model, self.opt, self.ema, extra,
                         {"config": rundir.public_config(self.cfg), "num_params": self.num_params}, self.info,
                         self.cfg.checkpoint.keep_last)

    def sample_grid(self) -> None:
        """Flow-DPM-Solver samples of the fixed prompts from the EMA weights, decoded by DC-AE, to wandb and
        RUN/samples/step-N.png. The EMA gather is a collective, so every rank calls this."""
        cfg = self.cfg
        if not cfg.track.sample_prompts:
            return
        if cfg.lora.rank > 0:  # the frozen base and the (EMA) adapter, merged into plain LinearDiT weights
            weights = _full_model_state(self.raw)
            weights.update(self.ema.full_state_dict() if self.ema is not None else {})
            weights = finetune.plain_state_dict(weights, cfg)
        else:
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
        pipe = SanaPipeline(dit, te, self.autoencoder, caption_bucket=cfg.model.caption_bucket)
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

    def release(self) -> None:
        """Give up the run folder's lock (rank 0); after the last file of the run is written."""
        if self.lock is not None:
            self.lock.release()
            self.lock = None


def _full_model_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    out = {}
    for n, p in model.named_parameters():
        t = p.detach()
        out[n] = (t.full_tensor() if hasattr(t, "full_tensor") else t).cpu()
    return out


def train(cfg: TrainConfig, data: str | Path, output: str | Path, resume: bool = False,
          device: str | None = None, new_output: bool = False) -> dict:
    trainer = Trainer(cfg, data, output, resume=resume, device=device, new_output=new_output)
    try:
        try:
            summary = trainer.fit()
        finally:
            trainer.close()
        if trainer.info.is_main:
            (trainer.run_dir / "summary.json").write_text(json.dumps(summary, indent=1))
            print_summary(summary, trainer.run_dir)
    finally:
        trainer.release()
    return summary


def print_summary(s: dict, run_dir: Path) -> None:
    print("\n=== training summary")
    for k in ("steps", "steps_this_run", "seconds", "steps_per_s", "first_loss", "final_loss", "mean_loss_last_10",
              "strategy", "world", "params", "nonfinite_skipped", "shards_skipped", "samples_skipped",
              "captions_taken", "checkpoint"):
        print(f"  {k:<20} {s.get(k)}")
    print(f"  {'run dir':<20} {run_dir}  (config.yaml, metrics.jsonl, checkpoints/, wandb/)")

