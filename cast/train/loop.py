"""The per-worker training function that ``TorchTrainer`` runs on every Ray Train worker.

The loop wires components together and owns only the step itself: distribution (DDP via
``prepare_model``, gradient accumulation under ``no_sync``), precision, the lr schedule and the order
of things. The objective (``objectives``) turns a batch into a loss; ``checkpoint.TrainState`` saves and
restores; ``metrics`` sums and reports; ``validation`` scores at epoch ends.
"""

from __future__ import annotations

import contextlib
import time

from torch import nn

from cast.config import dump_config
from cast.data import build_loader
from cast.data.batches import to_device
from cast.precision import autocast
from cast.train.checkpoint import TrainState, checkpoint_name, retrying_upload, seed_everything
from cast.train.config import TrainConfig
from cast.train.metrics import MetricsWindow, Reporter
from cast.train.objectives import build_objective
from cast.train.optim import build_optimizer, lr_at, scaled_lr, set_lr
from cast.train.validation import build_validation


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
        self.model = ray.train.torch.prepare_model(self.module, move_to_device=False)
        self.objective.setup(self.module)
        self.peak_lr = scaled_lr(cfg.optim, cfg.global_batch)
        optimizer = build_optimizer(self.module, cfg.optim, self.peak_lr)
        self.state = TrainState(self.module, optimizer, self.objective, rank=rank, world_size=world_size,
                                seed=cfg.seed, config_yaml=dump_config(cfg))
        if self.state.restore(ray.train.get_checkpoint(), cfg.checkpoint.resume_from) and rank == 0:
            p = self.state.position
            print(f"[cast-train] resumed at step {p.step} (epoch {p.epoch}, batch {p.batches_done})",
                  flush=True)
        self.provider = cfg.data.provider()
        if self.provider is None:
            raise ValueError("data.superpixels: CAST needs a superpixel provider")
        probe = build_loader(cfg.data, rank=rank, world_size=world_size, epoch=0, provider=self.provider)
        self.steps_per_epoch = len(probe) // cfg.optim.grad_accum_steps
        if self.steps_per_epoch == 0:
            raise ValueError(
                f"data.batch_size x optim.grad_accum_steps: {len(probe)} batches per epoch give "
                f"no optimizer step with {cfg.optim.grad_accum_steps} accumulation steps"
            )
        self.total_steps = self.steps_per_epoch * cfg.schedule.epochs
        self.warmup_steps = round(cfg.schedule.warmup_epochs * self.steps_per_epoch)
        self.reporter = Reporter(cfg.run_folder(), rank=rank, device=self.device,
                                 tensorboard=cfg.logging.tensorboard, retry=cfg.checkpoint.retry)
        self.validation = build_validation(cfg, self.objective, rank=rank, world_size=world_size,
                                           device=self.device, provider=self.provider)

    @property
    def batches_per_epoch(self) -> int:
        return self.steps_per_epoch * self.cfg.optim.grad_accum_steps

    def epoch_progress(self) -> float:
        position = self.state.position
        return position.epoch + position.batches_done / self.batches_per_epoch

    def run(self) -> None:
        cfg, position = self.cfg, self.state.position
        while position.epoch < cfg.schedule.epochs:
            loader = build_loader(cfg.data, rank=self.rank, world_size=self.world_size, epoch=position.epoch,
                                  provider=self.provider, start_batch=position.batches_done)
            window = MetricsWindow()
            batches = iter(loader)
            self.objective.train_mode(self.model)
            while position.batches_done < self.batches_per_epoch:
                self._optimizer_step(batches, window)
                if position.batches_done >= self.batches_per_epoch:
                    break  # the epoch-end report below carries this window and a checkpoint
                checkpoint_due = _due(position.step, cfg.checkpoint.every_steps)
                if checkpoint_due or _due(position.step, cfg.logging.every_steps):
                    self._report(window, loader, with_checkpoint=checkpoint_due)
                    window = MetricsWindow()
            extra = self.validation.evaluate(self.module) if self.validation is not None else {}
            if self.validation is not None and position.epoch + 1 == cfg.schedule.epochs:
                self.validation.finish(extra)  # before the last report: a restart redoes both
            position.epoch, position.batches_done = position.epoch + 1, 0
            self._report(window, loader, with_checkpoint=True, extra=extra)
        self.reporter.close()

    def _optimizer_step(self, batches, window: MetricsWindow) -> None:
        cfg, position = self.cfg, self.state.position
        accum = cfg.optim.grad_accum_steps
        lr = lr_at(position.step, self.total_steps, self.warmup_steps, self.peak_lr, cfg.schedule)
        optimizer = self.state.optimizer
        set_lr(optimizer, lr)
        optimizer.zero_grad(set_to_none=True)
        for micro in range(accum):
            start = time.perf_counter()
            batch = next(batches)
            window.wait += time.perf_counter() - start
            defer = micro < accum - 1 and hasattr(self.model, "no_sync")  # all-reduce on the last only
            sync = self.model.no_sync() if defer else contextlib.nullcontext()
            with sync:
                on_device = to_device(batch, self.device, self.provider)
                with autocast(self.device):
                    loss, correct = self.objective.loss(self.model, on_device, self.epoch_progress())
                (loss / accum).backward()
            window.add(loss.detach(), batch["images"].shape[0], correct)
            position.batches_done += 1
        if cfg.optim.clip_grad_norm > 0:
            nn.utils.clip_grad_norm_(self.module.parameters(), cfg.optim.clip_grad_norm)
        optimizer.step()
        self.objective.after_step(self.module)
        position.step += 1
        window.lr = lr

    def _report(self, window: MetricsWindow, loader, *, with_checkpoint: bool, extra: dict | None = None):
        position = self.state.position
        metrics = self.reporter.collect(window, loader.counters, {
            **(extra or {}),
            "step": position.step,
            "epoch": position.epoch,
            "epoch_progress": self.epoch_progress(),
        })
        folder = self.state.save() if with_checkpoint else None
        upload = retrying_upload(self.cfg.checkpoint.retry, self.cfg.run_folder())
        self.reporter.publish(metrics, position.step, folder, checkpoint_name(position), upload)


def _due(step: int, every: int) -> bool:
    return every > 0 and step % every == 0
