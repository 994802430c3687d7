"""The provider interface every superpixel method implements, and label relabelling.

A provider turns an image into an int64 label map with labels ``0..K-1`` (no gaps), the form
the model's segment pooling indexes with. CPU providers run per view inside DataLoader workers
(``provider(view_uint8_hwc)``); on-device providers run on a whole batch after it reaches the
training device (``provider.batch(images01)``). Every provider supports both calls so the
training loop can treat them alike.
"""

from __future__ import annotations

import abc
from typing import ClassVar

import numpy as np
import torch


class SuperpixelProvider(abc.ABC):
    """A picklable superpixel method; see the module docstring for the two entry points."""

    name: ClassVar[str]
    on_device: ClassVar[bool]

    @abc.abstractmethod
    def __call__(self, image: np.ndarray) -> np.ndarray:
        """uint8 RGB ``[H, W, 3]`` -> int64 ``[H, W]`` labels ``0..K-1``."""

    def batch(self, images01: torch.Tensor) -> torch.Tensor:
        """float ``[B, 3, H, W]`` in [0, 1] -> int64 ``[B, H, W]`` on the images' device.

        The default loops over the images on the CPU; on-device providers override it.
        """
        check_images01(images01)
        views = images_to_uint8_hwc(images01)
        labels = np.stack([self(view) for view in views])
        return torch.from_numpy(labels).to(images01.device)


def check_uint8_image(image: np.ndarray) -> None:
    """Raise a clear error unless ``image`` is a uint8 ``[H, W, 3]`` RGB array."""
    if not isinstance(image, np.ndarray) or image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        got = f"{type(image).__name__} {getattr(image, 'dtype', '')} {getattr(image, 'shape', '')}"
        raise ValueError(f"superpixels: expected a uint8 RGB image of shape [H, W, 3], got {got}")


def check_images01(images01: torch.Tensor) -> None:
    """Raise a clear error unless ``images01`` is a float ``[B, 3, H, W]`` tensor."""
    if not torch.is_tensor(images01) or not images01.is_floating_point() or images01.ndim != 4 \
            or images01.shape[1] != 3:
        got = f"{type(images01).__name__} {getattr(images01, 'dtype', '')} " \
              f"{tuple(getattr(images01, 'shape', ()))}"
        raise ValueError(f"superpixels: expected float images [B, 3, H, W] in [0, 1], got {got}")


def images_to_uint8_hwc(images01: torch.Tensor) -> np.ndarray:
    """``[B, 3, H, W]`` floats in [0, 1] -> uint8 ``[B, H, W, 3]`` (rounded, so ToTensor round-trips)."""
    as_uint8 = (images01.detach() * 255).round_().clamp_(0, 255).to(torch.uint8)
    return as_uint8.permute(0, 2, 3, 1).cpu().numpy()


def relabel_contiguous(labels: np.ndarray) -> np.ndarray:
    """Map the labels present in a non-negative integer map onto ``0..K-1``, keeping their order.

    Uses a presence table (``bincount``) rather than ``np.unique``: it costs microseconds and
    is a no-op copy when no label is missing, the usual case for SEEDS.
    """
    if labels.size == 0:
        return labels.astype(np.int64)
    if labels.min() < 0:
        raise ValueError("superpixels: labels must be non-negative")
    present = np.bincount(labels.ravel()) > 0
    if present.all():
        return labels.astype(np.int64, copy=False)
    new_ids = np.cumsum(present, dtype=np.int64) - 1
    return new_ids[labels]


def relabel_contiguous_batch(labels: torch.Tensor, num_labels: int) -> torch.Tensor:
    """Per-image contiguous relabelling of ``[B, H, W]`` labels known to lie in ``0..num_labels-1``.

    Fully vectorised and free of host synchronisation (no ``unique``, no data-dependent
    shapes), so it is cheap on CUDA inside the training step.
    """
    flat = labels.reshape(labels.shape[0], -1)
    present = torch.zeros(labels.shape[0], num_labels, dtype=torch.int64, device=labels.device)
    present.scatter_(1, flat, 1)
    new_ids = present.cumsum(1) - 1
    return new_ids.gather(1, flat).reshape(labels.shape)


def merge_to_budget(labels: np.ndarray, budget: int) -> tuple[np.ndarray, int]:
    """At most ``budget`` contiguous labels: the smallest segment joins the neighbour it shares the
    longest border with, until the count fits. Returns (labels 0..K-1, segments merged away).

    Why: the model's token budget is fixed (static shapes); SEEDS now and then returns a few more
    segments than it was asked for, and merging the smallest keeps the rest of the map as it was.
    """
    labels = relabel_contiguous(labels)
    count = int(labels.max()) + 1 if labels.size else 0
    if count <= budget:
        return labels, 0
    pairs = np.concatenate([
        np.stack([labels[:, :-1].ravel(), labels[:, 1:].ravel()], 1),
        np.stack([labels[:-1, :].ravel(), labels[1:, :].ravel()], 1),
    ])
    pairs = pairs[pairs[:, 0] != pairs[:, 1]]
    pairs.sort(axis=1)
    edges, border = np.unique(pairs, axis=0, return_counts=True)
    owner = np.arange(count)  # current segment of every original label
    sizes = np.bincount(labels.ravel(), minlength=count).astype(np.int64)
    for _ in range(count - budget):
        alive = np.flatnonzero(sizes)
        small = alive[np.argmin(sizes[alive])]
        ends = owner[edges]
        touching = (ends == small).any(1) & (ends[:, 0] != ends[:, 1])
        other = np.where(ends[touching, 0] == small, ends[touching, 1], ends[touching, 0])
        target = np.bincount(other, weights=border[touching], minlength=count).argmax()
        owner[owner == small] = target
        sizes[target] += sizes[small]
        sizes[small] = 0
    return relabel_contiguous(owner[labels]), count - budget
