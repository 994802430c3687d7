"""Segmentation metrics: confusion matrix, dataset and per-image mIoU with an ignore label, boundary recall.

Conventions: ground truth ``target`` and prediction ``pred`` are integer maps of the same shape; pixels
whose target is ``ignore_index`` (255, as in VOC/ADE masks) are left out of every count. Confusion rows
are ground-truth classes, columns predicted classes.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from cast.superpixels.quality import boundary_recall as _edge_recall

IGNORE_INDEX = 255


def _as_numpy(array) -> np.ndarray:
    if hasattr(array, "detach"):  # torch tensors, without importing torch here
        array = array.detach().cpu().numpy()
    return np.asarray(array)


def confusion_matrix(pred, target, num_classes: int, ignore_index: int = IGNORE_INDEX) -> np.ndarray:
    """int64 [C, C] counts of (ground truth, prediction) pairs over the non-ignored pixels."""
    pred, target = _as_numpy(pred), _as_numpy(target)
    if pred.shape != target.shape:
        raise ValueError(f"confusion_matrix: prediction {pred.shape} and target {target.shape} differ")
    valid = target != ignore_index
    pred, target = pred[valid].astype(np.int64), target[valid].astype(np.int64)
    for name, values in (("target", target), ("prediction", pred)):
        bad = values[(values < 0) | (values >= num_classes)]
        if bad.size:
            raise ValueError(f"confusion_matrix: {name} holds label {bad[0]}, outside 0..{num_classes - 1} "
                             f"(and not the ignore label {ignore_index})")
    counts = np.bincount(target * num_classes + pred, minlength=num_classes * num_classes)
    return counts.reshape(num_classes, num_classes)


def class_iou(confusion: np.ndarray) -> np.ndarray:
    """IoU per class (float [C]); NaN for a class absent from both ground truth and prediction."""
    confusion = np.asarray(confusion, dtype=np.float64)
    hits = np.diag(confusion)
    union = confusion.sum(0) + confusion.sum(1) - hits
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(union > 0, hits / union, np.nan)


def mean_iou(confusion: np.ndarray) -> float:
    """Mean IoU over the classes that occur (in ground truth or prediction); NaN if none does."""
    iou = class_iou(confusion)
    return float(np.nanmean(iou)) if np.isfinite(iou).any() else float("nan")


def pixel_accuracy(confusion: np.ndarray) -> float:
    total = confusion.sum()
    return float(np.trace(confusion) / total) if total else float("nan")


def ground_truth_edges(target, ignore_index: int = IGNORE_INDEX) -> np.ndarray:
    """Pixels whose right or lower neighbour has another ground-truth class, neither pixel ignored."""
    target = _as_numpy(target)
    edges = np.zeros(target.shape, dtype=bool)
    known = target != ignore_index
    edges[:, :-1] |= (target[:, :-1] != target[:, 1:]) & known[:, :-1] & known[:, 1:]
    edges[:-1, :] |= (target[:-1, :] != target[1:, :]) & known[:-1, :] & known[1:, :]
    return edges


def boundary_recall(segments, target, tolerance: int = 2, ignore_index: int = IGNORE_INDEX) -> float:
    """Share of ground-truth edge pixels within ``tolerance`` px (Chebyshev) of a predicted segment border.

    ``segments`` is any label map (class-agnostic: only where labels change matters); an image with no
    ground-truth edge scores 1. Same measure as the superpixel quality check, applied to segment maps.
    """
    segments, target = _as_numpy(segments), _as_numpy(target)
    if segments.shape != target.shape:
        raise ValueError(f"boundary_recall: segments {segments.shape} and target {target.shape} differ")
    return _edge_recall(ground_truth_edges(target, ignore_index), segments, tolerance)


@dataclass
class SegmentationMeter:
    """Accumulates a dataset-level confusion matrix and per-image scores over ``update`` calls.

    Per-image mIoU (the PartImageNet protocol scores each image, then averages) takes the mean IoU over
    the classes present in that image's ground truth or prediction, so absent classes neither reward nor
    punish; images with no valid pixel are skipped and counted.
    """

    num_classes: int
    ignore_index: int = IGNORE_INDEX
    confusion: np.ndarray = field(init=False)
    image_miou: list[float] = field(default_factory=list, init=False)
    image_boundary_recall: list[float] = field(default_factory=list, init=False)
    empty_images: int = field(default=0, init=False)

    def __post_init__(self) -> None:
        if self.num_classes < 1:
            raise ValueError(f"SegmentationMeter: num_classes must be >= 1, got {self.num_classes}")
        self.confusion = np.zeros((self.num_classes, self.num_classes), dtype=np.int64)

    def update(self, pred, target, segments=None, tolerance: int = 2) -> None:
        """Add one image; ``segments`` (the class-agnostic segment map) also scores boundary recall."""
        image_confusion = confusion_matrix(pred, target, self.num_classes, self.ignore_index)
        if image_confusion.sum() == 0:
            self.empty_images += 1
            return
        self.confusion += image_confusion
        self.image_miou.append(mean_iou(image_confusion))
        if segments is not None:
            self.image_boundary_recall.append(boundary_recall(segments, target, tolerance, self.ignore_index))

    @classmethod
    def merged(cls, meters: list[SegmentationMeter]) -> SegmentationMeter:
        """One meter holding the counts of all ``meters`` (one per worker), images in their order."""
        total = cls(meters[0].num_classes, meters[0].ignore_index)
        for meter in meters:
            total.confusion += meter.confusion
            total.image_miou += meter.image_miou
            total.image_boundary_recall += meter.image_boundary_recall
            total.empty_images += meter.empty_images
        return total

    def result(self, class_names: list[str] | None = None) -> dict:
        iou = class_iou(self.confusion)
        names = class_names or [str(c) for c in range(self.num_classes)]
        result = {
            "miou": mean_iou(self.confusion),
            "pixel_accuracy": pixel_accuracy(self.confusion),
            "image_miou": float(np.mean(self.image_miou)) if self.image_miou else float("nan"),
            "images": len(self.image_miou),
            "empty_images": self.empty_images,
            "class_iou": {name: (None if np.isnan(v) else float(v)) for name, v in zip(names, iou)},
        }
        if self.image_boundary_recall:
            result["boundary_recall"] = float(np.mean(self.image_boundary_recall))
        return result
