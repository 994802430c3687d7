"""BlockFusion for the dense variants: unpool every level's tokens to the superpixel tokens and project.

Level-l tokens reach level-1 tokens through the chain of hard argmax assignments (no gradient flows into
the assignment logits, as in the original). The concatenated [cls; tokens] rows go through
BatchNorm1d(L*C) -> Dropout -> Linear(L*C, C); the cls row shares the batch statistics. Padded superpixel
tokens are left out of the batch statistics unless ``padding_mask`` is None (compat), by weights rather
than indexing (``masked_batch_norm``), so the shapes stay static.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.profiler import record_function

from cast.models.graph_pool import gather_tokens


def chain_assignments(logits: list[torch.Tensor]) -> list[torch.Tensor]:
    """Cluster index per level-1 token for every level: [argmax(l1), argmax(l2)[argmax(l1)], ...]."""
    labels = [logits[0].argmax(dim=-1)]
    for level_logits in logits[1:]:
        labels.append(torch.gather(level_logits.argmax(dim=-1), 1, labels[-1]))
    return labels


def masked_batch_norm(norm: nn.BatchNorm1d, flat: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """``norm`` over the ``valid`` rows of ``flat`` [N, C] only (batch statistics and running-stat update
    as BatchNorm1d would compute on ``flat[valid]``); padded rows come out as zeros.

    Static shapes (no boolean indexing, so no host sync and one compiled graph) for a plain BatchNorm1d
    in training mode; in eval mode BatchNorm is per row anyway. A SyncBatchNorm (or a cumulative /
    stat-less one) takes the indexed path: its statistics come from its own forward.
    """
    keep = valid.unsqueeze(1)
    if not norm.training:
        return norm(flat) * keep.to(flat.dtype)
    if type(norm) is not nn.BatchNorm1d or not norm.track_running_stats or norm.momentum is None:
        rows = norm(flat[valid])
        return rows.new_zeros(flat.shape).index_put((valid,), rows)
    x = flat.float()
    weights = keep.float()
    count = weights.sum()
    mean = (x * weights).sum(0) / count
    var = ((x - mean).square() * weights).sum(0) / count
    with torch.no_grad():
        norm.running_mean.lerp_(mean, norm.momentum)
        norm.running_var.lerp_(var * count / (count - 1).clamp_min(1), norm.momentum)
        norm.num_batches_tracked.add_(1)
    out = (x - mean) * torch.rsqrt(var + norm.eps)
    if norm.affine:
        out = out * norm.weight + norm.bias
    return (out * weights).to(flat.dtype)


class BlockFusion(nn.Module):
    def __init__(self, dim: int, num_levels: int, dropout: float = 0.2):
        super().__init__()
        self.norm = nn.BatchNorm1d(dim * num_levels)
        self.drop = nn.Dropout(dropout)
        self.proj = nn.Linear(dim * num_levels, dim)

    def forward(
        self,
        tokens: list[torch.Tensor],
        cls: list[torch.Tensor],
        logits: list[torch.Tensor],
        padding_mask: torch.Tensor | None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """tokens: L stage outputs [B, N_l, C]; cls: L cls tokens [B, 1, C] (after each pooling);
        logits: the first L-1 assignment logits. Returns fused tokens [B, N_1, C] and fused cls [B, C]."""
        with record_function("cast.fusion"):
            labels = chain_assignments(logits[: len(tokens) - 1])
            unpooled = [tokens[0]] + [gather_tokens(t, lab) for t, lab in zip(tokens[1:], labels)]
            rows = torch.cat([torch.cat(cls, dim=-1), torch.cat(unpooled, dim=-1)], dim=1)
            batch, length, width = rows.shape
            flat = rows.reshape(-1, width)
            if padding_mask is None:
                normed = self.norm(flat)
            else:
                valid = torch.cat([padding_mask.new_zeros(batch, 1), padding_mask], dim=1).logical_not()
                normed = masked_batch_norm(self.norm, flat, valid.reshape(-1))
            out = self.proj(self.drop(normed)).view(batch, length, -1)
            return out[:, 1:], out[:, 0]
