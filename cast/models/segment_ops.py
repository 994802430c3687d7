"""Segment reductions on native torch ops (no torch-scatter).

``index_add_`` measured ~10x faster than ``scatter_mean`` on CPU and needs no compiled
extension. Sums are taken in float32 even under autocast: a bf16 running sum over many pixels loses digits.
"""

from __future__ import annotations

import torch


def segment_sum(
    values: torch.Tensor, segment_ids: torch.Tensor, num_segments: int, weights: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-image segment sums and (weighted) counts.

    values: [B, P, C]; segment_ids: [B, P] int64 in [0, num_segments); weights: optional [B, P].
    Returns sums [B, S, C] (float32) and counts [B, S] (float32, sum of weights per segment).
    """
    if values.dim() != 3 or segment_ids.shape != values.shape[:2]:
        raise ValueError(
            f"segment_sum expects values [B, P, C] and segment_ids [B, P]; got {tuple(values.shape)} "
            f"and {tuple(segment_ids.shape)}"
        )
    batch, points, channels = values.shape
    offsets = torch.arange(batch, device=segment_ids.device).unsqueeze(1) * num_segments
    flat_ids = (segment_ids + offsets).reshape(-1)
    flat_values = values.reshape(-1, channels).float()
    flat_weights = None
    if weights is not None:
        flat_weights = weights.reshape(-1).float()
        flat_values = flat_values * flat_weights.unsqueeze(1)
    sums = flat_values.new_zeros(batch * num_segments, channels).index_add_(0, flat_ids, flat_values)
    # index_add_ rather than bincount: bincount's output length depends on the data (no static graph)
    ones = flat_values.new_ones(flat_ids.shape[0]) if flat_weights is None else flat_weights
    counts = ones.new_zeros(batch * num_segments).index_add_(0, flat_ids, ones)
    return sums.view(batch, num_segments, channels), counts.view(batch, num_segments)


def segment_mean(
    values: torch.Tensor, segment_ids: torch.Tensor, num_segments: int, weights: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-image (weighted) segment means; empty segments get zeros, as in the original CAST.

    Returns means [B, S, C] (float32) and counts [B, S]; ``counts == 0`` marks padded segments.
    """
    sums, counts = segment_sum(values, segment_ids, num_segments, weights)
    return sums / counts.masked_fill(counts == 0, 1.0).unsqueeze(-1), counts


def masked_mean(x: torch.Tensor, padding_mask: torch.Tensor | None, dim: int = 1) -> torch.Tensor:
    """Mean over ``dim`` of x [B, N, C] that skips padded rows (padding_mask [B, N], True = padded).

    With ``padding_mask=None`` it is the plain mean. The count is clamped at 1 so an all-padded row gives 0.
    """
    if padding_mask is None:
        return x.mean(dim=dim)
    valid = (~padding_mask).to(x.dtype).unsqueeze(-1)
    return (x * valid).sum(dim=dim) / valid.sum(dim=dim).clamp_min(1)
