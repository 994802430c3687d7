"""Evaluation during training: figures computed at epoch ends and reported with that epoch's metrics.

A ``Validation`` scores the module being trained on a held-out shard set (every sample once, each rank
its share) and may write a result file when training ends. The linear probe's validation top-1 is the
one recipe that has it today.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

from cast.artifacts import report_url, write_report
from cast.data import build_loader
from cast.data.batches import to_device
from cast.train.config import TrainConfig
from cast.train.distributed import all_reduce_sum
from cast.train.objectives import top1_correct


class Validation:
    def evaluate(self, module: nn.Module) -> dict:
        """Metrics of ``module`` (every rank calls it: the figures are summed over ranks)."""
        raise NotImplementedError

    def finish(self, metrics: dict) -> None:
        """After the last epoch's ``evaluate`` (rank 0, before the final report: a restart redoes both)."""


class LinearProbeValidation(Validation):
    """Top-1 of the probe on ``linear.val_shards``; the final figure goes to
    ``<pretrained>.linear_probe.json``, where ``jobs.evaluate`` looks for it."""

    def __init__(self, cfg: TrainConfig, pretrained: str, *, rank: int, world_size: int,
                 device: torch.device, provider):
        self.cfg, self.pretrained = cfg, pretrained
        self.rank, self.world_size, self.device, self.provider = rank, world_size, device, provider
        self.data = dataclasses.replace(cfg.data, shards=cfg.linear.val_shards, recipe="linear_eval",
                                        shuffle=False, drop_remainder=False)

    @torch.no_grad()
    def evaluate(self, module):
        """Ranks may differ in batch count, so the forward runs on the unwrapped module (no DDP collective
        per batch); the counts are summed over ranks at the end."""
        module.eval()
        correct = total = 0
        loader = build_loader(self.data, rank=self.rank, world_size=self.world_size, epoch=0,
                              provider=self.provider)
        for batch in loader:
            batch = to_device(batch, self.device, self.provider)
            logits = module(batch["images"][:, 0], batch["superpixels"][:, 0])
            correct += top1_correct(logits, batch["label"])
            total += logits.shape[0]
        totals = torch.tensor([float(correct), total], dtype=torch.float64, device=self.device)
        counts = all_reduce_sum(totals)
        return {"val_top1": float(counts[0] / counts[1].clamp_min(1)) * 100.0}

    def finish(self, metrics):
        """Beside the location ``linear.pretrained`` names and beside the checkpoint that resolved to."""
        if self.rank != 0:
            return
        cfg = self.cfg
        result = {
            "top1": metrics["val_top1"],
            "checkpoint": self.pretrained,
            "val_shards": cfg.linear.val_shards,
            "epochs": cfg.schedule.epochs,
            "run": cfg.run_folder(),
        }
        for location in dict.fromkeys((cfg.linear.pretrained.rstrip("/"), self.pretrained)):
            url = write_report(result, report_url(location, "linear_probe"))
            print(f"[cast-train] linear probe val top-1 {metrics['val_top1']:.2f}: {url}", flush=True)


def build_validation(cfg: TrainConfig, objective, **context) -> Validation | None:
    if cfg.objective == "linear" and cfg.linear.val_shards:
        return LinearProbeValidation(cfg, objective.pretrained, **context)
    return None
