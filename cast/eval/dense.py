"""Semantic-segmentation inference as the recipes evaluate: resize, sliding windows, averaged logits.

``predict_logits`` resizes an image so its short (mmseg: ADE20K, Pascal Context) or long side (SPML: VOC)
is ``size``, runs the model on windows of ``window`` px every ``stride`` px (superpixels computed per
window, as the reference does; a window past the image edge is shifted back inside it, mmseg's rule), sums
the logits where windows overlap and divides by the count, and resizes the averaged logits bilinearly to
the image's original size. ``window=0`` is whole-image inference (the VOC protocol). Used by training-time
validation (``cast.train.validation``) and ``jobs.evaluate --task segmentation``.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from cast.data.transforms import denormalize

Model = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (images, superpixels) -> [B, K, H, W]


def window_starts(length: int, window: int, stride: int) -> list[int]:
    """Window offsets along one axis covering ``length`` (the last one flush with the end)."""
    if length <= window:
        return [0]
    count = (length - window + stride - 1) // stride + 1
    return sorted({min(i * stride, length - window) for i in range(count)})


def _run(model: Model, images: torch.Tensor, provider) -> torch.Tensor:
    """Model logits for images [1, 3, h, w] padded up to multiples of 8 (CAST's stem), cut back."""
    height, width = images.shape[-2:]
    pad_h, pad_w = -height % 8, -width % 8
    padded = F.pad(images, (0, pad_w, 0, pad_h)) if pad_h or pad_w else images
    superpixels = provider.batch(denormalize(padded)).long()
    logits = model(padded, superpixels)
    if logits.shape[-2:] != padded.shape[-2:]:
        logits = F.interpolate(logits.float(), size=padded.shape[-2:], mode="bilinear", align_corners=False)
    return logits[..., :height, :width].float()


def sliding_logits(model: Model, images: torch.Tensor, provider, window: int, stride: int,
                   num_classes: int) -> torch.Tensor:
    """Averaged logits [1, K, H, W] of windows over ``images`` [1, 3, H, W]; ``window=0``: one pass."""
    height, width = images.shape[-2:]
    if window <= 0:
        return _run(model, images, provider)
    stride = stride or window
    total = images.new_zeros(1, num_classes, height, width, dtype=torch.float32)
    count = images.new_zeros(1, 1, height, width, dtype=torch.float32)
    for top in window_starts(height, window, stride):
        for left in window_starts(width, window, stride):
            crop = images[..., top : top + window, left : left + window]
            rows, cols = slice(top, top + crop.shape[-2]), slice(left, left + crop.shape[-1])
            total[..., rows, cols] += _run(model, crop, provider)
            count[..., rows, cols] += 1
    return total / count


def predict_logits(model: Model, images: torch.Tensor, provider, *, size: int, resize: str = "short",
                   window: int = 0, stride: int = 0, num_classes: int) -> torch.Tensor:
    """Logits [1, K, H, W] at the original size of ``images`` [1, 3, H, W] (ImageNet-normalised)."""
    if resize not in ("short", "long"):
        raise ValueError(f"resize {resize!r}: expected 'short' or 'long'")
    height, width = images.shape[-2:]
    side = min(height, width) if resize == "short" else max(height, width)
    scaled = (max(1, round(height * size / side)), max(1, round(width * size / side)))
    resized = F.interpolate(images, size=scaled, mode="bilinear", align_corners=False, antialias=True)
    logits = sliding_logits(model, resized, provider, window, stride, num_classes)
    if scaled != (height, width):
        logits = F.interpolate(logits, size=(height, width), mode="bilinear", align_corners=False)
    return logits
