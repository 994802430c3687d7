"""The evaluations a job runs, each a picklable task that every worker runs on its share of the data.

``KnnTask``: frozen image embeddings of the train and val shards -> feature parts in storage -> each
worker scores its val share against the whole train bank (``FeatureBank``, blocked top-k) -> hit
counts summed. ``RetrievalTask``: the VOC protocol of reference section 5.5 (segment prototypes of
the bank images -> a prototype bank in storage -> every test segment takes the majority label of its
``k`` nearest prototypes -> confusion matrices summed). Both run through ``cast.eval.distributed``.
"""

from __future__ import annotations

import logging
import posixpath
import time
from collections import Counter
from dataclasses import dataclass, field

import numpy as np
import torch
from PIL import Image

from cast.data import DataConfig, ShardSetError, build_loader, read_manifest
from cast.eval.dense import predict_logits
from cast.eval.distributed import WorkerContext
from cast.eval.features import (
    FeatureBank,
    FeaturePart,
    Features,
    extract_features,
    read_features,
    write_features,
)
from cast.eval.knn import DEFAULT_K, DEFAULT_TEMPERATURE, knn_scores, knn_summary, top_hits
from cast.eval.model_loading import build_projector, load_model, load_segmenter, projector_state
from cast.eval.retrieval import (
    DEFAULT_TOP_K,
    EMBEDDINGS,
    MemoryBank,
    bank_prototypes,
    cast_segmented_images,
    predict,
    resize_labels,
    retrieval_view,
)
from cast.eval.segmentation import IGNORE_INDEX, SegmentationMeter
from cast.storage import exists, join
from cast.superpixels import get_provider

log = logging.getLogger(__name__)
MASKLESS_LAYOUTS = ("imagefolder", "flat")  # data_tools layouts whose samples carry no seg.png


@dataclass
class ModelSpec:
    """The model a task evaluates: a registered variant with options, and a checkpoint or a seed."""

    name: str = "cast_small"
    checkpoint: str | None = None  # None: random initialisation from ``seed`` (the baseline)
    seed: int = 0
    options: dict = field(default_factory=dict)  # CASTConfig overrides (img_size, num_clusters, ...)

    def build(self, device: torch.device):
        return load_model(self.name, self.checkpoint, device=device, seed=self.seed, **self.options)

    @property
    def label(self) -> str:
        return self.checkpoint or f"random-init (seed {self.seed})"


@dataclass
class LoaderSpec:
    """How a task reads shards: the recipe, view size, batch and the superpixels the model trained with."""

    recipe: str = "eval"
    image_size: int = 224
    batch_size: int = 64
    workers: int = 2  # DataLoader processes per Ray worker
    superpixels: str = "seeds"
    superpixel_params: dict = field(default_factory=dict)
    max_batches: int | None = None  # smoke runs: stop each pass after this many batches
    progress: bool = True  # progress bars on rank 0

    def provider(self):
        return get_provider(self.superpixels, **self.superpixel_params) if self.superpixels else None

    def loader(self, url: str, context: WorkerContext, provider=None):
        config = DataConfig(shards=url, recipe=self.recipe, image_size=self.image_size,
                            batch_size=self.batch_size, num_workers=self.workers, shuffle=False,
                            drop_remainder=False, superpixels="", superpixel_params={})
        return build_loader(config, rank=context.rank, world_size=context.world_size, epoch=0,
                            provider=provider)

    def check_shards(self, url: str, key: str, task: str, world_size: int):
        """The manifest of ``url``; ShardSetError naming the task and option unless every reader of
        ``world_size`` workers gets a shard."""
        manifest = read_manifest(url)
        readers = world_size * max(1, self.workers)
        if manifest.num_shards < readers:
            raise ShardSetError(f"{task}: {key} {manifest.url} has {manifest.num_shards} shards for "
                                f"{readers} readers ({world_size} workers x {max(1, self.workers)} loader "
                                "workers); build more shards (smaller --max-count) or use fewer workers")
        return manifest


def part_url(folder: str, split: str, context: WorkerContext) -> str:
    return join(folder, split, f"part-{context.rank:05d}-of-{context.world_size:05d}.pt")


def _limit(batches, max_batches: int | None):
    for index, batch in enumerate(batches):
        if max_batches is not None and index >= max_batches:
            return
        yield batch


def _skip_counts(loader) -> dict:
    return {key: int(value) for key, value in loader.counters.items() if isinstance(value, int)}


def _duplicates(keys: list[str]) -> int:
    return len(keys) - len(set(keys))


def _summed_counts(context: WorkerContext, counts: dict) -> dict:
    total: Counter = Counter()
    for part in context.gather(counts):
        total.update(part)
    return dict(total)


@dataclass
class KnnTask:
    """Weighted kNN (k=20, T=0.07) of the val shards against the train shards' embeddings."""

    model: ModelSpec
    data: LoaderSpec
    train_shards: str
    val_shards: str
    features: str  # storage folder for the feature parts (kept: they are a product of the run)
    k: int = DEFAULT_K
    temperature: float = DEFAULT_TEMPERATURE
    name: str = "knn"

    def validate(self, world_size: int = 1) -> None:
        if self.k < 1 or self.temperature <= 0:
            raise ValueError(f"knn: --knn-k must be >= 1 and --knn-temperature > 0, got {self.k}, "
                             f"{self.temperature}")
        classes = []
        for key, url in (("--train-shards", self.train_shards), ("--val-shards", self.val_shards)):
            manifest = self.data.check_shards(url, key, self.name, world_size)
            if not manifest.classes:
                raise ShardSetError(f"knn: {key} {manifest.url} has no 'classes' in its manifest; kNN needs "
                                    "labelled shards (an imagefolder layout)")
            classes.append(manifest.classes)
        if classes[0] != classes[1]:
            raise ShardSetError(f"knn: --train-shards and --val-shards name different classes "
                                f"({len(classes[0])} vs {len(classes[1])})")

    def _extract(self, model, provider, url: str, split: str, context: WorkerContext):
        """This worker's features of ``url``; a part already in storage (a restarted worker) is reused."""
        target = part_url(self.features, split, context)
        if exists(target):
            features, skipped = read_features(target), {}
            log.info("%s: reusing %s (%d rows)", self.name, target, len(features))
        else:
            loader = self.data.loader(url, context, None if provider is None or provider.on_device
                                      else provider)
            features = extract_features(model, _limit(loader, self.data.max_batches), device=context.device,
                                        provider=provider if provider is not None and provider.on_device
                                        else None, progress=self.data.progress and context.rank == 0,
                                        desc=f"{split} features")
            skipped = _skip_counts(loader)
            write_features(features, target)
        return FeaturePart(target, len(features), int(features.embeddings.shape[1])), features, skipped

    def run(self, context: WorkerContext) -> dict:
        started = time.perf_counter()
        model = self.model.build(context.device)
        provider = self.data.provider()
        classes = read_manifest(self.train_shards).classes
        train_part, _, train_skipped = self._extract(model, provider, self.train_shards, "train", context)
        _, val, val_skipped = self._extract(model, provider, self.val_shards, "val", context)
        parts = context.gather(train_part)  # every worker's part, in rank order
        bank = FeatureBank.load(parts, context.device)
        k = min(self.k, len(bank))
        scores = knn_scores(bank.embeddings, bank.labels, val.embeddings, len(classes), k, self.temperature,
                            normalised=True)
        top1, top5 = top_hits(scores, val.labels)
        predictions = Features(scores.cpu(), scores.argmax(dim=1).cpu(), val.keys)
        write_features(predictions, part_url(self.features, "val-scores", context))
        hits = context.sum(torch.tensor([top1, top5, len(val)], dtype=torch.float64))
        val_keys = [key for keys in context.gather(val.keys) for key in keys]
        result = knn_summary(int(hits[0]), int(hits[1]), k, self.temperature, len(bank), int(hits[2]))
        result.update({
            "model": self.model.name, "checkpoint": self.model.label, "classes": len(classes),
            "train_shards": self.train_shards, "val_shards": self.val_shards, "features": self.features,
            "duplicate_samples": _duplicates(bank.keys) + _duplicates(val_keys),
            "skipped": {"train": _summed_counts(context, train_skipped),
                        "val": _summed_counts(context, val_skipped)},
            "workers": context.world_size, "seconds": time.perf_counter() - started,
        })
        return result


@dataclass
class RetrievalTask:
    """Unsupervised segmentation by segment retrieval, the VOC protocol (reference section 5.5)."""

    model: ModelSpec
    data: LoaderSpec
    bank_shards: str
    test_shards: str
    features: str
    level: int | None = None  # hierarchy level of the segments, 1-based; None: the top (all levels chained)
    k: int = DEFAULT_TOP_K
    embedding: str = "projector"  # projector (MoCo head per superpixel token, 256-d) | fused | tokens
    long_side: int = 512  # images resized so their longer side has this many pixels (0: as stored)
    name: str = "retrieval"

    def validate(self, world_size: int = 1) -> None:
        if self.embedding not in EMBEDDINGS:
            raise ValueError(f"retrieval: --embedding {self.embedding!r}, expected one of {EMBEDDINGS}")
        if self.k < 1 or (self.level is not None and self.level < 1) or self.long_side < 0:
            raise ValueError(f"retrieval: --seg-k must be >= 1, --level >= 1 and --long-side >= 0, got "
                             f"{self.k}, {self.level}, {self.long_side}")
        if self.embedding == "projector" and self.model.checkpoint is None:
            raise ValueError("retrieval: --embedding projector needs a MoCo checkpoint (its projector); a "
                             "random-init baseline uses --embedding fused")
        names = []
        for key, url in (("--seg-bank-shards", self.bank_shards), ("--seg-shards", self.test_shards)):
            manifest = self.data.check_shards(url, key, self.name, world_size)
            if manifest.layout in MASKLESS_LAYOUTS:
                raise ShardSetError(f"retrieval: {key} {manifest.url} was built with --layout "
                                    f"{manifest.layout}, which has no masks (seg.png); build image+mask "
                                    "shards (--layout voc)")
            if not manifest.classes:
                raise ShardSetError(f"retrieval: {key} {manifest.url} has no 'classes' in its manifest; "
                                    "segment retrieval needs the class names of its masks (a voc layout)")
            names.append(manifest.classes)
        if names[0] != names[1]:
            raise ShardSetError("retrieval: --seg-bank-shards and --seg-shards name different classes")

    def _segmented(self, model, projector, provider, url: str, context: WorkerContext):
        """(segmented image at the model's view, original mask) of every sample of this worker's share."""
        loader = self.data.loader(url, context, None if provider is None or provider.on_device else provider)
        for batch in _limit(loader, self.data.max_batches):
            if "mask" not in batch:
                raise ShardSetError(f"retrieval: {url} samples carry no seg.png mask (recipe "
                                    f"{self.data.recipe!r}); retrieval needs image+mask shards")
            images, superpixels, masks = retrieval_view(batch, context.device, self.long_side,
                                                        provider if provider and provider.on_device else None)
            segmented = cast_segmented_images(model, images, superpixels, masks, self.level, batch["key"],
                                              projector=projector, embedding=self.embedding)
            for image, original in zip(segmented, batch["mask"]):
                yield image, original.long()
        self._skipped = _skip_counts(loader)

    def run(self, context: WorkerContext) -> dict:
        started = time.perf_counter()
        model = self.model.build(context.device)
        projector = None
        if self.embedding == "projector":
            projector = build_projector(projector_state(self.model.checkpoint)).to(context.device)
        provider = self.data.provider()
        classes = read_manifest(self.bank_shards).classes
        target = part_url(self.features, "bank", context)
        if exists(target):
            part_features = read_features(target)
        else:
            images = (image for image, _ in self._segmented(model, projector, provider, self.bank_shards,
                                                            context))
            prototypes, labels, keys, _ = bank_prototypes(images, IGNORE_INDEX)
            part_features = Features(prototypes, labels, keys)
            write_features(part_features, target)
        dim = int(part_features.embeddings.shape[1]) if len(part_features) else 0
        parts = context.gather(FeaturePart(target, len(part_features), dim))
        if not sum(part.rows for part in parts):
            raise ValueError(f"retrieval: no labelled segment in {self.bank_shards} (no sample with a mask, "
                             "or every segment mostly the ignore label); see the skip counts in the log")
        bank = FeatureBank.load(parts, context.device)
        memory = MemoryBank(bank.embeddings, bank.labels)
        if int(bank.labels.max()) >= len(classes):
            raise ValueError(f"retrieval: bank label {int(bank.labels.max())} outside the {len(classes)} "
                             f"classes of {self.bank_shards}")
        meter = SegmentationMeter(len(classes), IGNORE_INDEX)
        for image, original in self._segmented(model, projector, provider, self.test_shards, context):
            prediction = resize_labels(predict(image, memory, len(classes), self.k), original.shape)
            segments = resize_labels(image.segments, original.shape)
            meter.update(prediction, original, segments)
        merged = SegmentationMeter.merged(context.gather(meter))
        result = merged.result(classes)
        result.update({
            "model": self.model.name, "checkpoint": self.model.label, "k": min(self.k, len(bank)),
            "level": self.level or "top", "embedding": self.embedding, "long_side": self.long_side,
            "bank_prototypes": len(bank), "bank_images": len(set(bank.keys)),
            "bank_shards": self.bank_shards, "test_shards": self.test_shards, "features": self.features,
            "workers": context.world_size, "seconds": time.perf_counter() - started,
        })
        return result


@dataclass
class SegmentationTask:
    """Semantic segmentation of a fine-tuned dense model as the recipes evaluate (sections 5.4, 5.6):
    every image resized (short side for ADE20K / Pascal Context, long side for VOC), sliding windows or
    the whole image, logits averaged and scored at the original size; dataset-level mIoU, per-class IoU
    and pixel accuracy from the summed confusion matrices. ``overlays``: a folder for [image | ground
    truth | prediction] PNGs of the first ``max_overlays`` images of rank 0."""

    model: ModelSpec  # a dense variant; checkpoint = our jobs.finetune_seg run or checkpoint
    data: LoaderSpec
    shards: str
    decoder: str = "mask_transformer"
    decoder_options: dict = field(default_factory=dict)
    size: int = 512
    resize: str = "short"
    window: int = 0
    stride: int = 0
    overlays: str = ""
    max_overlays: int = 8
    name: str = "segmentation"

    def validate(self, world_size: int = 1) -> None:
        if self.resize not in ("short", "long") or self.window < 0 or self.stride < 0 or self.size < 8:
            raise ValueError(f"segmentation: --eval-resize short|long, --window/--stride >= 0 and --size "
                             f">= 8; got {self.resize!r}, {self.window}, {self.stride}, {self.size}")
        manifest = self.data.check_shards(self.shards, "--seg-eval-shards", self.name, world_size)
        if manifest.layout in MASKLESS_LAYOUTS or not manifest.classes:
            raise ShardSetError(f"segmentation: --seg-eval-shards {manifest.url} needs image+mask shards "
                                "with class names (layouts voc, pcontext, ade20k)")

    def run(self, context: WorkerContext) -> dict:
        from cast.data.batches import to_device
        from cast.data.transforms import denormalize
        from cast.viz import save_png, semantic_panels

        started = time.perf_counter()
        classes = read_manifest(self.shards).classes
        spec = self.model
        model = load_segmenter(spec.name, spec.checkpoint, decoder=self.decoder, num_classes=len(classes),
                               decoder_options=self.decoder_options, device=context.device, seed=spec.seed,
                               **spec.options)
        provider = self.data.provider()
        meter = SegmentationMeter(len(classes), IGNORE_INDEX)
        loader = self.data.loader(self.shards, context)
        written = []
        with torch.no_grad():
            for batch in _limit(loader, self.data.max_batches):
                images = to_device(batch, context.device, with_superpixels=False)["images"][:, 0]
                mask = batch["mask"][0]
                logits = predict_logits(model, images, provider, size=self.size, resize=self.resize,
                                        window=self.window, stride=self.stride, num_classes=len(classes))
                prediction = logits[0].argmax(0).cpu()
                meter.update(prediction, mask)
                if self.overlays and context.rank == 0 and len(written) < self.max_overlays:
                    view = (denormalize(images[0]).permute(1, 2, 0).cpu().numpy() * 255).round()
                    url = join(self.overlays, f"{batch['key'][0].replace('/', '_')}.png")
                    save_png(url, Image.fromarray(semantic_panels(view.astype(np.uint8), mask.numpy(),
                                                                  prediction.numpy(), len(classes))))
                    written.append(url)
        merged = SegmentationMeter.merged(context.gather(meter))
        result = merged.result(classes)
        seconds = time.perf_counter() - started
        result.update({
            "model": spec.name, "checkpoint": spec.label, "decoder": self.decoder, "size": self.size,
            "resize": self.resize, "window": self.window, "stride": self.stride, "shards": self.shards,
            "workers": context.world_size, "seconds": seconds,
            "seconds_per_image": seconds * context.world_size / max(1, len(merged.image_miou)),
            "overlays": context.gather(written)[0],
        })
        return result


def feature_folder(base: str, task: str) -> str:
    """``<base>.<task>-features``: where a task's parts go, beside the checkpoint or result file."""
    return f"{base.rstrip('/')}.{task}-features" if not base.endswith(posixpath.sep) else base + task
