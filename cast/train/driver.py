"""The driver side of a job: one ``TorchTrainer`` per run, configured from a validated ``TrainConfig``.

Re-running with the same ``ray.storage_path`` and ``ray.name`` continues that run from its newest
checkpoint (Ray Train V2 restores by (storage_path, name)).
"""

from __future__ import annotations

import logging
import time

from ray.train import UserCallback

from cast.artifacts import CONFIG_FILE, latest_checkpoint
from cast.config import ConfigError, dump_config
from cast.eval.model_loading import checkpoint_location
from cast.storage import join, ray_storage, write_text
from cast.train.config import TrainConfig

log = logging.getLogger(__name__)


def default_run_name(cfg: TrainConfig) -> str:
    return f"{cfg.objective}-{cfg.model.name}-{time.strftime('%Y%m%d-%H%M%S')}"


def resolve(cfg: TrainConfig) -> TrainConfig:
    """Validate (incl. that named checkpoints exist) and fix the run name, before any worker starts."""
    cfg.validate()
    probe = cfg.linear.pretrained if cfg.objective == "linear" else ""
    dense = cfg.segmentation.pretrained if cfg.objective == "segmentation" else ""
    for key, location, find in (
        ("linear.pretrained", probe, checkpoint_location),  # a released .pth.tar file too
        ("segmentation.pretrained", dense, checkpoint_location),
        ("checkpoint.resume_from", cfg.checkpoint.resume_from, latest_checkpoint),
    ):
        if location:
            try:
                find(location)
            except (FileNotFoundError, OSError) as e:
                raise ConfigError(f"{key}: {e}") from e
    if not cfg.ray.name:
        cfg.ray.name = default_run_name(cfg)
    return cfg


def save_resolved_config(cfg: TrainConfig) -> str:
    """``<storage_path>/<name>/config.yaml``: the exact config this run trains with."""
    return write_text(join(cfg.run_folder(), CONFIG_FILE), dump_config(cfg))


def build_trainer(cfg: TrainConfig, callbacks: list | None = None):
    """The ``TorchTrainer`` of this job (Train V2 API)."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from cast.train.loop import train_loop_per_worker

    backend = cfg.ray.backend or ("nccl" if cfg.ray.use_gpu else "gloo")
    resources = dict(cfg.ray.resources_per_worker) or None
    low, high = cfg.worker_range
    elastic = {"elastic_resize_monitor_interval_s": cfg.ray.resize_interval_s} if low < high else {}
    # Ray's own storage writes under the checkpoint policy too (see cast.storage.ray_storage)
    storage_path, storage_filesystem = ray_storage(cfg.resolved_storage_path(), cfg.checkpoint.retry)
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"config": cfg},
        scaling_config=ScalingConfig(
            num_workers=(low, high) if low < high else high,
            use_gpu=cfg.ray.use_gpu,
            resources_per_worker=resources,
            **elastic,
        ),
        torch_config=TorchConfig(backend=backend),
        run_config=RunConfig(
            name=cfg.ray.name,
            storage_path=storage_path,
            storage_filesystem=storage_filesystem,
            failure_config=FailureConfig(max_failures=cfg.ray.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=cfg.checkpoint.keep),
            callbacks=[ProgressLine(), *(callbacks or [])],
        ),
    )


def fit(cfg: TrainConfig):
    """Validate, save the resolved config beside the run, train; returns Ray's ``Result``."""
    resolve(cfg)
    url = save_resolved_config(cfg)
    log.info("run %s: resolved config at %s", cfg.ray.name, url)
    return build_trainer(cfg).fit()


class ProgressLine(UserCallback):
    """One line per report on the Ray Train controller, whose output Ray streams to the driver."""

    def after_report(self, run_context, metrics, checkpoint):
        head = metrics[0] if metrics else {}
        parts = [f"epoch {head.get('epoch_progress', 0):.2f}", f"step {head.get('step', 0)}"]
        for key, fmt in (
            ("loss", ".4f"),
            ("lr", ".3g"),
            ("images_per_s", ".1f"),
            ("data_wait_frac", ".2f"),
            ("train_top1", ".1f"),
            ("val_top1", ".2f"),
            ("val_miou", ".2f"),
            ("val_top1_ema", ".2f"),
            ("knn_top1", ".2f"),
        ):
            if key in head:
                parts.append(f"{key} {head[key]:{fmt}}")
        skipped = sum(v for k, v in head.items() if k.startswith("skipped_"))
        parts.append(f"skipped {skipped}")
        if checkpoint is not None:
            parts.append(f"checkpoint {checkpoint.path}")
        print("[cast-train] " + " | ".join(parts), flush=True)
