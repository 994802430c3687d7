"""Superpixel maps stored in the shards (evaluation sets, or maps computed once offline).

A sample carries its map under ``SAMPLE_KEY`` (``spx.png``): a 16-bit greyscale PNG, lossless
and ~2-4x smaller than raw int32 for SEEDS maps, written by ``encode_labels`` and read by
``decode_labels``. The data pipeline decodes it, transforms it jointly with the image as it
does a segmentation mask (nearest interpolation), and passes the result to the provider,
which relabels it to ``0..K-1`` (a crop can drop labels).
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import cv2
import numpy as np
import torch

from cast.superpixels.base import SuperpixelProvider, relabel_contiguous

SAMPLE_KEY = "spx.png"
_MAX_LABEL = np.iinfo(np.uint16).max


def encode_labels(labels: np.ndarray) -> bytes:
    """``[H, W]`` non-negative integer labels (< 65536) -> 16-bit PNG bytes for a shard."""
    labels = np.asarray(labels)
    if labels.ndim != 2 or labels.size == 0 or not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"encode_labels: expected a non-empty [H, W] integer map, got {labels.dtype} "
                         f"{labels.shape}")
    if labels.min() < 0 or labels.max() > _MAX_LABEL:
        raise ValueError(f"encode_labels: labels must lie in 0..{_MAX_LABEL}, "
                         f"got {labels.min()}..{labels.max()}")
    ok, png = cv2.imencode(".png", labels.astype(np.uint16))
    if not ok:
        raise ValueError("encode_labels: PNG encoding failed")
    return png.tobytes()


def decode_labels(data: bytes) -> np.ndarray:
    """Bytes written by ``encode_labels`` -> int64 ``[H, W]`` labels as stored (not relabelled)."""
    labels = cv2.imdecode(np.frombuffer(data, dtype=np.uint8), cv2.IMREAD_UNCHANGED)
    if labels is None or labels.ndim != 2:
        raise ValueError(f"decode_labels: '{SAMPLE_KEY}' is not a single-channel PNG label map")
    return labels.astype(np.int64)


@dataclasses.dataclass
class PrecomputedProvider(SuperpixelProvider):
    """Reads maps from the sample instead of computing them from the image.

    ``from_sample(sample)`` decodes ``sample[key]``; ``provider(labels)`` and
    ``provider.batch(labels)`` take the decoded (and transformed) maps, ``[H, W]`` or
    ``[B, H, W]`` integers, and relabel them to ``0..K-1`` per image.
    """

    name: ClassVar[str] = "precomputed"
    on_device: ClassVar[bool] = False

    key: str = SAMPLE_KEY

    def from_sample(self, sample: dict) -> np.ndarray:
        """The stored map of a decoded-webdataset sample dict (raw bytes under ``key``)."""
        if self.key not in sample:
            where = sample.get("__url__", "?"), sample.get("__key__", "?")
            raise KeyError(f"precomputed superpixels: sample {where[1]!r} in {where[0]} has no {self.key!r} "
                           f"(keys: {sorted(k for k in sample if not k.startswith('__'))})")
        return decode_labels(sample[self.key])

    def __call__(self, labels: np.ndarray) -> np.ndarray:
        labels = np.asarray(labels)
        if labels.ndim != 2 or not np.issubdtype(labels.dtype, np.integer):
            raise ValueError(f"precomputed superpixels take the stored [H, W] integer map (from_sample), "
                             f"not an image; got {labels.dtype} {labels.shape}")
        return relabel_contiguous(labels)

    def batch(self, labels: torch.Tensor) -> torch.Tensor:
        if not torch.is_tensor(labels) or labels.ndim != 3 or labels.is_floating_point():
            raise ValueError(f"precomputed superpixels take stored [B, H, W] integer maps, not images; got "
                             f"{getattr(labels, 'dtype', type(labels).__name__)} "
                             f"{tuple(getattr(labels, 'shape', ()))}")
        relabelled = np.stack([self(image_labels) for image_labels in labels.cpu().numpy()])
        return torch.from_numpy(relabelled).to(labels.device)
