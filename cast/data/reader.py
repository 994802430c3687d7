"""The per-rank streaming loader: shards -> shuffled samples -> views + superpixels -> batches.

Splitting and the remainder rule (why: DDP deadlocks when ranks disagree on the batch count):
- N samples over W ranks with B samples per batch: **every rank yields floor(N / (W*B)) batches**.
- Each epoch the shard list is shuffled by (seed, epoch) and dealt to the W*P readers (P DataLoader
  workers per rank, reader = rank*P + worker), each shard to the reader holding the fewest samples
  so far, so readers get near-equal counts. Reader r of a rank yields its share of the rank's
  batches (the rank's batches are dealt round-robin to its workers, as DataLoader interleaves them).
- A reader whose shards hold more samples than its quota drops the rest (different ones each epoch,
  since the shuffle changes); a reader whose shards run short (uneven shards, skipped corrupt
  samples) wraps around to its own first samples. With equal shards and N divisible by W*B every
  sample appears exactly once per epoch.
- Fewer shards than W*P readers is an error (a reader with no shard would have nothing to give).
- ``drop_remainder=False`` (evaluation) reads each reader's shards once instead: every sample exactly
  once, the last batch of a reader may be short, and batch counts may differ between ranks.

Batches follow the contract (``images`` [B,V,3,H,W] float32, ``superpixels`` [B,V,H,W] int64 for
CPU providers, ``label`` [B], ``mask`` [B,H,W] for segmentation, ``key``) plus ``stats``: the
skip counters this batch's worker gathered since its previous batch, and ``skipped``: their
messages (shard URL, sample key, reason), which the loader logs in the main process and sums
into ``loader.counters``.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from cast.data.config import DataConfig
from cast.data.samples import LABEL_KEY, MASK_KEY, decode_image, decode_label, decode_mask, image_key
from cast.data.shards import Counters, Manifest, Shard, iter_shards, list_shards
from cast.data.transforms import Recipe, build_recipe

log = logging.getLogger(__name__)


def assign_shards(
    shards: list[Shard], num_readers: int, seed: int, epoch: int, shuffle: bool = True
) -> list[list[Shard]]:
    """Deal shards to readers: shuffled by (seed, epoch), each to the reader with the fewest samples."""
    if len(shards) < num_readers:
        raise ValueError(
            f"{len(shards)} shards cannot feed {num_readers} readers (world_size x num_workers); "
            f"build at least {num_readers} shards (smaller --max-count) or use fewer workers"
        )
    order = list(shards)
    if shuffle:
        random.Random(f"shards|{seed}|{epoch}").shuffle(order)
    readers: list[list[Shard]] = [[] for _ in range(num_readers)]
    loads = [0] * num_readers
    for shard in order:
        target = min(range(num_readers), key=lambda r: (loads[r], r))
        readers[target].append(shard)
        loads[target] += shard.num_samples
    return readers


def batches_per_rank(num_samples: int, world_size: int, batch_size: int) -> int:
    return num_samples // (world_size * batch_size)


def worker_batches(total: int, num_workers: int, role: int) -> int:
    """Batches of worker ``role`` when ``total`` batches are dealt round-robin to ``num_workers``."""
    return total // num_workers + (1 if role < total % num_workers else 0)


class ShardStream(IterableDataset):
    """One rank's samples; each DataLoader worker plays one reader and yields whole batches."""

    def __init__(
        self,
        cfg: DataConfig,
        shard_set: Manifest,
        *,
        rank: int,
        world_size: int,
        epoch: int,
        provider=None,
        start_batch: int = 0,
    ):
        self.cfg = cfg
        self.rank, self.world_size, self.epoch = rank, world_size, epoch
        self.provider = provider
        self.labelled = bool(shard_set.classes)
        self.num_workers = max(1, cfg.num_workers)
        self.readers = assign_shards(
            shard_set.shards, world_size * self.num_workers, cfg.seed, epoch, cfg.shuffle
        )
        if cfg.drop_remainder:
            self.total = batches_per_rank(shard_set.num_samples, world_size, cfg.batch_size)
        else:
            own = self.readers[rank * self.num_workers : (rank + 1) * self.num_workers]
            self.total = sum(-(-sum(s.num_samples for s in shards) // cfg.batch_size) for shards in own)
        if self.total == 0:
            raise ValueError(
                f"{shard_set.num_samples} samples give no batch of {cfg.batch_size} on each of "
                f"{world_size} ranks; lower data.batch_size"
            )
        self.start_batch = min(start_batch, self.total)
        self.recipe: Recipe | None = None

    def __len__(self) -> int:
        return self.total - self.start_batch

    def _role(self) -> int:
        """Worker ids are rotated by ``start_batch`` so that DataLoader's worker 0 holds the next batch."""
        info = get_worker_info()
        worker = info.id if info is not None else 0
        return (worker + self.start_batch) % self.num_workers

    def __iter__(self) -> Iterator[dict]:
        role = self._role()
        reader = self.rank * self.num_workers + role
        shards = self.readers[reader]
        own = worker_batches(self.total, self.num_workers, role)
        skipped = len(
            range(role, self.start_batch, self.num_workers)
        )  # this role's batches before start_batch
        if self.recipe is None:
            self.recipe = build_recipe(self.cfg.recipe, self.cfg.image_size)
        rng = random.Random(f"samples|{self.cfg.seed}|{self.epoch}|{reader}")
        torch.manual_seed(rng.getrandbits(62))
        random.seed(rng.getrandbits(62))
        np.random.seed(rng.getrandbits(32))
        counters = Counters()
        self._reported: set[str] = set()
        samples = self._raw_samples(shards, rng, counters, once=not self.cfg.drop_remainder)
        if not self.cfg.drop_remainder:
            yield from self._single_pass(samples, counters)
            return
        for _ in range(skipped * self.cfg.batch_size):  # resume: skip raw bytes, no decode
            next(samples)
        for _ in range(own - skipped):
            batch = []
            while len(batch) < self.cfg.batch_size:
                decoded = self._decode(next(samples), counters)
                if decoded is not None:
                    batch.append(decoded)
            yield self._finish_batch(batch, counters)

    def _finish_batch(self, batch: list[dict], counters: Counters) -> dict:
        """Collate, attaching the skip counters gathered since the previous batch."""
        out = self._collate(batch)
        out["stats"] = dict(counters)
        out["skipped"] = list(counters.messages)
        counters.clear()
        return out

    def _single_pass(self, samples: Iterator[dict], counters: Counters) -> Iterator[dict]:
        """Every sample of this reader's shards once (the first round), in batches; the last may be short."""
        batch: list[dict] = []
        for sample in samples:
            decoded = self._decode(sample, counters)
            if decoded is not None:
                batch.append(decoded)
            if len(batch) == self.cfg.batch_size:
                yield self._finish_batch(batch, counters)
                batch = []
        if batch:
            yield self._finish_batch(batch, counters)

    def _raw_samples(
        self, shards: list[Shard], rng: random.Random, counters: Counters, once: bool = False
    ) -> Iterator[dict]:
        """Stream over this reader's shards (remote ones fetched ahead) through a shuffle buffer,
        endless unless ``once``."""
        buffer_size = self.cfg.shuffle_buffer if self.cfg.shuffle else 0
        round_index = 0
        while True:
            produced = 0
            buffer: list[dict] = []
            first = round_index == 0  # damage is counted and logged on the first pass only
            tally = counters if first else Counters()
            urls = [shard.url for shard in shards]
            samples = iter_shards(
                urls, tally, report=first, prefetch=self.cfg.prefetch_shards, policy=self.cfg.retry
            )
            for sample in samples:
                if not self._complete(sample, tally, report=first):
                    continue
                produced += 1
                if buffer_size > 1:
                    buffer.append(sample)
                    if len(buffer) >= buffer_size:
                        index = rng.randrange(len(buffer))
                        buffer[index], buffer[-1] = buffer[-1], buffer[index]
                        yield buffer.pop()
                else:
                    yield sample
            rng.shuffle(buffer)
            yield from buffer
            if once:
                return
            if produced == 0:
                raise RuntimeError(
                    f"rank {self.rank} reader {self.rank * self.num_workers + self._role()}: no usable "
                    f"sample in {[s.url for s in shards]} (skips so far: {dict(counters)})"
                )
            round_index += 1
            if round_index == 1:
                log.info("rank %d: reader ran short of samples, wrapping around its shards", self.rank)

    def _complete(self, sample: dict, counters: Counters, report: bool = True) -> bool:
        missing = []
        if image_key(sample) is None:
            missing.append("image")
        if self.labelled and not self.recipe.needs_mask and LABEL_KEY not in sample:
            missing.append(LABEL_KEY)
        if self.recipe.needs_mask and MASK_KEY not in sample:
            missing.append(MASK_KEY)
        if missing:
            message = f"{sample['__url__']}: sample {sample['__key__']} lacks {', '.join(missing)}; skipped"
            counters.record("missing_key", message if report else None)
            return False
        return True

    def _decode(self, sample: dict, counters: Counters) -> dict | None:
        try:
            key, ext = sample["__key__"], image_key(sample)
            image = decode_image(sample[ext], f"{key}.{ext}")
            mask = None
            if self.recipe.needs_mask:
                mask = decode_mask(sample[MASK_KEY], f"{key}.{MASK_KEY}")
            label = decode_label(sample)
        except Exception as error:  # noqa: BLE001 - any undecodable sample is skipped and counted
            if sample["__key__"] in self._reported:  # seen on an earlier pass of a wrapped-around reader
                return None
            self._reported.add(sample["__key__"])
            counters.record(
                "corrupt_image",
                f"{sample['__url__']}: sample {sample['__key__']} undecodable "
                f"({type(error).__name__}: {error}); skipped",
            )
            return None
        views, mask_t = self.recipe.augment(image, mask)
        out = {
            "images": torch.stack([self.recipe.finish(view) for view in views]),
            "label": label,
            "key": sample["__key__"],
        }
        if self.provider is not None and not self.provider.on_device:
            out["superpixels"] = torch.stack(
                [torch.from_numpy(np.asarray(self.provider(view), dtype=np.int64)) for view in views]
            )
        if mask_t is not None:
            out["mask"] = mask_t
        return out

    @staticmethod
    def _collate(batch: list[dict]) -> dict:
        out = {
            "images": torch.stack([b["images"] for b in batch]),
            "label": torch.tensor([b["label"] for b in batch], dtype=torch.int64),
            "key": [b["key"] for b in batch],
        }
        for name in ("superpixels", "mask"):
            if name in batch[0]:
                out[name] = torch.stack([b[name] for b in batch])
        return out


class ShardLoader:
    """A DataLoader over one rank's ``ShardStream`` with a known length and accumulated skip counters."""

    def __init__(self, stream: ShardStream, cfg: DataConfig):
        self.stream = stream
        self.counters = Counters()
        kwargs = {"num_workers": cfg.num_workers, "batch_size": None, "pin_memory": False}
        if cfg.num_workers > 0:
            kwargs.update(prefetch_factor=cfg.prefetch_factor, persistent_workers=False)
        self.loader = DataLoader(stream, **kwargs)

    def __len__(self) -> int:
        return len(self.stream)

    def __iter__(self) -> Iterator[dict]:
        for batch in self.loader:
            self.counters.update(batch["stats"])
            for message in batch["skipped"]:
                log.warning(message)
            yield batch


def build_loader(
    cfg: DataConfig, *, rank: int, world_size: int, epoch: int, provider=None, start_batch: int = 0
) -> ShardLoader:
    """The loader for ``rank`` of ``world_size`` in ``epoch``; ``start_batch`` resumes mid-epoch."""
    cfg.validate()
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} outside world_size {world_size}")
    if provider is None:
        provider = cfg.provider()
    stream = ShardStream(
        cfg,
        list_shards(cfg.shards, cfg.retry),
        rank=rank,
        world_size=world_size,
        epoch=epoch,
        provider=provider,
        start_batch=start_batch,
    )
    return ShardLoader(stream, cfg)
