"""The per-worker training function that ``TorchTrainer`` runs on every Ray Train worker.

One loop for the three recipes: the objective decides how a batch becomes a loss. The loop owns
distribution (DDP via ``prepare_model``, gradient accumulation under ``no_sync``), precision (bf16
autocast on CUDA only), schedules, metrics, checkpoints and resuming from them.
"""

from __future__ import annotations

import contextlib
import os
import random
import shutil
import tempfile
import time
from collections import Counter
from dataclasses import asdict

import numpy as np
import timm
import torch
import torch.distributed as dist
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.utils import ModelEmaV3
from torch import nn

import cast.models  # noqa: F401  (registers cast_* with timm)
from cast.config import dump_config
from cast.data import build_loader
from cast.data.config import DataConfig
from cast.eval.report import report_url, write_report
from cast.train.checkpoint import (
    Position,
    checkpoint_name,
    latest_checkpoint,
    new_checkpoint_folder,
    read_state,
    retrying_upload,
    rng_state,
    set_rng_state,
)
from cast.train.config import TrainConfig
from cast.train.objectives import MoCo, SupervisedObjective, moco_momentum, prepare_linear_probe, top1_correct
from cast.train.optim import build_optimizer, lr_at, scaled_lr, set_lr


def train_loop_per_worker(loop_config: dict) -> None:
    """Entry point for ``TorchTrainer(train_loop_per_worker, train_loop_config={"config": cfg})``."""
    import ray.train

    cfg: TrainConfig = loop_config["config"]
    ctx = ray.train.get_context()
    Trainer(cfg, rank=ctx.get_world_rank(), world_size=ctx.get_world_size()).run()


class Trainer:
    """State of one worker's run; ``run`` trains from the restored position to the last epoch."""

    def __init__(self, cfg: TrainConfig, *, rank: int, world_size: int):
        import ray.train.torch

        self.cfg, self.rank, self.world_size = cfg, rank, world_size
        self.device = ray.train.torch.get_device()
        _seed_everything(cfg.seed + rank)
        self.config_yaml = dump_config(cfg)
        module = self._build_module()
        if cfg.model.sync_bn and world_size > 1:
            module = nn.SyncBatchNorm.convert_sync_batchnorm(module)
        self.module = module.to(self.device)
        self.model = ray.train.torch.prepare_model(self.module, move_to_device=False)
        self.peak_lr = scaled_lr(cfg.optim, cfg.global_batch)
        self.optimizer = build_optimizer(self.module, cfg.optim, self.peak_lr)
        self.ema = (
            ModelEmaV3(self.module, decay=cfg.supervised.ema_decay)
            if cfg.objective == "supervised" and cfg.supervised.ema_decay > 0
            else None
        )
        self.supervised = SupervisedObjective(cfg.supervised) if cfg.objective == "supervised" else None
        self.provider = _provider(cfg.data)
        self.position = Position(world_size=world_size)
        self._restore()
        probe = build_loader(cfg.data, rank=rank, world_size=world_size, epoch=0, provider=self.provider)
        self.steps_per_epoch = len(probe) // cfg.optim.grad_accum_steps
        if self.steps_per_epoch == 0:
            raise ValueError(
                f"data.batch_size x optim.grad_accum_steps: {len(probe)} batches per epoch give "
                f"no optimizer step with {cfg.optim.grad_accum_steps} accumulation steps"
            )
        self.total_steps = self.steps_per_epoch * cfg.schedule.epochs
        self.warmup_steps = round(cfg.schedule.warmup_epochs * self.steps_per_epoch)
        self.writer = self._tensorboard() if rank == 0 and cfg.logging.tensorboard else None

    # ---- construction -------------------------------------------------------------------------
    def _build_module(self) -> nn.Module:
        cfg = self.cfg
        if cfg.objective == "moco":
            encoder = timm.create_model(cfg.model.name, num_classes=0, **cfg.model.kwargs)
            return MoCo(encoder, cfg.moco)
        classes = cfg.supervised.num_classes if cfg.objective == "supervised" else cfg.linear.num_classes
        model = timm.create_model(cfg.model.name, num_classes=classes, **cfg.model.kwargs)
        if cfg.objective == "linear":
            self.pretrained = latest_checkpoint(cfg.linear.pretrained)
            prepare_linear_probe(model, read_state(self.pretrained)["model"])
        return model

    def _restore(self) -> None:
        """Continue from Ray's checkpoint of this run (after a restart) or from ``checkpoint.resume_from``."""
        import ray.train

        checkpoint = ray.train.get_checkpoint()
        if checkpoint is not None:
            with checkpoint.as_directory() as folder:
                state = read_state(folder)
        elif self.cfg.checkpoint.resume_from:
            state = read_state(latest_checkpoint(self.cfg.checkpoint.resume_from))
        else:
            return
        self.module.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        if self.ema is not None and "ema" in state:
            self.ema.module.load_state_dict(state["ema"])
        saved = Position(**state["position"])
        batches = saved.batches_done
        if saved.world_size != self.world_size:  # same samples consumed, counted in this world's batches
            batches = batches * saved.world_size // self.world_size
        self.position = Position(
            step=saved.step, epoch=saved.epoch, batches_done=batches, world_size=self.world_size
        )
        if self.rank == 0:
            print(
                f"[cast-train] resumed at step {saved.step} (epoch {saved.epoch}, batch {batches})",
                flush=True,
            )
        if len(state["rng"]) == self.world_size:
            set_rng_state(state["rng"][self.rank])
        else:
            _seed_everything(self.cfg.seed + self.rank + saved.step)

    def _tensorboard(self):
        from tensorboardX import SummaryWriter

        run = self.cfg.resolved_storage_path().rstrip("/") + "/" + self.cfg.ray.name
        if "://" in run:  # event files are written locally and copied up at every checkpoint
            self._tb_remote = run + "/tensorboard"
            return SummaryWriter(tempfile.mkdtemp(prefix="cast-tb-"))
        self._tb_remote = None
        return SummaryWriter(os.path.join(run, "tensorboard"))

    # ---- training -----------------------------------------------------------------------------
    def run(self) -> None:
        cfg = self.cfg
        accum = cfg.optim.grad_accum_steps
        while self.position.epoch < cfg.schedule.epochs:
            epoch = self.position.epoch
            loader = build_loader(
                cfg.data,
                rank=self.rank,
                world_size=self.world_size,
                epoch=epoch,
                provider=self.provider,
                start_batch=self.position.batches_done,
            )
            usable = self.steps_per_epoch * accum
            window = _Window()
            batches = iter(loader)
            self._set_train_mode()
            while self.position.batches_done < usable:
                self._optimizer_step(batches, window, accum, epoch)
                if self.position.batches_done >= usable:
                    break  # the epoch-end report below carries this window and a checkpoint
                checkpoint_due = _due(self.position.step, cfg.checkpoint.every_steps)
                if checkpoint_due or _due(self.position.step, cfg.logging.every_steps):
                    self._report(window, loader, with_checkpoint=checkpoint_due)
                    window = _Window()
            extra = self._evaluate_linear() if cfg.objective == "linear" and cfg.linear.val_shards else {}
            if extra and epoch + 1 == cfg.schedule.epochs and self.rank == 0:
                self._write_probe_result(extra["val_top1"])  # before the last report: a restart redoes both
            self.position = Position(
                step=self.position.step, epoch=epoch + 1, batches_done=0, world_size=self.world_size
            )
            self._report(window, loader, with_checkpoint=True, extra=extra)
        if self.writer is not None:
            self.writer.close()
            self._sync_tensorboard()

    def _set_train_mode(self) -> None:
        if self.cfg.objective == "linear":  # the reference trains the probe with the backbone in eval mode
            self.model.eval()
            return
        self.model.train()
        if self.cfg.model.freeze_bn:
            for module in self.model.modules():
                if isinstance(module, nn.modules.batchnorm._BatchNorm):
                    module.eval()

    def _optimizer_step(self, batches, window: _Window, accum: int, epoch: int) -> None:
        cfg = self.cfg
        lr = lr_at(self.position.step, self.total_steps, self.warmup_steps, self.peak_lr, cfg.schedule)
        set_lr(self.optimizer, lr)
        self.optimizer.zero_grad(set_to_none=True)
        for micro in range(accum):
            start = time.perf_counter()
            batch = next(batches)
            window.wait += time.perf_counter() - start
            last = micro == accum - 1
            sync = (
                contextlib.nullcontext()
                if last or not hasattr(self.model, "no_sync")
                else self.model.no_sync()
            )
            with sync:
                loss, correct = self._loss(batch, epoch)
                (loss / accum).backward()
            window.add(loss.detach(), batch["images"].shape[0], correct)
            self.position.batches_done += 1
        if cfg.optim.clip_grad_norm > 0:
            nn.utils.clip_grad_norm_(self.module.parameters(), cfg.optim.clip_grad_norm)
        self.optimizer.step()
        if self.ema is not None:
            self.ema.update(self.module)
        self.position.step += 1
        window.lr = lr

    def _loss(self, batch: dict, epoch: int) -> tuple[torch.Tensor, int]:
        images = batch["images"].to(self.device, non_blocking=True)
        superpixels = self._superpixels(batch, images)
        autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=self.device.type == "cuda")
        with autocast:
            if self.cfg.objective == "moco":
                fraction = epoch + self.position.batches_done / (
                    self.steps_per_epoch * self.cfg.optim.grad_accum_steps
                )
                m = moco_momentum(fraction, self.cfg.schedule.epochs, self.cfg.moco)
                return self.model(images, superpixels, m), -1
            labels = batch["label"].to(self.device, non_blocking=True)
            if self.supervised is not None:
                loss, logits = self.supervised(self.model, images[:, 0], superpixels[:, 0], labels)
            else:
                logits = self.model(images[:, 0], superpixels[:, 0])
                loss = nn.functional.cross_entropy(logits.float(), labels)
            return loss, top1_correct(logits.detach(), labels)

    def _superpixels(self, batch: dict, images: torch.Tensor) -> torch.Tensor:
        """From the loader, or computed here on the training device for an on-device provider."""
        if "superpixels" in batch:
            return batch["superpixels"].to(self.device, non_blocking=True)
        b, v, c, h, w = images.shape
        images01 = _denormalize(images.reshape(b * v, c, h, w))
        return self.provider.batch(images01).reshape(b, v, h, w)

    # ---- reporting ----------------------------------------------------------------------------
    def _report(self, window: _Window, loader, *, with_checkpoint: bool, extra: dict | None = None) -> None:
        import ray.train

        metrics = {
            **window.summary(self.world_size, self.device),
            **(extra or {}),
            "step": self.position.step,
            "epoch": self.position.epoch,
            "epoch_progress": self.position.epoch
            + self.position.batches_done / (self.steps_per_epoch * self.cfg.optim.grad_accum_steps),
        }
        metrics.update({f"skipped_{k}": v for k, v in _sum_counters(loader.counters).items()})
        if self.writer is not None:
            for key, value in metrics.items():
                self.writer.add_scalar(f"train/{key}", value, self.position.step)
            self.writer.flush()
        if not with_checkpoint:
            ray.train.report(metrics)
            return
        rngs = _gather_objects(rng_state())
        if self.rank != 0:
            ray.train.report(metrics)
            return
        self._sync_tensorboard()
        state = {
            "model": self.module.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "position": asdict(self.position),
            "rng": rngs,
        }
        if self.ema is not None:
            state["ema"] = self.ema.module.state_dict()
        folder = new_checkpoint_folder(state, self.config_yaml)
        from ray.train import Checkpoint

        try:
            ray.train.report(
                metrics,
                checkpoint=Checkpoint.from_directory(folder),
                checkpoint_dir_name=checkpoint_name(self.position),
                checkpoint_upload_fn=retrying_upload(
                    self.cfg.checkpoint.upload_attempts, self.cfg.checkpoint.upload_backoff_s
                ),
            )
        finally:
            shutil.rmtree(folder, ignore_errors=True)

    def _sync_tensorboard(self) -> None:
        if self.writer is None or self._tb_remote is None:
            return
        import fsspec

        self.writer.flush()
        fs, path = fsspec.core.url_to_fs(self._tb_remote)
        fs.put(self.writer.logdir.rstrip("/") + "/", path, recursive=True)

    @torch.no_grad()
    def _evaluate_linear(self) -> dict:
        """Top-1 of the probe on ``linear.val_shards``: each rank its share, every sample once (ranks may
        differ in batch count, so the forward runs on the unwrapped module: no DDP collective per batch),
        summed over ranks."""
        val = DataConfig(
            **{
                **asdict(self.cfg.data),
                "shards": self.cfg.linear.val_shards,
                "recipe": "linear_eval",
                "shuffle": False,
                "drop_remainder": False,
            }
        )
        self.model.eval()
        correct = total = 0
        for batch in build_loader(
            val, rank=self.rank, world_size=self.world_size, epoch=0, provider=self.provider
        ):
            images = batch["images"].to(self.device)
            logits = self.module(images[:, 0], self._superpixels(batch, images)[:, 0])
            correct += top1_correct(logits, batch["label"].to(self.device))
            total += images.shape[0]
        counts = _all_reduce_sum(torch.tensor([correct, total], dtype=torch.float64, device=self.device))
        return {"val_top1": float(counts[0] / counts[1].clamp_min(1)) * 100.0}

    def _write_probe_result(self, top1: float) -> None:
        """``<pretrained>.linear_probe.json``, where ``jobs.evaluate`` looks for it: beside the location
        ``linear.pretrained`` names and beside the checkpoint that resolved to, when they differ."""
        cfg = self.cfg
        result = {
            "top1": top1,
            "checkpoint": self.pretrained,
            "val_shards": cfg.linear.val_shards,
            "epochs": cfg.schedule.epochs,
            "run": cfg.resolved_storage_path().rstrip("/") + "/" + cfg.ray.name,
        }
        for location in dict.fromkeys((cfg.linear.pretrained.rstrip("/"), self.pretrained)):
            url = write_report(result, report_url(location, "linear_probe"))
            print(f"[cast-train] linear probe val top-1 {top1:.2f}: {url}", flush=True)


class _Window:
    """Sums over the optimizer steps since the last report."""

    def __init__(self):
        self.start = time.perf_counter()
        self.wait = 0.0
        self.loss_sum = None
        self.batches = 0
        self.images = 0
        self.correct = 0
        self.lr = 0.0
        self.classify = False

    def add(self, loss: torch.Tensor, images: int, correct: int) -> None:
        self.loss_sum = loss.float() if self.loss_sum is None else self.loss_sum + loss.float()
        self.batches += 1
        self.images += images
        if correct >= 0:  # -1: the objective has no labels to score
            self.classify = True
            self.correct += correct

    def summary(self, world_size: int, device: torch.device) -> dict:
        elapsed = max(time.perf_counter() - self.start, 1e-9)
        loss = float(self.loss_sum) if self.loss_sum is not None else 0.0
        totals = _all_reduce_sum(
            torch.tensor([loss, self.batches, self.images, self.correct], dtype=torch.float64, device=device)
        )
        loss_sum, batches, images, correct = totals.tolist()
        summary = {
            "loss": loss_sum / max(batches, 1),
            "lr": self.lr,
            "images_per_s": images / elapsed,
            "data_wait_frac": self.wait / elapsed,
        }
        if self.classify:
            summary["train_top1"] = 100.0 * correct / max(images, 1)
        return summary


def _due(step: int, every: int) -> bool:
    return every > 0 and step % every == 0


def _all_reduce_sum(values: torch.Tensor) -> torch.Tensor:
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(values)
    return values


def _gather_objects(obj) -> list:
    if not (dist.is_available() and dist.is_initialized()):
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def _sum_counters(counters: Counter) -> dict:
    """Skip counters of all ranks, summed (every rank takes part; keys may differ between ranks)."""
    merged: Counter = Counter()
    for part in _gather_objects(dict(counters)):
        merged.update(part)
    return dict(merged)


def _provider(cfg: DataConfig):
    if not cfg.superpixels or cfg.superpixels == "none":
        raise ValueError("data.superpixels: CAST needs a superpixel provider")
    from cast.superpixels import get_provider

    return get_provider(cfg.superpixels, **cfg.superpixel_params)


def _denormalize(images: torch.Tensor) -> torch.Tensor:
    mean = torch.tensor(IMAGENET_DEFAULT_MEAN, device=images.device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_DEFAULT_STD, device=images.device).view(1, 3, 1, 1)
    return (images.float() * std + mean).clamp(0, 1)


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
