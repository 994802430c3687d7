"""Graph pooling: group N tokens into K clusters around farthest-point seeds (CAST, section 2 step 7).

Per call: FPS picks K seed tokens; ``centroid_fc`` (residual attention, token-mean centring, learned bias)
gives node features; logits = scale * cos(node, seed node); softmax assignments average the fc1 hidden
features per cluster; fc2 plus the seed token's residual gives the next tokens, and the cls token is updated
by the same MLP. Padded tokens are excluded from attention, means and cluster averages unless ``compat``.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn
from torch.profiler import record_function

from cast.models.blocks import Attention
from cast.models.fps import sample_seeds
from cast.models.segment_ops import masked_mean


class PoolResult(NamedTuple):
    cls: torch.Tensor  # [B, 1, C]
    tokens: torch.Tensor  # [B, K, C]
    logits: torch.Tensor  # [B, N, K]
    seeds: torch.Tensor  # [B, K] indices into the input tokens


class CentroidAttention(nn.Module):
    """x + Attn(LN(x)), centred by the token mean, plus a learned bias (no MLP)."""

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True):
        super().__init__()
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, num_heads, qkv_bias)
        self.bias = nn.Parameter(torch.empty(dim).normal_(0, 1e-2))

    def forward(self, x: torch.Tensor, padding_mask: torch.Tensor | None) -> torch.Tensor:
        x = x + self.attn(self.norm(x), padding_mask)
        return x - masked_mean(x, padding_mask).unsqueeze(1) + self.bias


def gather_tokens(tokens: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """tokens [B, N, C] at index [B, K] -> [B, K, C]."""
    return torch.gather(tokens, 1, index.unsqueeze(-1).expand(-1, -1, tokens.shape[-1]))


class GraphPooling(nn.Module):
    def __init__(
        self,
        dim: int,
        num_clusters: int,
        num_heads: int,
        qkv_bias: bool = True,
        dropout: float = 0.1,
        logit_scale: float = 5.0,
        mlp_ratio: float = 4.0,
    ):
        super().__init__()
        hidden = int(dim * mlp_ratio)
        self.num_clusters = num_clusters
        self.logit_scale = logit_scale
        self.centroid_fc = CentroidAttention(dim, num_heads, qkv_bias)
        # LayerNorm eps is torch's default 1e-5 here (the original uses plain nn.LayerNorm for fc1/fc2).
        self.fc1 = nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, hidden), nn.GELU(), nn.Dropout(dropout))
        self.fc2 = nn.Sequential(nn.LayerNorm(hidden), nn.Linear(hidden, dim))

    def update_cls(self, cls: torch.Tensor) -> torch.Tensor:
        """The cls path alone: it never depends on the clustering, so it can run without FPS."""
        return cls + self.fc2(self.fc1(cls))

    def forward(
        self, cls: torch.Tensor, tokens: torch.Tensor, padding_mask: torch.Tensor | None, compat: bool = False
    ) -> PoolResult:
        """cls [B, 1, C], tokens [B, N, C], padding_mask [B, N] (True = padded) or None.

        ``compat`` reproduces the original exactly: float64 FPS (as dgl) and padded tokens left unmasked in
        attention, centring and cluster averages (FPS masks them in both modes, as the original does).
        """
        with record_function("cast.graph_pool"):
            with record_function("cast.fps"):
                seeds = sample_seeds(tokens, padding_mask, self.num_clusters, exact=compat)
            mask = None if compat else padding_mask
            nodes = self.centroid_fc(tokens, mask)
            seed_nodes = gather_tokens(nodes, seeds)
            # float32 even under autocast: in bf16 a seed's cos of 1 ties with near-parallel tokens, and the
            # argmax hierarchy would lose segments
            with torch.autocast(nodes.device.type, enabled=False):
                unit_nodes = F.normalize(nodes.float(), dim=-1)
                unit_seeds = F.normalize(seed_nodes.float(), dim=-1)
                logits = self.logit_scale * torch.bmm(unit_nodes, unit_seeds.transpose(1, 2))
            assignments = logits.softmax(dim=-1)
            if mask is not None:
                assignments = assignments * (~mask).unsqueeze(-1).to(assignments.dtype)
            hidden = self.fc1(torch.cat([cls, tokens], dim=1))
            cluster_hidden = torch.bmm(assignments.transpose(1, 2), hidden[:, 1:])
            cluster_hidden = cluster_hidden / assignments.sum(dim=1).unsqueeze(-1)
            out = self.fc2(torch.cat([hidden[:, :1], cluster_hidden], dim=1))
            return PoolResult(
                cls=cls + out[:, :1],
                tokens=out[:, 1:] + gather_tokens(tokens, seeds),
                logits=logits,
                seeds=seeds,
            )
