"""Typed configuration of the per-rank data loader (composed into job configs)."""

from __future__ import annotations

from dataclasses import dataclass, field

from cast.storage import RetryPolicy


@dataclass
class DataConfig:
    shards: str = ""  # folder/URL with _info.json, or a brace pattern of .tar URLs
    recipe: str = "moco"  # moco | supervised | eval | linear | linear_eval | segmentation
    image_size: int = 224
    batch_size: int = 64  # per rank
    num_workers: int = 4  # DataLoader worker processes per rank (0 = in the main process)
    shuffle_buffer: int = 1000  # samples held per reader for the sample shuffle (0/1 = off)
    shuffle: bool = True  # shuffle shards and samples (False keeps shard order, for eval)
    seed: int = 0
    superpixels: str = "seeds_fast"  # provider name for cast.superpixels.get_provider ("" = none)
    superpixel_params: dict = field(default_factory=dict)
    # token budget per view (the model's num_tokens, static shapes): maps with more segments have their
    # smallest merged into a neighbour (0 = no budget, the batch's largest label sets the token count)
    max_superpixels: int = 0
    # views with fewer segments are skipped and counted (training raises it to the first pooling's
    # cluster count): an empty or flat image cannot be pooled
    min_superpixels: int = 0
    prefetch_factor: int = 2
    # remote shards fetched whole, this many ahead of the one parsed (0 = stream in 1 MiB reads);
    # each reader (DataLoader worker) holds up to prefetch_shards + 1 shards in memory
    prefetch_shards: int = 2
    # False: one pass, every sample exactly once, short last batches, ranks may differ in batch count.
    # For evaluation only: a DDP training step needs every rank to agree (see the remainder rule).
    drop_remainder: bool = True
    # transient storage errors of shard fetches and manifest reads are retried this long (cast.storage)
    retry: RetryPolicy = field(default_factory=RetryPolicy)
    # logical partitions of the shard list a training epoch is defined by (0 = one per shard); fixed for a
    # run, so that its epochs do not depend on the number of workers (see cast.data.reader)
    partitions: int = 0
    # repeated augmentation (DeiT's RASampler idea): each sample read this many times in a row, augmented
    # anew each time; an epoch keeps N images, so about N / repeats distinct ones (training only)
    repeats: int = 1

    def validate(self) -> None:
        """Fail early, naming the field, before any worker or cluster resource starts."""
        if not self.shards:
            raise ValueError("data.shards: empty; give a shard folder/URL with _info.json or a brace pattern")
        from cast.data.transforms import RECIPES  # the recipes themselves name the valid choices

        if self.recipe not in RECIPES:
            raise ValueError(f"data.recipe: {self.recipe!r}, expected one of {', '.join(RECIPES)}")
        for name in ("image_size", "batch_size", "repeats"):
            if getattr(self, name) < 1:
                raise ValueError(f"data.{name}: must be >= 1, got {getattr(self, name)}")
        for name in ("max_superpixels", "min_superpixels"):
            if getattr(self, name) < 0:
                raise ValueError(f"data.{name}: must be >= 0, got {getattr(self, name)}")
        if self.max_superpixels and self.min_superpixels > self.max_superpixels:
            raise ValueError(
                f"data.min_superpixels ({self.min_superpixels}) exceeds data.max_superpixels "
                f"({self.max_superpixels})"
            )
        if self.num_workers < 0 or self.shuffle_buffer < 0 or self.prefetch_shards < 0 or self.partitions < 0:
            raise ValueError(
                "data.num_workers, data.shuffle_buffer, data.prefetch_shards and data.partitions must be >= 0"
            )
        self.retry.validate("data.retry")

    def provider(self):
        """The superpixel provider ``superpixels`` names (None for "" / "none")."""
        if not self.superpixels or self.superpixels == "none":
            return None
        from cast.superpixels import get_provider

        return get_provider(self.superpixels, **self.superpixel_params)

    @property
    def num_views(self) -> int:
        return 2 if self.recipe == "moco" else 1
