"""Batched SLIC in plain torch, for a whole batch on the training device.

On a GPU node this removes superpixels from the data loader altogether: at 224x224 with 10
iterations it costs ~64 MFLOP per view, ~1 % of a CAST-S forward pass. On a CPU it is slower
than SEEDS (reference/superpixel_calibration.md), so CPU training should use ``seeds_fast``.

Algorithm (Achanta et al.'s SLIC, restricted to the 3x3 neighbouring grid cells): pixels get
features (L, a, b, y * m / S, x * m / S); centres start as the means of a regular grid of
cells; each iteration assigns every pixel to the nearest of the 9 centres around its own cell
and moves the centres to the means of their pixels (``index_add_``). Labels are the centre
indices, relabelled to ``0..K-1`` per image. Every step is batched, nothing reads values
back to the host and nothing is copied to the device, so on CUDA the whole call queues
asynchronously (``tests/test_superpixels.py`` runs it on the meta device to prove it).
"""

from __future__ import annotations

import dataclasses
import math
from typing import ClassVar

import numpy as np
import torch
import torch.nn.functional as F

from cast.superpixels.base import (
    SuperpixelProvider,
    check_images01,
    check_uint8_image,
    relabel_contiguous_batch,
)

# sRGB (D65) -> XYZ, rows pre-divided by the D65 white point so Lab needs no further scaling.
# Python floats, not a tensor: moving a CPU tensor to CUDA would block the host on every call.
_RGB_TO_XYZ_WHITE = [[coefficient / white for coefficient in row] for row, white in zip([
    [0.412453, 0.357580, 0.180423],
    [0.212671, 0.715160, 0.072169],
    [0.019334, 0.119193, 0.950227],
], [0.950456, 1.0, 1.088754])]
# Feature value of the fake centres beyond the grid border: far from every pixel.
_FAR = 1e4


def rgb_to_lab(images01: torch.Tensor) -> torch.Tensor:
    """sRGB ``[B, 3, H, W]`` in [0, 1] -> CIE Lab (L in 0..100), matching OpenCV's float conversion."""
    linear = torch.where(images01 > 0.04045, ((images01 + 0.055) / 1.055).pow(2.4), images01 / 12.92)
    red, green, blue = linear.unbind(1)
    xyz = torch.stack([r * red + g * green + b * blue for r, g, b in _RGB_TO_XYZ_WHITE], dim=1)
    f = torch.where(xyz > 0.008856, xyz.clamp_min(1e-12).pow(1 / 3), 7.787 * xyz + 16 / 116)
    fx, fy, fz = f.unbind(1)
    return torch.stack([116 * fy - 16, 500 * (fx - fy), 200 * (fy - fz)], dim=1)


def grid_shape(height: int, width: int, num_segments: int) -> tuple[int, int]:
    """Rows and columns of the initial centre grid: about ``num_segments`` square cells."""
    rows = max(1, min(height, round(math.sqrt(num_segments * height / width))))
    cols = max(1, min(width, round(num_segments / rows)))
    return rows, cols


@dataclasses.dataclass
class SlicTorchProvider(SuperpixelProvider):
    """SLIC for a batch on the images' device (eager torch: torch.compile measured no faster on CPU)."""

    name: ClassVar[str] = "slic_torch"
    on_device: ClassVar[bool] = True

    num_segments: int = 196
    compactness: float = 10.0
    iterations: int = 10

    def __post_init__(self) -> None:
        if not isinstance(self.num_segments, int) or self.num_segments < 1:
            raise ValueError(f"slic_torch: num_segments must be a positive integer, "
                             f"got {self.num_segments!r}")
        if not isinstance(self.iterations, int) or self.iterations < 1:
            raise ValueError(f"slic_torch: iterations must be an integer >= 1, got {self.iterations!r}")
        if not self.compactness > 0:
            raise ValueError(f"slic_torch: compactness must be > 0, got {self.compactness!r}")

    def __call__(self, image: np.ndarray) -> np.ndarray:
        check_uint8_image(image)
        images01 = torch.tensor(image).permute(2, 0, 1)[None].float() / 255
        return self.batch(images01)[0].numpy()

    def batch(self, images01: torch.Tensor) -> torch.Tensor:
        check_images01(images01)
        batch_size, _, height, width = images01.shape
        rows, cols = grid_shape(height, width, self.num_segments)
        cell_h, cell_w = -(-height // rows), -(-width // cols)
        rows, cols = -(-height // cell_h), -(-width // cell_w)  # no cell lies wholly in the padding
        labels = _slic(images01.float(), rows, cols, cell_h, cell_w, self.compactness, self.iterations)
        return relabel_contiguous_batch(labels, rows * cols).reshape(batch_size, height, width)


def _slic(images01: torch.Tensor, rows: int, cols: int, cell_h: int, cell_w: int, compactness: float,
          iterations: int) -> torch.Tensor:
    """Centre index per pixel, ``[B, H, W]`` int64 in ``0..rows*cols-1``.

    Pixels are grouped by grid cell (the image is zero-padded to whole cells; padded pixels are
    never counted), so each cell's distances to its 9 candidate centres are one small matmul
    (|C|^2 - 2 P.C; |P|^2 is the same for every candidate) instead of a per-pixel gather.
    """
    batch_size, _, height, width = images01.shape
    device = images01.device
    scale = compactness / math.sqrt(height * width / (rows * cols))
    ys = torch.arange(height, device=device, dtype=torch.float32)
    xs = torch.arange(width, device=device, dtype=torch.float32)
    features = torch.cat([
        rgb_to_lab(images01),
        (ys * scale).view(1, 1, height, 1).expand(batch_size, 1, height, width),
        (xs * scale).view(1, 1, 1, width).expand(batch_size, 1, height, width),
        images01.new_ones(batch_size, 1, height, width),
    ], dim=1)  # [B, 6, H, W]: five features and a constant 1 (for counts and for |C|^2)
    blocks = F.pad(features, (0, cols * cell_w - width, 0, rows * cell_h - height))
    blocks = blocks.view(batch_size, 6, rows, cell_h, cols, cell_w).permute(0, 2, 4, 3, 5, 1)
    blocks = blocks.reshape(batch_size, rows, cols, cell_h * cell_w, 6)
    values = features.permute(0, 2, 3, 1).reshape(batch_size * height * width, 6)
    # Global cell index of each pixel, and the index step to each of the 9 neighbouring cells.
    cell = (torch.arange(height, device=device) // cell_h)[:, None] * cols \
        + (torch.arange(width, device=device) // cell_w)[None, :]
    offsets = torch.arange(9, device=device)
    steps = (offsets // 3 - 1) * cols + offsets % 3 - 1  # built on the device: no host-to-device copy
    labels = cell.expand(batch_size, height, width)
    centres = _centre_means(values, labels, rows * cols, None)
    for _ in range(iterations):
        choice = _nearest_candidate(blocks, centres, rows, cols)  # [B, rows, cols, cell_h * cell_w]
        choice = choice.view(batch_size, rows, cols, cell_h, cell_w).permute(0, 1, 3, 2, 4)
        choice = choice.reshape(batch_size, rows * cell_h, cols * cell_w)[:, :height, :width]
        labels = cell + steps[choice]
        centres = _centre_means(values, labels, rows * cols, centres)
    return labels


def _nearest_candidate(blocks: torch.Tensor, centres: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    """Per pixel, which of the 9 centres around its cell (0..8, row-major offsets) is nearest."""
    grid = centres.view(centres.shape[0], rows, cols, 5).permute(0, 3, 1, 2)
    grid = F.pad(grid, (1, 1, 1, 1), value=_FAR)  # neighbours outside the grid are never nearest
    shifts = [grid[:, :, dy:dy + rows, dx:dx + cols] for dy in range(3) for dx in range(3)]
    candidates = torch.stack(shifts, -1)
    candidates = candidates.permute(0, 2, 3, 1, 4)  # [B, rows, cols, 5, 9]
    weights = torch.cat([-2 * candidates, candidates.square().sum(3, keepdim=True)], dim=3)
    return torch.matmul(blocks, weights).min(-1).indices


def _centre_means(values: torch.Tensor, labels: torch.Tensor, num_centres: int,
                  previous: torch.Tensor | None) -> torch.Tensor:
    """Mean features of each centre's pixels, ``[B, K, 5]``; an empty centre keeps its old place."""
    batch_size = labels.shape[0]
    offsets = torch.arange(batch_size, device=labels.device).view(-1, 1, 1) * num_centres
    sums = values.new_zeros(batch_size * num_centres, 6)
    sums.index_add_(0, (labels + offsets).reshape(-1), values)
    sums = sums.view(batch_size, num_centres, 6)
    counts = sums[..., 5:]
    means = sums[..., :5] / counts.clamp_min(1)
    if previous is None:
        return means
    return torch.where(counts > 0, means, previous)
