"""A loader batch on the compute device, with its superpixels, for training and evaluation alike.

The loaders' batches (``cast.data.reader``) hold ``images`` [B, V, 3, H, W] (ImageNet-normalised),
``label`` [B], ``key`` and, for segmentation, ``mask`` [B, H, W]; ``superpixels`` [B, V, H, W] come
with the batch from CPU providers, or are computed here, on the device, by an on-device provider
(``slic_torch``), so GPU nodes spend no CPU on them.
"""

from __future__ import annotations

import torch

from cast.data.transforms import denormalize
from cast.superpixels import SuperpixelProvider


def to_device(batch: dict, device: str | torch.device, provider: SuperpixelProvider | None = None,
              with_superpixels: bool = True) -> dict:
    """``images``, ``superpixels`` (int64), ``label`` and ``mask`` (when present) on ``device``;
    ``with_superpixels=False`` for consumers that segment the images themselves (PartImageNet)."""
    images = batch["images"]
    if images.dim() != 5:
        raise ValueError(f"batch 'images' must be [B, V, 3, H, W], got {tuple(images.shape)}")
    images = images.to(device, non_blocking=True)
    out = {"images": images}
    if with_superpixels:
        if "superpixels" in batch:
            superpixels = batch["superpixels"].to(device, non_blocking=True)
        elif provider is not None:
            b, v, c, h, w = images.shape
            superpixels = provider.batch(denormalize(images.reshape(b * v, c, h, w))).reshape(b, v, h, w)
        else:
            raise ValueError("batch has no 'superpixels' and no provider was given to compute them")
        out["superpixels"] = superpixels.long()
    for name in ("label", "mask"):
        if name in batch:
            out[name] = batch[name].to(device, non_blocking=True)
    return out
