"""The per-rank streaming loader: shards -> shuffled samples -> views + superpixels -> batches.

Training epochs (``drop_remainder=True``) are defined independently of the number of workers, so
that a run resized mid-epoch (elastic Ray Train, a resume at another ``ray.num_workers``) finishes the
epoch on exactly the samples it has not consumed yet (the idea of MosaicML Streaming's canonical nodes):
- Each epoch the shard list is shuffled by (seed, epoch) and dealt to a fixed number of **logical
  partitions** (``data.partitions``, default one per shard), each shard to the partition holding the
  fewest samples. A partition's sample order is its own (shuffle buffer seeded by seed, epoch,
  partition), whatever reads it.
- **Remainder rule**: an epoch uses E = floor(N / G) * G of the N samples, G the global batch (images
  per optimizer step); the N - E left over are the last ones in partition order (different samples
  every epoch, since the shard deal changes). With N divisible by G every sample appears once.
- What is left of an epoch is a list of **segments** ``[partition, start, end)`` (indices into the
  partition's order); a checkpoint stores it (``Position.remaining``). A loader lays the segments end
  to end and cuts them into one stretch per reader (``rank x DataLoader worker``) of exactly the
  reader's share of the rank's batches (the rank's batches are dealt round-robin to its workers, as
  DataLoader interleaves them), so every rank yields the same number of batches and, after ``n``
  batches per rank, the consumed samples are known without asking the workers (``remaining``). A
  reader starting inside a partition reads and drops the partition's first samples (raw bytes, no
  decode).
- A reader whose stretch yields fewer samples than its share (corrupt or incomplete samples skipped)
  repeats its own first good samples; only then is an epoch not exact.
- Each partition's shards are checked against the manifest's counts by one reader (the one reading
  furthest into it; every reader in evaluation): a shard read to its end, or past its claim, that holds
  another count is logged (once per shard per process) and counted as ``manifest_count_mismatch``.
- ``drop_remainder=False`` (evaluation) reads each reader's shards once instead (shards dealt to
  readers directly; fewer shards than readers is an error there): every sample exactly once, the last
  batch of a reader may be short, and batch counts may differ between ranks.

Batches follow the contract (``images`` [B,V,3,H,W] uint8, normalised on the device by
``cast.data.batches.to_device``, or already normalised float32 for the supervised recipe;
``superpixels`` [B,V,H,W] int16 with a token budget, else int32, for CPU providers; ``label`` [B],
``mask`` [B,H,W] for segmentation, ``key``) plus ``stats``: the
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
from cast.data.shards import MISMATCH, Counters, Manifest, Shard, iter_shards, list_shards
from cast.data.transforms import Recipe, build_recipe
from cast.superpixels.base import merge_to_budget, relabel_contiguous

log = logging.getLogger(__name__)
_warned: set[str] = set()  # manifest mismatches already logged by this process (once per shard)


Segment = tuple[int, int, int]  # (partition, start, end): samples [start, end) of a partition's order


def assign_shards(
    shards: list[Shard], num_readers: int, seed: int, epoch: int, shuffle: bool = True,
    what: str = "readers (world_size x num_workers)",
) -> list[list[Shard]]:
    """Deal shards to readers (or partitions): shuffled by (seed, epoch), each to the one with the fewest
    samples."""
    if len(shards) < num_readers:
        raise ValueError(
            f"{len(shards)} shards cannot feed {num_readers} {what}; "
            f"build at least {num_readers} shards (smaller --max-count) or use fewer"
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


def worker_batches(total: int, num_workers: int, role: int) -> int:
    """Batches of worker ``role`` when ``total`` batches are dealt round-robin to ``num_workers``."""
    return total // num_workers + (1 if role < total % num_workers else 0)


def epoch_samples(num_samples: int, global_batch: int) -> int:
    """Samples an epoch trains on: whole global batches only (the remainder rule)."""
    return num_samples // global_batch * global_batch


def full_epoch(partitions: list[list[Shard]], global_batch: int, repeats: int = 1) -> list[Segment]:
    """The segments of a whole epoch: every partition from its start, the remainder cut from the end.
    With ``repeats`` r a partition's order holds each sample r times in a row and an epoch keeps N
    images, so about N / r distinct samples (repeated augmentation)."""
    sizes = [sum(s.num_samples for s in part) * repeats for part in partitions]
    keep = epoch_samples(sum(sizes) // repeats, global_batch)
    segments = []
    for index, size in enumerate(sizes):
        take = min(keep, size)
        keep -= take
        if take:
            segments.append((index, 0, take))
    return segments


def segment_samples(segments: list[Segment]) -> int:
    return sum(end - start for _, start, end in segments)


def reader_shares(batches: int, world_size: int, num_workers: int, batch_size: int,
                  rotation: int = 0) -> list[int]:
    """Samples each reader (rank-major: reader = rank * num_workers + role) yields in ``batches`` batches
    per rank; DataLoader worker ``w`` plays role ``(w + rotation) % num_workers``."""
    return [
        worker_batches(batches, num_workers, (role - rotation) % num_workers) * batch_size
        for _ in range(world_size)
        for role in range(num_workers)
    ]


def cut(segments: list[Segment], sizes: list[int]) -> list[list[Segment]]:
    """Lay ``segments`` end to end and cut consecutive stretches of ``sizes`` samples (the rest dropped)."""
    queue = list(segments)
    stretches = []
    for size in sizes:
        stretch = []
        while size > 0:
            partition, start, end = queue.pop(0)
            take = min(size, end - start)
            stretch.append((partition, start, start + take))
            size -= take
            if start + take < end:
                queue.insert(0, (partition, start + take, end))
        stretches.append(stretch)
    return stretches


def join(segments: list[Segment]) -> list[Segment]:
    """The same samples in the same order, consecutive touching segments of a partition joined."""
    out: list[Segment] = []
    for partition, start, end in segments:
        if out and out[-1][0] == partition and out[-1][2] == start:
            out[-1] = (partition, out[-1][1], end)
        elif end > start:
            out.append((partition, start, end))
    return out


def remaining_after(segments: list[Segment], world_size: int, num_workers: int, batch_size: int,
                    batches_done: int, rotation: int = 0) -> list[Segment]:
    """What is left of ``segments`` once every rank consumed ``batches_done`` batches of a loader that
    started from them (the deal is deterministic, so this needs no word from the workers), in reader
    order: a loader of the same layout rotated by ``batches_done`` continues every reader where it was."""
    total = segment_samples(segments) // (world_size * batch_size)
    stretches = cut(segments, reader_shares(total, world_size, num_workers, batch_size, rotation))
    done = reader_shares(batches_done, world_size, num_workers, batch_size, rotation)
    left: list[Segment] = []
    for stretch, used in zip(stretches, done, strict=True):
        (_, rest) = cut(stretch, [used, segment_samples(stretch) - used])
        left += rest
    return join(left)


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
        remaining: list[Segment] | None = None,
        global_batch: int = 0,
        rotation: int = 0,
    ):
        self.cfg = cfg
        self.rank, self.world_size, self.epoch = rank, world_size, epoch
        self.provider = provider
        self.labelled = bool(shard_set.classes)
        self.num_workers = max(1, cfg.num_workers)
        self.recipe: Recipe | None = None
        if not cfg.drop_remainder:
            self.readers = assign_shards(
                shard_set.shards, world_size * self.num_workers, cfg.seed, epoch, cfg.shuffle
            )
            own = self.readers[rank * self.num_workers : (rank + 1) * self.num_workers]
            self.total = sum(-(-sum(s.num_samples for s in shards) // cfg.batch_size) for shards in own)
            if self.total == 0:
                raise ValueError(f"{shard_set.num_samples} samples: nothing to read on rank {rank}")
            return
        per_step = world_size * cfg.batch_size
        global_batch = global_batch or per_step
        if global_batch % per_step:
            raise ValueError(
                f"global batch {global_batch} is not a whole number of batches of {cfg.batch_size} "
                f"on {world_size} ranks"
            )
        count = cfg.partitions or len(shard_set.shards)
        self.partitions = assign_shards(shard_set.shards, count, cfg.seed, epoch, cfg.shuffle,
                                        what="partitions (data.partitions)")
        if remaining is None:
            self.segments = full_epoch(self.partitions, global_batch, cfg.repeats)
            if not self.segments:
                raise ValueError(
                    f"{shard_set.num_samples} samples give no global batch of {global_batch} "
                    f"({cfg.batch_size} on each of {world_size} ranks); lower data.batch_size"
                )
        else:
            self.segments = join([tuple(int(v) for v in segment) for segment in remaining])
        left = segment_samples(self.segments)
        if left % per_step:
            raise ValueError(
                f"{left} samples left of epoch {epoch} are not whole batches of {cfg.batch_size} on "
                f"{world_size} ranks (the checkpoint was not taken at an optimizer step of this global batch)"
            )
        self.total = left // per_step
        self.rotation = rotation % self.num_workers
        shares = reader_shares(self.total, world_size, self.num_workers, cfg.batch_size, self.rotation)
        self.stretches = cut(self.segments, shares)
        # the reader reading furthest into a partition checks its shards' counts (one reader in all ranks)
        furthest: dict[int, tuple[int, int]] = {}
        for index, stretch in enumerate(self.stretches):
            for partition, _, end in stretch:
                if end > furthest.get(partition, (-1, 0))[0]:
                    furthest[partition] = (end, index)
        self.checkers = {partition: index for partition, (_, index) in furthest.items()}

    def __len__(self) -> int:
        return self.total

    def __iter__(self) -> Iterator[dict]:
        info = get_worker_info()
        worker = info.id if info is not None else 0
        reader = self.rank * self.num_workers + worker
        if self.recipe is None:
            self.recipe = build_recipe(self.cfg.recipe, self.cfg.image_size)
        counters = Counters()
        self._reported: set[str] = set()
        if not self.cfg.drop_remainder:
            rng = random.Random(f"samples|{self.cfg.seed}|{self.epoch}|{reader}")
            _seed_augmentation(rng)
            samples = self._raw_samples(self.readers[reader], rng, counters, check=True)
            yield from self._single_pass(samples, counters)
            return
        role = self.rank * self.num_workers + (worker + self.rotation) % self.num_workers
        stretch = self.stretches[role]
        if not stretch:
            return
        # augmentations differ per reader and per resume point; the sample order does not depend on them
        _seed_augmentation(random.Random(f"augment|{self.cfg.seed}|{self.epoch}|{reader}|{stretch[0]}"))
        samples = self._stretch_samples(stretch, counters, role)
        last, read = None, None
        count = worker_batches(self.total, self.num_workers, worker)
        for number in range(count):
            batch = []
            while len(batch) < self.cfg.batch_size:
                sample = next(samples)
                if sample is not last:  # a repeat (data.repeats) is decoded once, augmented anew
                    last, read = sample, self._read(sample, counters)
                augmented = self._augment(sample, counters, *read) if read is not None else None
                if augmented is not None:
                    batch.append(augmented)
            if number == count - 1:
                samples.close()  # a shard read past its claim is counted now, with the last batch
            yield self._finish_batch(batch, counters)

    def _stretch_samples(self, stretch: list[Segment], counters: Counters, reader: int) -> Iterator[dict]:
        """The raw samples of this reader's segments, in partition order; endless (a reader left short by
        skipped samples repeats its own); ``reader`` checks the shard counts of the partitions it owns."""
        passes = 0
        while True:
            produced = 0
            tally = counters if passes == 0 else Counters()  # damage is counted on the first pass only
            for partition, start, end in stretch:
                rng = random.Random(f"samples|{self.cfg.seed}|{self.epoch}|partition{partition}")
                check = passes == 0 and self.checkers.get(partition) == reader
                stream = self._raw_samples(self.partitions[partition], rng, tally, report=passes == 0,
                                           check=check)
                repeats = self.cfg.repeats
                try:
                    for distinct, sample in enumerate(stream):
                        if distinct * repeats >= end:
                            break
                        for index in range(distinct * repeats, (distinct + 1) * repeats):
                            if start <= index < end:  # before start: read and dropped raw, no decode
                                produced += 1
                                yield sample
                finally:
                    stream.close()  # now, not when collected: a shard read past its claim is counted
            if produced == 0:
                raise RuntimeError(
                    f"rank {self.rank}: no usable sample in partitions "
                    f"{sorted({p for p, _, _ in stretch})} (skips so far: {dict(counters)}); shards "
                    "holding fewer samples than their manifest claims do this: check them with "
                    "`python -m data_tools.verify_shards`"
                )
            passes += 1
            if passes == 1:
                log.info("rank %d: reader ran short of samples, repeating its own", self.rank)

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
            read = self._read(sample, counters)
            augmented = self._augment(sample, counters, *read) if read is not None else None
            if augmented is not None:
                batch.append(augmented)
            if len(batch) == self.cfg.batch_size:
                yield self._finish_batch(batch, counters)
                batch = []
        if batch:
            yield self._finish_batch(batch, counters)

    def _raw_samples(
        self, shards: list[Shard], rng: random.Random, counters: Counters, report: bool = True,
        check: bool = False,
    ) -> Iterator[dict]:
        """One pass over ``shards`` (remote ones fetched ahead) through a shuffle buffer (``rng``);
        ``check``: count each shard against the manifest."""
        buffer_size = self.cfg.shuffle_buffer if self.cfg.shuffle else 0
        buffer: list[dict] = []
        urls = [shard.url for shard in shards]
        for sample in iter_shards(
            urls, counters, report=report, prefetch=self.cfg.prefetch_shards, policy=self.cfg.retry,
            expected=[shard.num_samples for shard in shards] if check else None,
        ):
            if not self._complete(sample, counters, report=report):
                continue
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

    def _complete(self, sample: dict, counters: Counters, report: bool = True) -> bool:
        missing = []
        if image_key(sample) is None:
            missing.append("image")
        # dense sets name their mask classes: a sample with a mask needs no cls, whatever the recipe
        needs_label = self.labelled and not self.recipe.needs_mask and MASK_KEY not in sample
        if needs_label and LABEL_KEY not in sample:
            missing.append(LABEL_KEY)
        if self.recipe.needs_mask and MASK_KEY not in sample:
            missing.append(MASK_KEY)
        if missing:
            message = f"{sample['__url__']}: sample {sample['__key__']} lacks {', '.join(missing)}; skipped"
            counters.record("missing_key", message if report else None)
            return False
        return True

    def _read(self, sample: dict, counters: Counters) -> tuple | None:
        """(image, mask, label) of a sample, or None (counted) when it does not decode."""
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
        return image, mask, label

    def _augment(self, sample: dict, counters: Counters, image, mask, label) -> dict | None:
        """One augmented copy, or None (counted) when a view falls below the token budget's floor."""
        views, mask_t = self.recipe.augment(image, mask)
        out = {
            "images": torch.stack([self.recipe.finish(view) for view in views]),
            "label": label,
            "key": sample["__key__"],
        }
        if self.provider is not None and not self.provider.on_device:
            maps = self._superpixels(views, sample, counters)
            if maps is None:
                return None
            out["superpixels"] = maps
        if mask_t is not None:
            out["mask"] = mask_t
        return out

    def _superpixels(self, views: list[np.ndarray], sample: dict, counters: Counters) -> torch.Tensor | None:
        """The views' maps within the token budget (``max_superpixels``: the smallest segments merged,
        counted as ``superpixels_merged``); None, counted as ``too_few_superpixels`` and logged, when a
        view has fewer than ``min_superpixels`` segments (an empty or flat image), which no forward
        with a fixed first pooling could take."""
        budget, fewest = self.cfg.max_superpixels, self.cfg.min_superpixels
        dtype = np.int16 if 0 < budget <= 2**15 else np.int32  # one dtype per run, whatever the map
        maps = []
        for index, view in enumerate(views):
            labels = relabel_contiguous(np.asarray(self.provider(view)))
            if budget:
                labels, merged = merge_to_budget(labels, budget)
                if merged:
                    counters.record("superpixels_merged")
            count = int(labels.max()) + 1 if labels.size else 0
            if count < fewest:
                key = sample["__key__"]
                if key not in self._reported:
                    self._reported.add(key)
                    counters.record(
                        "too_few_superpixels",
                        f"{sample['__url__']}: sample {key} view {index} has {count} superpixels, fewer "
                        f"than data.min_superpixels={fewest} (the first pooling's clusters); skipped",
                    )
                return None
            maps.append(torch.from_numpy(labels.astype(dtype)))
        return torch.stack(maps)

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


def _seed_augmentation(rng: random.Random) -> None:
    torch.manual_seed(rng.getrandbits(62))
    random.seed(rng.getrandbits(62))
    np.random.seed(rng.getrandbits(32))


class ShardLoader:
    """A DataLoader over one rank's ``ShardStream`` with a known length and accumulated skip counters;
    for training, ``remaining()`` is what is left of the epoch after the batches consumed so far."""

    def __init__(self, stream: ShardStream, cfg: DataConfig):
        self.stream = stream
        self.counters = Counters()
        self.consumed = 0  # batches this rank took from the loader
        # pinned pages make the to_device copies asynchronous (non_blocking) on CUDA
        kwargs = {"num_workers": cfg.num_workers, "batch_size": None, "pin_memory": torch.cuda.is_available()}
        if cfg.num_workers > 0:
            kwargs.update(prefetch_factor=cfg.prefetch_factor, persistent_workers=False)
        self.loader = DataLoader(stream, **kwargs)

    def __len__(self) -> int:
        return len(self.stream)

    def __iter__(self) -> Iterator[dict]:
        for batch in self.loader:
            self.counters.update(batch["stats"])
            for message in batch["skipped"]:
                if MISMATCH in message:
                    if message in _warned:
                        continue
                    _warned.add(message)
                log.warning(message)
            self.consumed += 1
            yield batch

    def remaining(self) -> list[Segment]:
        """The epoch's segments not consumed yet, every rank having taken as many batches as this one."""
        stream = self.stream
        return remaining_after(stream.segments, stream.world_size, stream.num_workers,
                               stream.cfg.batch_size, self.consumed, stream.rotation)

    def rotation(self) -> int:
        """The ``rotation`` a loader of the same layout continuing from ``remaining()`` takes."""
        return (self.stream.rotation + self.consumed) % self.stream.num_workers


def build_loader(
    cfg: DataConfig,
    *,
    rank: int,
    world_size: int,
    epoch: int,
    provider=None,
    remaining: list[Segment] | None = None,
    global_batch: int = 0,
    rotation: int = 0,
) -> ShardLoader:
    """The loader for ``rank`` of ``world_size`` in ``epoch``. Training: ``remaining`` (from a
    checkpoint's position) resumes mid-epoch at any world size; ``global_batch`` (images per optimizer
    step, default world_size x batch_size) fixes the epoch's length; ``rotation`` (from the loader that
    wrote ``remaining``, same world size, workers and batch) continues its exact batch order."""
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
        remaining=remaining,
        global_batch=global_batch,
        rotation=rotation,
    )
    return ShardLoader(stream, cfg)
