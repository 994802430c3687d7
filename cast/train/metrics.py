"""Training metrics: a window of sums between two reports, and where the figures go.

Every report carries loss, lr, images/s and the share of time spent waiting for data (summed over all
workers), the position, and the loader's skip counters summed over ranks. ``Reporter.publish`` writes
them to TensorBoard (rank 0) and hands them, with a checkpoint when there is one, to
``ray.train.report``: the one place a worker reports.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import time
from collections import Counter

import torch

from cast.storage import RetryPolicy, StorageError, is_url, join, retry
from cast.train.distributed import all_reduce_sum, gather_objects

log = logging.getLogger(__name__)


class MetricsWindow:
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

    def add(self, loss: torch.Tensor, images: int, correct: torch.Tensor | None) -> None:
        """Device tensors are summed on the device; the host reads them once, in ``summary``."""
        self.loss_sum = loss.float() if self.loss_sum is None else self.loss_sum + loss.float()
        self.batches += 1
        self.images += images
        if correct is not None:  # None: the objective has no labels to score
            self.classify = True
            self.correct = correct + self.correct

    def summary(self, device: torch.device) -> dict:
        """Loss, lr, throughput and data wait over all workers (a collective: every rank calls it)."""
        elapsed = max(time.perf_counter() - self.start, 1e-9)
        loss = float(self.loss_sum) if self.loss_sum is not None else 0.0
        totals = all_reduce_sum(
            torch.tensor([loss, self.batches, self.images, float(self.correct)], dtype=torch.float64,
                         device=device)
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


def summed_counters(counters: Counter) -> dict:
    """Skip counters of all ranks, summed (every rank takes part; keys may differ between ranks)."""
    merged: Counter = Counter()
    for part in gather_objects(dict(counters)):
        merged.update(part)
    return dict(merged)


class Reporter:
    """Metrics to TensorBoard (rank 0, under ``<run>/tensorboard``) and to Ray Train.

    On object storage the event files are written locally and copied up at every checkpoint and at the end,
    under the storage policy; a sync that still fails warns and is tried again at the next one (the
    files are copied whole each time), it never ends the run.
    """

    def __init__(self, run_folder: str, *, rank: int, device: torch.device, tensorboard: bool,
                 retry: RetryPolicy | None = None):
        self.device = device
        self.retry = retry
        self.writer = None
        self.remote = None
        if rank == 0 and tensorboard:
            from tensorboardX import SummaryWriter

            if is_url(run_folder):
                self.remote = join(run_folder, "tensorboard")
                self.writer = SummaryWriter(tempfile.mkdtemp(prefix="cast-tb-"))
            else:
                self.writer = SummaryWriter(os.path.join(run_folder, "tensorboard"))

    def collect(self, window: MetricsWindow, counters: Counter, extra: dict) -> dict:
        """The metrics of one report (a collective: every rank calls it)."""
        metrics = {**window.summary(self.device), **extra}
        metrics.update({f"skipped_{k}": v for k, v in summed_counters(counters).items()})
        return metrics

    def publish(self, metrics: dict, step: int, checkpoint_folder: str | None = None,
                checkpoint_name: str = "", upload_fn=None) -> None:
        """Log ``metrics`` and report them to Ray with the checkpoint in ``checkpoint_folder`` (a local
        folder, removed once Ray has it uploaded)."""
        import ray.train

        if self.writer is not None:
            for key, value in metrics.items():
                self.writer.add_scalar(f"train/{key}", value, step)
            self.writer.flush()
        if checkpoint_folder is None:
            ray.train.report(metrics)
            return
        self.sync()
        try:
            ray.train.report(
                metrics,
                checkpoint=ray.train.Checkpoint.from_directory(checkpoint_folder),
                checkpoint_dir_name=checkpoint_name,
                checkpoint_upload_fn=upload_fn,
            )
        finally:
            shutil.rmtree(checkpoint_folder, ignore_errors=True)

    def sync(self) -> bool:
        """Copy local TensorBoard files to the run folder on object storage; False when that failed."""
        if self.writer is None or self.remote is None:
            return True
        import fsspec

        self.writer.flush()
        fs, path = fsspec.core.url_to_fs(self.remote)
        local = self.writer.logdir.rstrip("/") + "/"
        try:
            retry(lambda: fs.put(local, path, recursive=True), self.remote, self.retry,
                  key="ray.storage_path", what="TensorBoard sync")
        except StorageError as error:
            log.warning("%s; the run goes on, the next sync tries again", error)
            return False
        return True

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            if self.sync() and self.remote is not None:  # else the events stay, named in the warning
                shutil.rmtree(self.writer.logdir, ignore_errors=True)
