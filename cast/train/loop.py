"""The per-worker training function that ``TorchTrainer`` runs on every Ray Train worker.

The loop wires components together and owns only the step itself: distribution (DDP via
``prepare_model``, gradient accumulation under ``no_sync``), precision, the lr schedule and the order
of things. The objective (``objectives``) turns a batch into a loss; ``checkpoint.TrainState`` saves and
restores; ``metrics`` sums and reports; ``validation`` scores at epoch ends.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import time

from torch import nn

from cast.config import dump_config
from cast.data import build_loader, list_shards
from cast.data.batches import to_device
from cast.data.reader import epoch_samples
from cast.precision import resolve
from cast.train.checkpoint import TrainState, checkpoint_name, retrying_upload, seed_everything
from cast.train.config import TrainConfig
from cast.train.distributed import broadcast_buffers, gather_objects
from cast.train.metrics import MetricsWindow, Reporter
from cast.train.objectives import build_objective, compile_encoders
from cast.train.optim import build_optimizer, lr_at, scaled_lr, set_lr
from cast.train.validation import BestCheckpoint, build_validation


def train_loop_per_worker(loop_config: dict) -> None:
    """Entry point for ``TorchTrainer(train_loop_per_worker, train_loop_config={"config": cfg})``."""
    import ray.train

    cfg: TrainConfig = loop_config["config"]
    ctx = ray.train.get_context()
    Trainer(cfg, rank=ctx.get_world_rank(), world_size=ctx.get_world_size()).run()


class Trainer:
    """One worker's run; ``run`` trains from the restored position to the last epoch."""

    def __init__(self, cfg: TrainConfig, *, rank: int, world_size: int):
        import ray.train
        import ray.train.torch

        self.cfg, self.rank, self.world_size = cfg, rank, world_size
        self.device = ray.train.torch.get_device()
        seed_everything(cfg.seed + rank)
        self.objective = build_objective(cfg)
        module = self.objective.build()
        if cfg.model.sync_bn and world_size > 1:
            module = nn.SyncBatchNorm.convert_sync_batchnorm(module)
        self.module = module.to(self.device)
        if cfg.model.compile:
            compile_encoders(self.module)
        self.precision = resolve(self.device, cfg.model.precision)
        self.scaler = self.precision.grad_scaler()  # loss scaling for fp16, a pass-through otherwise
        if rank == 0:
            print(f"[cast-train] precision {self.precision.name} on {self.device.type}"
                  f"{', model compiled' if cfg.model.compile else ''}", flush=True)
        self.model = ray.train.torch.prepare_model(self.module, move_to_device=False)
        self.objective.setup(self.module)
        self.global_batch = cfg.global_batch
        self.micro_batch, self.accum = cfg.batch_split(world_size)
        self.data = dataclasses.replace(cfg.training_data(), batch_size=self.micro_batch)
        self.peak_lr = scaled_lr(cfg.optim, self.global_batch)
        groups = self.objective.param_groups(self.module)
        optimizer = build_optimizer(self.module, cfg.optim, self.peak_lr, groups)
        self.best = BestCheckpoint(cfg) if cfg.checkpoint.best_metric else None
        self.state = TrainState(self.module, optimizer, self.objective, rank=rank, world_size=world_size,
                                seed=cfg.seed, config_yaml=dump_config(cfg), best=self.best)
        if self.state.restore(ray.train.get_checkpoint(), cfg.checkpoint.resume_from) and rank == 0:
            p = self.state.position
            print(f"[cast-train] resumed at step {p.step} (epoch {p.epoch}, {p.samples_seen} samples seen) "
                  f"on {world_size} workers: {self.micro_batch} x {self.accum} per step each", flush=True)
        self.provider = cfg.data.provider()
        if self.provider is None:
            raise ValueError("data.superpixels: CAST needs a superpixel provider")
        # schedules run in samples seen: the same curve at any world size, continuous across a resize
        num_samples = list_shards(cfg.data.shards).num_samples
        self.epoch_samples = epoch_samples(num_samples, self.global_batch)
        if self.epoch_samples == 0:
            raise ValueError(
                f"data.shards: {num_samples} samples give no optimizer step of optim.global_batch "
                f"{self.global_batch}"
            )
        self.total_samples = self.epoch_samples * cfg.schedule.epochs
        warmup = cfg.schedule.warmup_steps * self.global_batch  # SPML counts warmup in iterations
        self.warmup_samples = warmup or round(cfg.schedule.warmup_epochs * self.epoch_samples)
        self.sample_log = None
        if cfg.logging.sample_log:
            os.makedirs(cfg.logging.sample_log, exist_ok=True)
            self.sample_log = open(os.path.join(cfg.logging.sample_log, f"rank{rank}.jsonl"), "a")  # noqa: SIM115
        self.started = gather_objects(time.time())[0]  # rank 0's: one id for this worker group
        self.reporter = Reporter(cfg.run_folder(), rank=rank, device=self.device,
                                 tensorboard=cfg.logging.tensorboard, retry=cfg.checkpoint.retry)
        self.validation = build_validation(cfg, self.objective, rank=rank, world_size=world_size,
                                           device=self.device, provider=self.provider)

    def epoch_progress(self) -> float:
        return self.state.position.samples_seen / self.epoch_samples

    def run(self) -> None:
        cfg, position = self.cfg, self.state.position
        while position.epoch < cfg.total_epochs:
            layout = [self.world_size, self.data.num_workers, self.micro_batch]
            rotation = position.rotation if position.layout == layout else 0
            loader = build_loader(self.data, rank=self.rank, world_size=self.world_size, epoch=position.epoch,
                                  provider=self.provider, remaining=position.remaining,
                                  global_batch=self.global_batch, rotation=rotation)
            window = MetricsWindow()
            batches = iter(loader)
            self.objective.train_mode(self.model)
            steps = len(loader) // self.accum
            for done in range(1, steps + 1):
                self._optimizer_step(batches, window)
                if done == steps:
                    break  # the epoch-end report below carries this window and a checkpoint
                checkpoint_due = _due(position.step, cfg.checkpoint.every_steps)
                if checkpoint_due or _due(position.step, cfg.logging.every_steps):
                    position.remaining, position.rotation = loader.remaining(), loader.rotation()
                    position.layout = layout
                    self._report(window, loader, with_checkpoint=checkpoint_due)
                    window = MetricsWindow()
            validate = self.validation is not None and self.validation.due(position.epoch + 1)
            if validate:
                for module in self.objective.scored_modules(self.module):
                    broadcast_buffers(module)
            extra = self.validation.evaluate(self.module) if validate else {}
            if self.validation is not None and position.epoch + 1 == cfg.total_epochs:
                self.validation.finish(extra)  # before the last report: a restart redoes both
            position.epoch, position.remaining, position.layout = position.epoch + 1, None, None
            # only epochs that validated compare (same figures on every rank)
            best = self.best is not None and validate and self.best.improved(extra)
            self._report(window, loader, with_checkpoint=True, extra=extra, best=best)
        self.reporter.close()
        if self.sample_log is not None:
            self.sample_log.close()

    def _optimizer_step(self, batches, window: MetricsWindow) -> None:
        cfg, position = self.cfg, self.state.position
        accum = self.accum
        lr = lr_at(position.samples_seen, self.total_samples, self.warmup_samples, self.peak_lr, cfg.schedule)
        optimizer = self.state.optimizer
        set_lr(optimizer, lr)
        optimizer.zero_grad(set_to_none=True)
        progress = self.epoch_progress()
        keys = []
        for micro in range(accum):
            start = time.perf_counter()
            batch = next(batches)
            window.wait += time.perf_counter() - start
            defer = micro < accum - 1 and hasattr(self.model, "no_sync")  # all-reduce on the last only
            sync = self.model.no_sync() if defer else contextlib.nullcontext()
            with sync:
                on_device = to_device(batch, self.device, self.provider)
                with self.precision.autocast():
                    loss, correct = self.objective.loss(self.model, on_device, progress)
                self.scaler.scale(loss / accum).backward()
            window.add(loss.detach(), batch["images"].shape[0], correct)
            keys += batch["key"]
        if cfg.optim.clip_grad_norm > 0:
            self.scaler.unscale_(optimizer)  # clip the true gradients
            nn.utils.clip_grad_norm_(self.module.parameters(), cfg.optim.clip_grad_norm)
        self.scaler.step(optimizer)  # skipped (and the scale lowered) when fp16 gradients overflowed
        self.scaler.update()
        position.samples_seen += self.global_batch
        self.objective.after_step(self.module, self.epoch_progress())
        if self.sample_log is not None:
            record = {"step": position.step, "epoch": position.epoch, "lr": lr, "keys": keys,
                      "samples_seen": position.samples_seen - self.global_batch,
                      "world_size": self.world_size, "started": self.started}
            self.sample_log.write(json.dumps(record) + "\n")
            self.sample_log.flush()
        position.step += 1
        window.lr = lr

    def _report(self, window: MetricsWindow, loader, *, with_checkpoint: bool, extra: dict | None = None,
                best: bool = False):
        position = self.state.position
        metrics = self.reporter.collect(window, loader.counters, {
            **(extra or {}),
            "step": position.step,
            "epoch": position.epoch,
            "epoch_progress": self.epoch_progress(),
            **self.precision.metrics(),
            **({"grad_scale": self.scaler.get_scale()} if self.scaler.is_enabled() else {}),
        })
        folder = self.state.save() if with_checkpoint else None
        if best and folder is not None:  # rank 0 holds the folder
            url = self.best.publish(folder, metrics, position.step, position.epoch)
            print(f"[cast-train] best {self.best.metric} {self.best.value:.3f} at epoch {position.epoch}: "
                  f"{url}", flush=True)
        upload = retrying_upload(self.cfg.checkpoint.retry, self.cfg.run_folder())
        self.reporter.publish(metrics, position.step, folder, checkpoint_name(position), upload)


def _due(step: int, every: int) -> bool:
    return every > 0 and step % every == 0
