"""Per-level pixel segmentations from a forward result (argmax chain over the assignment logits)."""

from __future__ import annotations

import torch

from cast.models.cast import CASTOutput
from cast.models.fusion import chain_assignments


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
    superpixels = superpixels.long()
    num_tokens = output.logits[0].shape[1]
    if superpixels.dim() != 3 or superpixels.shape[0] != output.logits[0].shape[0]:
        raise ValueError(
            f"hierarchy: superpixels must be [B, H, W] for the same batch, got {tuple(superpixels.shape)}"
        )
    if int(superpixels.max()) >= num_tokens:
        raise ValueError(
            f"hierarchy: superpixel label {int(superpixels.max())} has no token "
            f"(the model made {num_tokens}); "
            "in compat mode the original drops the largest labels lost by nearest snapping"
        )
    labels = torch.stack(chain_assignments(output.logits), dim=1)  # [B, L, N_1]
    batch, levels, _ = labels.shape
    flat = superpixels.flatten(1).unsqueeze(1).expand(-1, levels, -1)
    return torch.gather(labels, 2, flat).view(batch, levels, *superpixels.shape[1:])
