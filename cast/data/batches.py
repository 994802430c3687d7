"""A loader batch on the compute device, with its superpixels, for training and evaluation alike.

The loaders' batches (``cast.data.reader``) hold ``images`` [B, V, 3, H, W] (uint8, or normalised
float32 for DeiT's recipe), ``label`` [B], ``key`` and, for segmentation, ``mask`` [B, H, W];
``superpixels`` [B, V, H, W] (int16/int32) come with the batch from CPU providers, or are computed
here, on the device, by an on-device provider (``slic_torch``), so GPU nodes spend no CPU on them.
Normalisation and the widening to float32 / int64 happen here, after the copy: the lean dtypes
are what crosses the DataLoader and the PCIe bus.
"""

from __future__ import annotations

import torch

from cast.data.transforms import to_input, to_unit
from cast.superpixels import SuperpixelProvider


def to_device(batch: dict, device: str | torch.device, provider: SuperpixelProvider | None = None,
              with_superpixels: bool = True) -> dict:
    """``images`` (normalised float32), ``superpixels`` (int64), ``label`` and ``mask`` (when present)
    on ``device``;
    ``with_superpixels=False`` for consumers that segment the images themselves (PartImageNet)."""
    images = batch["images"]
    if images.dim() != 5:
        raise ValueError(f"batch 'images' must be [B, V, 3, H, W], got {tuple(images.shape)}")
    images = images.to(device, non_blocking=True)
    out = {"images": to_input(images)}
    if with_superpixels:
        if "superpixels" in batch:
            superpixels = batch["superpixels"].to(device, non_blocking=True)
        elif provider is not None:
            b, v, c, h, w = images.shape
            superpixels = provider.batch(to_unit(images.reshape(b * v, c, h, w))).reshape(b, v, h, w)
        else:
            raise ValueError("batch has no 'superpixels' and no provider was given to compute them")
        out["superpixels"] = superpixels.long()
    for name in ("label", "mask"):
        if name in batch:
            out[name] = batch[name].to(device, non_blocking=True)
    return out
