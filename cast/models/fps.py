"""Batched farthest-point sampling in plain torch (replaces dgl's ``farthest_point_sampler``).

Semantics follow dgl: squared Euclidean distances, a fixed start index, and on ties the lowest index wins
(``argmax`` returns the first maximum). ``argmax`` rather than ``Tensor.max(dim)``: the latter is slow
with 2 threads in torch 2.14 on CPU. All pairwise distances come from one Gram matrix
(|a|^2 + |b|^2 - 2ab), so each of the K steps only reads one row: measured ~20-50x faster on CPU than
recomputing coordinate differences every step (dgl's way), for the same picks up to rounding.
"""

from __future__ import annotations

import torch

from cast.models.segment_ops import masked_mean


@torch.no_grad()
def farthest_point_sampling(points: torch.Tensor, num_samples: int, start_index: int = 0) -> torch.Tensor:
    """Indices [B, num_samples] of farthest points in ``points`` [B, N, C], starting at ``start_index``."""
    batch, num_points, _ = points.shape
    if not 0 < num_samples <= num_points:
        raise ValueError(f"farthest_point_sampling: num_samples={num_samples} must be in [1, {num_points}]")
    # autocast would run the Gram bmm in bf16/fp16 and change the picks; distances stay in the input dtype
    with torch.autocast(points.device.type, enabled=False):
        norms = points.square().sum(-1)
        pairwise = norms.unsqueeze(2) + norms.unsqueeze(1) - 2 * torch.bmm(points, points.transpose(1, 2))
    pairwise = pairwise.clamp_min_(0)
    rows = torch.arange(batch, device=points.device)
    farthest = torch.full((batch,), start_index, dtype=torch.long, device=points.device)
    min_dist = torch.full((batch, num_points), float("inf"), dtype=points.dtype, device=points.device)
    picked = [farthest]
    for _ in range(num_samples - 1):
        min_dist = torch.minimum(min_dist, pairwise[rows, farthest])
        farthest = min_dist.argmax(dim=1)
        picked.append(farthest)
    return torch.stack(picked, dim=1)


@torch.no_grad()
def sample_seeds(
    tokens: torch.Tensor, padding_mask: torch.Tensor | None, num_seeds: int, exact: bool = False
) -> torch.Tensor:
    """Seed token indices [B, num_seeds] by FPS started from the mean token, as CAST does.

    The mean of the valid tokens is prepended and used as the start point, so the first seed is the token
    farthest from the mean; padded tokens are replaced by that mean (distance 0), so they are never picked
    while a valid token remains. ``exact`` works in float64 like dgl (checkpoint parity); otherwise float32,
    whatever the autocast around it (under bf16 autocast most of the 64 stage-1 picks would change).
    """
    mean = masked_mean(tokens, padding_mask).unsqueeze(1)
    filled = tokens if padding_mask is None else torch.where(padding_mask.unsqueeze(-1), mean, tokens)
    points = torch.cat([mean, filled], dim=1).to(torch.float64 if exact else torch.float32)
    picks = farthest_point_sampling(points, num_seeds + 1, start_index=0)[:, 1:] - 1
    # an image with fewer valid tokens than seeds ends up re-picking the mean (-1): token 0 instead, so the
    # forward stays free of host checks (the loader rejects such maps; see cast.data.reader)
    return picks.clamp_min(0)
