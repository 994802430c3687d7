"""Frozen features of a model over labelled data, for kNN (and anything else that wants embeddings).

Takes any iterable of batch dicts in the project's contract (``images`` [B, V, 3, H, W] ImageNet-normalised,
``superpixels`` [B, V, H, W] unless an on-device provider computes them, ``label`` [B], ``key``), so it
works with ``cast.data.build_loader`` and with hand-made batches alike. Only the first view is used.

Distributed evaluation saves each worker's features as a part in storage (``write_features``) and
builds the kNN memory from all parts in one preallocated tensor (``FeatureBank``).
"""

from __future__ import annotations

import io
from collections.abc import Iterable
from dataclasses import dataclass, field

import fsspec
import torch
from tqdm import tqdm

from cast.data.batches import to_device
from cast.eval.knn import normalise_rows_
from cast.precision import autocast
from cast.storage import write_bytes
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


@dataclass(frozen=True)
class FeaturePart:
    """One worker's features of one data set in storage: where, how many rows, how wide."""

    url: str
    rows: int
    dim: int


def write_features(features: Features, url: str) -> FeaturePart:
    """Save ``features`` (embeddings, labels, keys) as one torch file at ``url``, atomically."""
    buffer = io.BytesIO()
    torch.save({"embeddings": features.embeddings.float().contiguous(), "labels": features.labels,
                "keys": list(features.keys)}, buffer)
    write_bytes(url, buffer.getvalue())
    return FeaturePart(url, len(features), int(features.embeddings.shape[1]) if len(features) else 0)


def read_features(url: str) -> Features:
    """A feature part written by ``write_features`` (``weights_only`` load: tensors and strings only)."""
    with fsspec.open(url, "rb") as handle:
        record = torch.load(io.BytesIO(handle.read()), map_location="cpu", weights_only=True)
    return Features(record["embeddings"], record["labels"], list(record["keys"]))


@dataclass
class FeatureBank:
    """Every part of a data set's features in one preallocated, row-normalised tensor on ``device``.

    Parts are read one at a time and copied into their rows, so host memory holds at most one part
    beside the bank (on a GPU the bank itself lives in device memory): the bank is never held twice.
    """

    embeddings: torch.Tensor  # float32 [N, D], unit rows
    labels: torch.Tensor      # int64 [N]
    keys: list[str]

    @classmethod
    def load(cls, parts: list[FeaturePart], device: str | torch.device = "cpu") -> FeatureBank:
        rows = sum(part.rows for part in parts)
        dims = {part.dim for part in parts if part.rows}
        if len(dims) != 1:
            raise ValueError(f"feature bank: parts must hold rows of one width, got {sorted(dims)} in "
                             f"{[part.url for part in parts]}")
        embeddings = torch.empty(rows, dims.pop(), dtype=torch.float32, device=device)
        labels = torch.empty(rows, dtype=torch.long, device=device)
        keys: list[str] = []
        start = 0
        for part in parts:
            if not part.rows:
                continue
            features = read_features(part.url)
            if len(features) != part.rows:
                raise ValueError(f"{part.url}: holds {len(features)} rows, expected {part.rows}")
            block = embeddings[start:start + part.rows]
            block.copy_(features.embeddings)
            normalise_rows_(block)
            labels[start:start + part.rows].copy_(features.labels)
            keys.extend(features.keys)
            start += part.rows
        return cls(embeddings, labels, keys)

    def __len__(self) -> int:
        return self.labels.numel()
