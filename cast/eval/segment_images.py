"""Hierarchical segmentation of arbitrary images with a CAST model: label maps and overlay pictures.

Per image: the centre view at the model's input size, SEEDS superpixels on that view at full resolution,
``forward_features(..., segmentation=True)`` and ``hierarchy``; then per level a label map (PNG + one
``.npy`` for all levels) and one overlay PNG of the image beside its levels.
"""

from __future__ import annotations

import json
import posixpath
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import fsspec
import numpy as np
import torch
from tqdm import tqdm

from cast.data.transforms import views_to_input
from cast.eval.images import NamedImage, centre_view
from cast.models import hierarchy
from cast.superpixels import SuperpixelProvider
from cast.viz import save_label_maps, save_overlay

MANIFEST = "segments.json"


@dataclass
class SegmentedOutput:
    name: str
    overlay: str
    label_maps: list[str]
    segments_per_level: list[int]


def _batches(images: Iterable[NamedImage], size: int) -> Iterator[list[NamedImage]]:
    batch: list[NamedImage] = []
    for image in images:
        batch.append(image)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


@torch.no_grad()
def predict_hierarchy(model, views: np.ndarray, provider: SuperpixelProvider,
                      device: str | torch.device) -> np.ndarray:
    """Per-level segment maps int64 [B, L, H, W] of uint8 views [B, H, W, 3]."""
    superpixels = torch.from_numpy(np.stack([provider(view) for view in views])).long()
    images = views_to_input(views).to(device)
    superpixels = superpixels.to(device)
    output = model.forward_features(images, superpixels, segmentation=True)
    return hierarchy(output, superpixels).cpu().numpy()


def segment_images(
    model,
    images: Iterable[NamedImage],
    out_dir: str,
    provider: SuperpixelProvider,
    *,
    size: int,
    levels: list[int] | None = None,
    batch_size: int = 8,
    device: str | torch.device = "cpu",
    total: int | None = None,
    progress: bool = True,
    overlay_options: dict | None = None,
) -> list[SegmentedOutput]:
    """Segment every image and write ``out_dir/overlays/<name>.png``, ``out_dir/labels/<name>_level<l>.png``
    and ``out_dir/labels/<name>_levels.npy`` (the chosen ``levels``, 1-based; default all), plus a
    ``segments.json`` manifest. ``size`` must be divisible by 8."""
    if size % 8:
        raise ValueError(f"segment_images: size {size} must be divisible by 8 (the stem's stride)")
    num_levels = len(model.config.num_clusters)
    bad = [level for level in levels or [] if not 1 <= level <= num_levels]
    if bad:
        raise ValueError(f"segment_images: level(s) {bad} outside 1..{num_levels} of {type(model).__name__}")
    chosen = levels or list(range(1, num_levels + 1))
    model.eval().to(device)
    overlay_options = {"min_panel_size": 192, **(overlay_options or {})}
    written: list[SegmentedOutput] = []
    bar = tqdm(total=total, unit="img", desc="segment", disable=not progress)
    for batch in _batches(images, batch_size):
        views = np.stack([centre_view(item.image, size) for item in batch])
        maps = predict_hierarchy(model, views, provider, device)
        for item, view, item_maps in zip(batch, views, maps):
            selected = item_maps[[level - 1 for level in chosen]]
            overlay = posixpath.join(out_dir, "overlays", f"{item.name}.png")
            save_overlay(overlay, view, selected, level_numbers=chosen, **overlay_options)
            label_maps = save_label_maps(posixpath.join(out_dir, "labels"), item.name, selected, chosen)
            counts = [len(np.unique(level_map)) for level_map in selected]
            written.append(SegmentedOutput(item.name, overlay, label_maps, counts))
        bar.update(len(batch))
    bar.close()
    manifest = {"size": size, "levels": chosen, "images": [vars(entry) for entry in written]}
    with fsspec.open(posixpath.join(out_dir, MANIFEST), "w") as handle:
        json.dump(manifest, handle, indent=1)
    return written
