"""From superpixel tokens back to pixels: per-level segmentations and per-pixel features."""

from __future__ import annotations

import torch

from cast.models.cast import CASTOutput
from cast.models.fusion import chain_assignments


def paint_superpixels(values: torch.Tensor, superpixels: torch.Tensor) -> torch.Tensor:
    """Give every pixel its superpixel's value: values [B, N, *D] (token i = label i) and superpixels
    [B, H, W] -> [B, H, W, *D]. Used to turn dense per-superpixel outputs into pixel maps."""
    batch, num_tokens = values.shape[:2]
    if superpixels.dim() != 3 or superpixels.shape[0] != batch:
        raise ValueError(
            f"superpixels must be [B, H, W] for a batch of {batch}, got {tuple(superpixels.shape)}"
        )
    if int(superpixels.max()) >= num_tokens:
        raise ValueError(
            f"superpixel label {int(superpixels.max())} has no token (there are {num_tokens}); in compat "
            "mode the original drops the largest labels lost by nearest snapping"
        )
    flat = values.reshape(batch, num_tokens, -1)
    index = superpixels.long().reshape(batch, -1, 1).expand(-1, -1, flat.shape[-1])
    return torch.gather(flat, 1, index).view(*superpixels.shape, *values.shape[2:])


@torch.no_grad()
def hierarchy(output: CASTOutput, superpixels: torch.Tensor) -> torch.Tensor:
    """Pixel labels [B, L, H, W] (int64) for every level whose assignment logits ``output`` holds.

    Level l gives each superpixel the argmax cluster chained through levels 1..l, then paints it through
    the full-resolution superpixel map, so segment borders are superpixel borders. Each seed token is its
    own cluster's best match, so level l has exactly K_l segments. Run ``forward_features(...,
    segmentation=True)`` to get all levels; otherwise the last level is missing.
    """
    if not output.logits:
        raise ValueError("hierarchy: the output holds no assignment logits")
    labels = torch.stack(chain_assignments(output.logits), dim=-1)  # [B, N_1, L]
    return paint_superpixels(labels, superpixels).permute(0, 3, 1, 2).contiguous()
