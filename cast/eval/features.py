"""Frozen features of a model over labelled data, for kNN (and anything else that wants embeddings).

Takes any iterable of batch dicts in the project's contract (``images`` [B, V, 3, H, W] ImageNet-normalised,
``superpixels`` [B, V, H, W] unless an on-device provider computes them, ``label`` [B], ``key``), so it
works with ``cast.data.build_loader`` and with hand-made batches alike. Only the first view is used.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

import torch
from tqdm import tqdm

from cast.data.batches import to_device
from cast.precision import autocast
from cast.superpixels import SuperpixelProvider


@dataclass
class Features:
    embeddings: torch.Tensor  # float32 [N, C], on CPU
    labels: torch.Tensor      # int64 [N] (-1 where the data set has none)
    keys: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return self.labels.numel()


def batch_views(batch: dict, device: str | torch.device,
                provider: SuperpixelProvider | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(images [B, 3, H, W], superpixels [B, H, W]) of the first view, on ``device``."""
    on_device = to_device(batch, device, provider)
    return on_device["images"][:, 0], on_device["superpixels"][:, 0]


@torch.no_grad()
def extract_features(
    model,
    batches: Iterable[dict],
    *,
    device: str | torch.device = "cpu",
    provider: SuperpixelProvider | None = None,
    max_batches: int | None = None,
    amp: bool = True,
    progress: bool = True,
    desc: str = "features",
) -> Features:
    """The image embeddings (``forward_features(...).embedding``) of every sample, model in eval mode."""
    device = torch.device(device)
    model.eval().to(device)
    embeddings, labels, keys = [], [], []
    for index, batch in enumerate(tqdm(batches, desc=desc, unit="batch", disable=not progress)):
        if max_batches is not None and index >= max_batches:
            break
        images, superpixels = batch_views(batch, device, provider)
        with autocast(device, amp):
            output = model.forward_features(images, superpixels)
        embeddings.append(output.embedding.float().cpu())
        labels.append(batch["label"].long().cpu())
        keys.extend(batch.get("key", []))
    if not embeddings:
        raise ValueError("extract_features: the data yielded no batch")
    return Features(torch.cat(embeddings), torch.cat(labels), keys)
