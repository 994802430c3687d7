"""Evaluation batches from shards, through the data package's loader (eval recipe, one view, no shuffle,
every sample exactly once)."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from cast.data import DataConfig, ShardSetError, build_loader, read_manifest
from cast.superpixels import SuperpixelProvider


@dataclass
class ShardBatches:
    """``batches(url)`` and ``class_names(url)`` for ``cast.eval.evaluate``."""

    size: int
    batch_size: int
    workers: int
    provider: SuperpixelProvider

    def class_names(self, url: str) -> list[str]:
        manifest = read_manifest(url)
        if not manifest.classes:
            raise ShardSetError(
                f"{manifest.url}: 'classes' is empty or missing; evaluation needs labelled shards"
            )
        return manifest.classes

    def batches(self, url: str) -> Iterable[dict]:
        config = DataConfig(shards=url, recipe="eval", image_size=self.size, batch_size=self.batch_size,
                            num_workers=self.workers, shuffle=False, drop_remainder=False, superpixels="")
        return build_loader(config, rank=0, world_size=1, epoch=0, provider=self.provider)
