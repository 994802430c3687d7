"""One evaluation of a model: kNN accuracy on labelled data, segment-retrieval mIoU on image+mask data,
and the linear-probe result if the training side wrote one. Data comes in through a callable that turns a
data-set URL into batches, so the same code runs on ``cast.data`` loaders and on hand-made batches."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass

from cast.artifacts import read_report, report_url
from cast.eval.features import extract_features
from cast.eval.knn import DEFAULT_K, DEFAULT_TEMPERATURE, knn_accuracy
from cast.eval.retrieval import DEFAULT_TOP_K, evaluate_retrieval, iter_cast_segmented_images
from cast.superpixels import SuperpixelProvider

BatchSource = Callable[[str], Iterable[dict]]


@dataclass
class EvaluationConfig:
    """What to evaluate. kNN needs both ``train_shards`` and ``val_shards``; retrieval needs both
    ``seg_bank_shards`` (the labelled memory bank) and ``seg_shards`` (scored)."""

    model: str = "cast_small"
    checkpoint: str | None = None  # None: random initialisation (a baseline)
    train_shards: str | None = None
    val_shards: str | None = None
    knn_k: int = DEFAULT_K
    knn_temperature: float = DEFAULT_TEMPERATURE
    seg_bank_shards: str | None = None
    seg_shards: str | None = None
    level: int | None = None  # hierarchy level of the retrieval segments; None = the top one
    seg_k: int = DEFAULT_TOP_K
    linear_probe: str | None = None  # JSON result URL; None: <checkpoint>.linear_probe.json if present
    device: str = "cpu"
    max_batches: int | None = None

    def validate(self) -> None:
        for first, second in (("train_shards", "val_shards"), ("seg_bank_shards", "seg_shards")):
            if (getattr(self, first) is None) != (getattr(self, second) is None):
                raise ValueError(f"evaluation: {first} and {second} go together; got only one of them")
        if self.train_shards is None and self.seg_shards is None:
            raise ValueError("evaluation: nothing to do; give train_shards + val_shards (kNN) and/or "
                             "seg_bank_shards + seg_shards (segment retrieval)")
        if self.knn_k < 1 or self.seg_k < 1:
            raise ValueError(f"evaluation: knn_k and seg_k must be >= 1, got {self.knn_k} and {self.seg_k}")
        if self.knn_temperature <= 0:
            raise ValueError(f"evaluation: knn_temperature must be > 0, got {self.knn_temperature}")
        if self.level is not None and self.level < 1:
            raise ValueError(f"evaluation: level is 1-based, got {self.level}")


def evaluate(
    model,
    config: EvaluationConfig,
    batches: BatchSource,
    class_names: Callable[[str], list[str]],
    provider: SuperpixelProvider | None = None,
    progress: bool = True,
) -> dict:
    """Run every evaluation ``config`` asks for; returns a JSON-ready dict of results."""
    config.validate()
    results: dict = {"model": config.model, "checkpoint": config.checkpoint or "random-init",
                     "config": asdict(config)}
    common = {"device": config.device, "provider": provider, "max_batches": config.max_batches,
              "progress": progress}
    if config.train_shards is not None:
        started = time.perf_counter()
        names = class_names(config.train_shards)
        train = extract_features(model, batches(config.train_shards), desc="train features", **common)
        val = extract_features(model, batches(config.val_shards), desc="val features", **common)
        knn = knn_accuracy(train.embeddings, train.labels, val.embeddings, val.labels, len(names),
                           k=min(config.knn_k, len(train)), temperature=config.knn_temperature)
        knn["seconds"] = time.perf_counter() - started
        results["knn"] = knn
    if config.seg_shards is not None:
        started = time.perf_counter()
        names = class_names(config.seg_bank_shards)

        def segmented(url: str):
            return iter_cast_segmented_images(model, _limit(batches(url), config.max_batches), config.device,
                                              config.level, provider)

        retrieval = evaluate_retrieval(segmented(config.seg_bank_shards), segmented(config.seg_shards),
                                       len(names), k=config.seg_k, class_names=names)
        retrieval["level"] = config.level or "top"
        retrieval["seconds"] = time.perf_counter() - started
        results["segment_retrieval"] = retrieval
    probe_url = config.linear_probe or (report_url(config.checkpoint, "linear_probe")
                                        if config.checkpoint else None)
    probe = read_report(probe_url) if probe_url else None
    if probe is not None:
        results["linear_probe"] = probe
    return results


def _limit(batches: Iterable[dict], max_batches: int | None) -> Iterable[dict]:
    for index, batch in enumerate(batches):
        if max_batches is not None and index >= max_batches:
            return
        yield batch
