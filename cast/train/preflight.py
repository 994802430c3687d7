"""Checks a training job makes in the driver before ``ray.init``: what would otherwise fail on the
workers, after a cluster was claimed and three worker-group attempts were spent, fails here in
seconds with the config key named (``ConfigError``; the job exits 2).

- the model: built on the ``meta`` device (no memory, no weights), as the objective builds it; a
  failure names the ``model.kwargs`` key at fault (unknown or ill-typed keys of a CAST variant are
  already named by ``TrainConfig.validate``);
- the superpixel provider the model needs;
- the shards (``data.shards``, ``linear.val_shards``, ``segmentation.val_shards``, ``knn.*``): the
  manifest reads, every shard it lists exists (one listing per folder, not one request per shard);
- the global batch (``data.batch_size`` x workers x accumulation) against the data set size;
- the manifest's classes against ``<objective>.num_classes``;
- ``ray.storage_path`` writable: a tiny probe object, removed again.

Storage calls use the run's retry policy with a short deadline (``PREFLIGHT_DEADLINE_S``): an
unreachable store fails the preflight quickly instead of retrying for minutes.
"""

from __future__ import annotations

import dataclasses
import posixpath
import re
import uuid

import fsspec

from cast.config import ConfigError
from cast.data.reader import epoch_samples
from cast.data.shards import Manifest, ShardSetError, list_shards
from cast.storage import RetryPolicy, StorageError, join, retry, write_bytes
from cast.train.config import TrainConfig

PREFLIGHT_DEADLINE_S = 10.0
PROBE_PREFIX = ".cast-preflight-"


def run_preflight(cfg: TrainConfig) -> list[str]:
    """Every check above; returns one line per check passed, raises ``ConfigError`` at the first failure."""
    done = [check_model(cfg), check_superpixels(cfg)]
    data_policy = _short(cfg.data.retry)
    manifest = check_shards(cfg.data.shards, "data.shards", data_policy)
    done.append(f"data.shards: {manifest.num_shards} shards, {manifest.num_samples} samples")
    done.append(check_batches(cfg, manifest))
    done.append(check_classes(cfg, manifest))
    for key, url in (("linear.val_shards", cfg.linear.val_shards if cfg.objective == "linear" else ""),
                     ("segmentation.val_shards",
                      cfg.segmentation.val_shards if cfg.objective == "segmentation" else ""),
                     ("knn.bank_shards", cfg.knn.bank_shards), ("knn.query_shards", cfg.knn.query_shards)):
        if url:
            val = check_shards(url, key, data_policy)
            done.append(f"{key}: {val.num_shards} shards, {val.num_samples} samples")
    done.append(check_storage(cfg.resolved_storage_path(), _short(cfg.checkpoint.retry)))
    return [line for line in done if line]


def _short(policy: RetryPolicy) -> RetryPolicy:
    return dataclasses.replace(policy, deadline_s=min(policy.deadline_s, PREFLIGHT_DEADLINE_S))


def check_model(cfg: TrainConfig) -> str:
    """Build the job's model on the meta device; a failure names the ``model.kwargs`` key at fault."""
    import timm
    import torch

    kwargs = cfg.model_kwargs()  # option names and types were checked by TrainConfig.validate
    head = {"supervised": cfg.supervised.num_classes, "linear": cfg.linear.num_classes}.get(cfg.objective, 0)

    def build(options: dict) -> None:
        with torch.device("meta"):
            timm.create_model(cfg.model.name, num_classes=head, **options)

    try:
        build(kwargs)
    except Exception as error:  # noqa: BLE001 - any failure to build is a config error; find its key
        raise ConfigError(f"{_model_key(error, kwargs, build)}: {cfg.model.name} cannot be built "
                          f"({type(error).__name__}: {error})") from error
    return f"model: {cfg.model.name} builds with {kwargs or 'its defaults'}"


def _model_key(error: Exception, kwargs: dict, build) -> str:
    """The ``model.kwargs`` key a build failure comes from: named in the message, else the first key
    that fails on its own; ``model.kwargs`` when only their combination fails, ``model.name`` without any."""
    named = [key for key in kwargs if re.search(rf"\b{re.escape(key)}\b", str(error))]
    if named:
        return f"model.kwargs.{named[0]}"
    for key, value in kwargs.items():
        try:
            build({key: value})
        except Exception:  # noqa: BLE001
            return f"model.kwargs.{key}"
    return "model.kwargs" if kwargs else "model.name"


def check_superpixels(cfg: TrainConfig) -> str:
    """Every CAST objective feeds the model (images, superpixels): a provider must be named."""
    if cfg.data.provider() is None:
        raise ConfigError(
            f"data.superpixels: {cfg.data.superpixels!r} gives no superpixels, but {cfg.model.name} "
            "(every objective) takes them; name a provider, e.g. seeds_fast or slic_torch"
        )
    return f"data.superpixels: {cfg.data.superpixels}"


def check_shards(spec: str, key: str, policy: RetryPolicy) -> Manifest:
    """The shard set's manifest, every shard it lists checked to exist."""
    try:
        manifest = list_shards(spec, policy)
    except (ShardSetError, StorageError) as error:
        raise ConfigError(f"{key}: {error}") from error
    folders: dict[str, set[str]] = {}
    for shard in manifest.shards:
        folders.setdefault(posixpath.dirname(shard.url), set()).add(posixpath.basename(shard.url))
    missing = []
    for folder, names in folders.items():
        fs, path = fsspec.core.url_to_fs(folder)
        try:
            listing = retry(lambda: fs.ls(path, detail=False), folder, policy, key=key, what="listing")  # noqa: B023
            present = {posixpath.basename(p.rstrip("/")) for p in listing}
        except StorageError as error:
            if not isinstance(error.__cause__, FileNotFoundError):
                raise ConfigError(f"{key}: {error}") from error
            present = set()
        missing += sorted(f"{folder}/{name}" for name in names - present)
    if missing:
        shown = ", ".join(missing[:3]) + (f" and {len(missing) - 3} more" if len(missing) > 3 else "")
        raise ConfigError(
            f"{key}: {len(missing)} of {manifest.num_shards} shards listed in {manifest.url or spec} "
            f"do not exist: {shown}"
        )
    return manifest


def check_batches(cfg: TrainConfig, manifest: Manifest) -> str:
    """An epoch needs at least one optimizer step: one global batch of the data set's samples."""
    total = cfg.global_batch
    steps = epoch_samples(manifest.num_samples, total) // total
    if steps == 0:
        low, high = cfg.worker_range
        key, source = (("optim.global_batch", "") if cfg.optim.global_batch else (
            "data.batch_size", f" = data.batch_size {cfg.data.batch_size} x ray.num_workers {high} x "
            f"optim.grad_accum_steps {cfg.optim.grad_accum_steps}"))
        raise ConfigError(
            f"{key}: {manifest.num_samples} samples in data.shards give no optimizer step of "
            f"{total} images{source}; at most {manifest.num_samples} images per step fit"
        )
    cfg.batch_split(cfg.worker_range[0])  # the global batch splits over the smallest world too
    return f"optim.global_batch: {total} images, {steps} optimizer steps per epoch"


def check_classes(cfg: TrainConfig, manifest: Manifest) -> str:
    """A classifier's head must cover every class of the shards' manifest (MoCo has no labels; dense
    labels are checked against their classes when the shards are built)."""
    if cfg.objective not in ("supervised", "linear"):
        return ""
    key = f"{cfg.objective}.num_classes"
    num_classes = cfg.supervised.num_classes if cfg.objective == "supervised" else cfg.linear.num_classes
    if not manifest.classes:
        raise ConfigError(
            f"data.shards: {manifest.url or cfg.data.shards} has no classes (unlabelled shards); "
            f"objective {cfg.objective} needs labels"
        )
    if len(manifest.classes) > num_classes:
        raise ConfigError(
            f"{key}: {num_classes}, but data.shards has {len(manifest.classes)} classes "
            f"(labels 0..{len(manifest.classes) - 1}); set {key}={len(manifest.classes)}"
        )
    return f"{key}: {num_classes} >= {len(manifest.classes)} classes in data.shards"


def check_storage(storage_path: str, policy: RetryPolicy) -> str:
    """``ray.storage_path`` takes a write (a probe object, removed again)."""
    probe = join(storage_path, f"{PROBE_PREFIX}{uuid.uuid4().hex[:12]}")
    try:
        write_bytes(probe, b"ok\n", policy)
        fs, path = fsspec.core.url_to_fs(probe)
        retry(lambda: fs.rm(path), probe, policy, key="ray.storage_path", what="removal")
    except StorageError as error:
        raise ConfigError(f"ray.storage_path: {storage_path} is not writable ({error})") from error
    return f"ray.storage_path: {storage_path} writable"
