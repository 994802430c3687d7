"""Superpixel tokens: average stem features and positions within each superpixel (CAST step 2-5).

Three ways to map the pixel-level superpixel map onto the stride-8 feature grid:
- ``nearest``: the original classification/pretraining path. Labels are nearest-resized to the grid, which
  reads the top-left pixel of each cell; a superpixel that owns no top-left pixel becomes a padded token.
- ``area``: every grid cell contributes to each superpixel in proportion to the pixels they share, so every
  superpixel in the map gets a token; cost stays at grid resolution.
- ``bilinear``: the original dense path. Features are bilinearly and positions bicubically upsampled to the
  superpixel map's resolution, then averaged per pixel ([B, H, W, C] in memory).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.profiler import record_function

from cast.models.positions import resize_table
from cast.models.segment_ops import segment_mean

TOKEN_POOLING_MODES = ("nearest", "area", "bilinear")


def snap_to_grid(superpixels: torch.Tensor, grid_hw: tuple[int, int]) -> torch.Tensor:
    """Nearest resize [B, H, W] -> [B, h, w] exactly as ``F.interpolate(mode='nearest')`` does."""
    return F.interpolate(superpixels[:, None].float(), size=grid_hw, mode="nearest")[:, 0].long()


def _area_pairs(superpixels: torch.Tensor, grid_hw: tuple[int, int], num_segments: int):
    """(flat cell index into B*G, flat segment index into B*S, pixel count) for every overlapping pair."""
    batch, height, width = superpixels.shape
    grid_h, grid_w = grid_hw
    device = superpixels.device
    rows = torch.arange(height, device=device) * grid_h // height
    cols = torch.arange(width, device=device) * grid_w // width
    cells = (rows[:, None] * grid_w + cols[None, :]).expand(batch, -1, -1)
    num_cells = grid_h * grid_w
    image = torch.arange(batch, device=device)[:, None, None]
    keys = (image * num_segments + superpixels) * num_cells + cells
    pairs, pixel_counts = torch.unique(keys.reshape(-1), return_counts=True)
    flat_segment = pairs // num_cells
    flat_cell = (flat_segment // num_segments) * num_cells + pairs % num_cells
    return flat_cell, flat_segment, pixel_counts


def _area_weights(superpixels: torch.Tensor, grid_hw: tuple[int, int], num_segments: int) -> torch.Tensor:
    """Pixels each segment shares with each grid cell, dense [B, S, G]: static shapes, no ``unique``."""
    batch, height, width = superpixels.shape
    grid_h, grid_w = grid_hw
    device = superpixels.device
    rows = torch.arange(height, device=device) * grid_h // height
    cols = torch.arange(width, device=device) * grid_w // width
    cells = rows[:, None] * grid_w + cols[None, :]
    num_cells = grid_h * grid_w
    image = torch.arange(batch, device=device)[:, None, None]
    keys = ((image * num_segments + superpixels) * num_cells + cells).reshape(-1)
    ones = torch.ones(keys.shape[0], device=device)
    weights = ones.new_zeros(batch * num_segments * num_cells).index_add_(0, keys, ones)
    return weights.view(batch, num_segments, num_cells)


def superpixel_tokens(
    features: torch.Tensor,
    pos_table: torch.Tensor,
    pos_grid: tuple[int, int],
    superpixels: torch.Tensor,
    mode: str = "nearest",
    count_labels_on_grid: bool = False,
    num_segments: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Tokens [B, S, C] (feature mean + position mean) and per-token support [B, S] (0 = padded).

    features: stem output [B, h, w, C]; pos_table: [G0, C] on the ``pos_grid`` it was made for (resized
    bicubically when the grid differs); superpixels: int64 [B, H, W], labels 0..S-1 per image.
    Token i is superpixel label i. S = max label + 1 over the batch; with ``count_labels_on_grid`` (the
    original's behaviour in nearest mode) it is counted after snapping, so a label lost by snapping that
    happens to be the largest gets no token at all. A fixed ``num_segments`` (the token budget; labels must
    be below it) makes every shape static: no host sync, one graph for ``torch.compile``.
    """
    if mode not in TOKEN_POOLING_MODES:
        raise ValueError(f"token pooling mode {mode!r} is not one of {TOKEN_POOLING_MODES}")
    batch, grid_h, grid_w, channels = features.shape
    features, pos_table = features.float(), pos_table.float()  # positions lose digits in bf16
    with record_function("cast.segment_ops"):
        if mode == "bilinear":
            size = tuple(superpixels.shape[-2:])
            pixels = F.interpolate(
                features.permute(0, 3, 1, 2), size=size, mode="bilinear", align_corners=False
            )
            pixels = pixels.permute(0, 2, 3, 1) + resize_table(pos_table, pos_grid, size)
            if num_segments is None:
                num_segments = int(superpixels.max()) + 1
            return segment_mean(pixels.reshape(batch, -1, channels), superpixels.flatten(1), num_segments)
        values = features + resize_table(pos_table, pos_grid, (grid_h, grid_w))
        if mode == "nearest":
            labels = snap_to_grid(superpixels, (grid_h, grid_w))
            if num_segments is None:
                num_segments = int((labels if count_labels_on_grid else superpixels).max()) + 1
            return segment_mean(values.reshape(batch, -1, channels), labels.flatten(1), num_segments)
        if num_segments is not None:
            weights = _area_weights(superpixels, (grid_h, grid_w), num_segments)
            counts = weights.sum(-1)
            sums = torch.bmm(weights, values.reshape(batch, -1, channels))
            return sums / counts.masked_fill(counts == 0, 1.0).unsqueeze(-1), counts
        num_segments = int(superpixels.max()) + 1
        cells, segments, weights = _area_pairs(superpixels, (grid_h, grid_w), num_segments)
        tokens, counts = segment_mean(
            values.reshape(1, -1, channels)[:, cells], segments[None], batch * num_segments, weights[None]
        )
        return tokens.view(batch, num_segments, channels), counts.view(batch, num_segments)
