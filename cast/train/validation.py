"""Evaluation during training: figures computed at epoch ends and reported with that epoch's metrics.

A ``Validation`` scores the module being trained on a held-out shard set (every sample once, each rank
its share) and may write a result file when training ends: the linear probe's top-1, validation top-1
of supervised (DeiT) training with its EMA beside it, the kNN top-1 of any encoder (``knn.*``) and dense
fine-tuning's mIoU (sliding windows, ``cast.eval.dense``). ``BestCheckpoint`` keeps the epoch that scored
best on any reported metric (``checkpoint.best_metric``) in ``<run>/best``.
"""

from __future__ import annotations

import math
from dataclasses import replace

import fsspec
import numpy as np
import torch
from torch import nn

from cast.artifacts import COMPLETE_MARKER, report_url, write_report
from cast.data import build_loader, read_manifest
from cast.data.batches import to_device
from cast.eval.dense import predict_logits
from cast.eval.features import extract_features
from cast.eval.knn import knn_accuracy
from cast.eval.segmentation import SegmentationMeter
from cast.storage import join, retry, write_text
from cast.train.config import TrainConfig
from cast.train.distributed import all_reduce_sum, gather_objects
from cast.train.objectives import top1_correct


class Validation:
    def evaluate(self, module: nn.Module) -> dict:
        """Metrics of ``module`` (every rank calls it: the figures are summed over ranks)."""
        raise NotImplementedError

    def due(self, epochs_done: int) -> bool:
        """Whether to evaluate after ``epochs_done`` epochs (the last one always is)."""
        return True

    def finish(self, metrics: dict) -> None:
        """After the last epoch's ``evaluate`` (rank 0, before the final report: a restart redoes both)."""


@torch.no_grad()
def classifier_top1(module: nn.Module, data, *, rank: int, world_size: int, device: torch.device,
                    provider) -> float:
    """Top-1 (%) of a classifier on ``data`` (every sample once over the ranks). Ranks may differ in batch
    count, so the forward runs on the unwrapped module (no DDP collective per batch); the counts are
    summed over ranks at the end."""
    was_training = module.training
    module.eval()
    correct = total = 0
    for batch in build_loader(data, rank=rank, world_size=world_size, epoch=0, provider=provider):
        batch = to_device(batch, device, provider)
        logits = module(batch["images"][:, 0], batch["superpixels"][:, 0])
        correct += top1_correct(logits, batch["label"])
        total += logits.shape[0]
    module.train(was_training)
    counts = all_reduce_sum(torch.tensor([float(correct), total], dtype=torch.float64, device=device))
    return float(counts[0] / counts[1].clamp_min(1)) * 100.0


class LinearProbeValidation(Validation):
    """Top-1 of the probe on ``linear.val_shards``; the final figure goes to
    ``<pretrained>.linear_probe.json``, where ``jobs.evaluate`` looks for it."""

    def __init__(self, cfg: TrainConfig, pretrained: str, *, rank: int, world_size: int,
                 device: torch.device, provider):
        self.cfg, self.pretrained = cfg, pretrained
        self.rank, self.world_size, self.device, self.provider = rank, world_size, device, provider
        self.data = replace(cfg.data, shards=cfg.linear.val_shards, recipe="linear_eval", shuffle=False,
                            drop_remainder=False)

    def evaluate(self, module):
        return {"val_top1": classifier_top1(module, self.data, rank=self.rank, world_size=self.world_size,
                                            device=self.device, provider=self.provider)}

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


class SegmentationValidation(Validation):
    """Dataset-level mIoU, pixel accuracy and per-class IoU on ``segmentation.val_shards``: each image as
    stored, resized and windowed as the recipe evaluates (``cast.eval.dense.predict_logits``), confusion
    matrices summed over ranks. The last epoch's figures go to ``<run>/segmentation.json``."""

    def __init__(self, cfg: TrainConfig, *, rank: int, world_size: int, device: torch.device, provider):
        self.cfg, self.rank, self.world_size = cfg, rank, world_size
        self.device, self.provider = device, provider
        seg = cfg.segmentation
        self.data = replace(cfg.data, shards=seg.val_shards, recipe="segmentation_eval", batch_size=1,
                            shuffle=False, drop_remainder=False, superpixels="")
        self.classes = read_manifest(seg.val_shards).classes or [str(i) for i in range(seg.num_classes)]
        if len(self.classes) != seg.num_classes:
            raise ValueError(f"segmentation.val_shards: {seg.val_shards} names {len(self.classes)} classes, "
                             f"segmentation.num_classes is {seg.num_classes}")
        self.result: dict = {}

    @torch.no_grad()
    def evaluate(self, module):
        module.eval()
        seg = self.cfg.segmentation
        meter = SegmentationMeter(seg.num_classes, seg.ignore_index)
        loader = build_loader(self.data, rank=self.rank, world_size=self.world_size, epoch=0)
        for index, batch in enumerate(loader):
            if seg.val_max_images and index >= seg.val_max_images:
                break
            batch = to_device(batch, self.device, with_superpixels=False)
            logits = predict_logits(module, batch["images"][:, 0], self.provider,
                                    size=seg.eval_size or self.cfg.data.image_size, resize=seg.eval_resize,
                                    window=seg.window, stride=seg.stride, num_classes=seg.num_classes)
            meter.update(logits[0].argmax(0), batch["mask"][0])
        confusion = all_reduce_sum(torch.from_numpy(meter.confusion).to(self.device))
        meter.confusion = confusion.cpu().numpy().astype(np.int64)
        self.result = meter.result(self.classes)
        return {"val_miou": self.result["miou"] * 100.0,
                "val_pixel_acc": self.result["pixel_accuracy"] * 100.0}

    def finish(self, metrics):
        if self.rank == 0:
            seg = self.cfg.segmentation
            result = {**self.result, "val_shards": seg.val_shards, "window": seg.window, "stride": seg.stride}
            url = write_report(result, join(self.cfg.run_folder(), "segmentation.json"))
            print(f"[cast-train] val mIoU {metrics['val_miou']:.2f}: {url}", flush=True)


BEST_FOLDER = "best"


class BestCheckpoint:
    """The checkpoint of the epoch with the best ``checkpoint.best_metric`` (max or min), in
    ``<run>/best`` (state.pt, config.yaml, best.json, then ``_COMPLETE``), for any recipe whose
    validation reports that metric. The best value so far lives in the run's state (``state_dict``), so a
    restarted run keeps comparing against it."""

    def __init__(self, cfg: TrainConfig):
        self.metric, self.mode = cfg.checkpoint.best_metric, cfg.checkpoint.best_mode
        self.url = join(cfg.run_folder(), BEST_FOLDER)
        self.policy = cfg.checkpoint.retry  # the storage policy of every other checkpoint write
        self.value: float | None = None

    def improved(self, metrics: dict) -> bool:
        if self.metric not in metrics:
            raise KeyError(f"checkpoint.best_metric: {self.metric!r} is not among the validation metrics "
                           f"{sorted(metrics)}")
        value = float(metrics[self.metric])
        if math.isnan(value):
            return False
        better = self.value is None or (value > self.value if self.mode == "max" else value < self.value)
        if better:
            self.value = value
        return better

    def publish(self, local_folder: str, metrics: dict, step: int, epoch: int) -> str:
        """Copy a local checkpoint folder (before it is reported) to ``<run>/best``, replacing the old one;
        transient storage errors are retried as for every checkpoint, ``_COMPLETE`` comes last."""
        fs, path = fsspec.core.url_to_fs(self.url)

        def replace_folder() -> None:
            if fs.exists(path):
                fs.rm(path, recursive=True)
            fs.put(local_folder.rstrip("/") + "/", path, recursive=True)

        retry(replace_folder, self.url, self.policy, key="ray.storage_path", what="best copy")
        record = {"metric": self.metric, "value": self.value, "step": step, "epoch": epoch,
                  "metrics": {k: v for k, v in metrics.items() if isinstance(v, int | float)}}
        write_report(record, join(self.url, "best.json"), self.policy)
        write_text(join(self.url, COMPLETE_MARKER), "ok\n", self.policy)
        return self.url

    def state_dict(self) -> dict:
        return {"best_value": self.value}

    def load_state_dict(self, state: dict) -> None:
        self.value = state.get("best_value")


class KnnValidation(Validation):
    """kNN top-1 (``knn_top1``, %) of the encoder's embeddings: ``knn.query_shards`` against the memory
    of ``knn.bank_shards``. Each rank embeds its share of both, every rank gathers all of them (small
    held-out sets) and scores them alike, so the reported figure needs no further reduction."""

    def __init__(self, cfg: TrainConfig, *, rank: int, world_size: int, device: torch.device, provider):
        self.cfg, self.rank, self.world_size = cfg, rank, world_size
        self.device, self.provider = device, provider

    def due(self, epochs_done):
        return epochs_done % self.cfg.knn.every_epochs == 0 or epochs_done == self.cfg.total_epochs

    def _features(self, encoder: nn.Module, shards: str):
        data = replace(self.cfg.data, shards=shards, recipe="eval", shuffle=False, drop_remainder=False)
        loader = build_loader(data, rank=self.rank, world_size=self.world_size, epoch=0,
                              provider=self.provider)
        local = extract_features(encoder, loader, device=self.device, provider=self.provider, progress=False)
        parts = gather_objects((local.embeddings, local.labels))
        return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])

    @torch.no_grad()
    def evaluate(self, module):
        encoder = getattr(module, "base_encoder", module)  # MoCo: the query encoder, as evaluation does
        bank, bank_labels = self._features(encoder, self.cfg.knn.bank_shards)
        queries, labels = self._features(encoder, self.cfg.knn.query_shards)
        classes = int(max(bank_labels.max(), labels.max())) + 1
        result = knn_accuracy(bank, bank_labels, queries, labels, classes, k=self.cfg.knn.k,
                              temperature=self.cfg.knn.temperature)
        return {"knn_top1": result["top1"]}


class SupervisedValidation(Validation):
    """DeiT: top-1 on ``supervised.val_shards`` every ``supervised.val_every_epochs`` epochs and after the
    last, of the trained weights (``val_top1``) and, with a model EMA, of the EMA beside them
    (``val_top1_ema``)."""

    def __init__(self, cfg: TrainConfig, objective, *, rank: int, world_size: int, device: torch.device,
                 provider):
        self.cfg, self.objective = cfg, objective
        self.context = {"rank": rank, "world_size": world_size, "device": device, "provider": provider}
        self.data = replace(cfg.data, shards=cfg.supervised.val_shards, recipe="eval", shuffle=False,
                            drop_remainder=False)

    def due(self, epochs_done):
        return epochs_done % self.cfg.supervised.val_every_epochs == 0 or epochs_done == self.cfg.total_epochs

    def evaluate(self, module):
        metrics = {"val_top1": classifier_top1(module, self.data, **self.context)}
        if self.objective.ema is not None:
            metrics["val_top1_ema"] = classifier_top1(self.objective.ema.module, self.data, **self.context)
        return metrics


def build_validation(cfg: TrainConfig, objective, **context) -> Validation | None:
    if cfg.objective == "linear" and cfg.linear.val_shards:
        return LinearProbeValidation(cfg, objective.pretrained, **context)
    if cfg.objective == "segmentation" and cfg.segmentation.val_shards:
        return SegmentationValidation(cfg, **context)
    if cfg.objective == "supervised" and cfg.supervised.val_shards:
        return SupervisedValidation(cfg, objective, **context)
    if cfg.knn.bank_shards:
        return KnnValidation(cfg, **context)
    return None
