"""Position tables on the token grid: fixed 2D sin-cos (MoCo-v3) and resizing to another grid."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def sincos_2d_table(grid_h: int, grid_w: int, dim: int, temperature: float = 10000.0) -> torch.Tensor:
    """[grid_h * grid_w, dim] table; row-major cells, cell (r, c) -> [sin(r w), cos(r w), sin(c w), cos(c w)].

    w_k = temperature^(-k / (dim / 4)). This is the layout of the released MoCo checkpoints' ``pos_embed``.
    """
    if dim % 4:
        raise ValueError(f"sin-cos position table: dim={dim} must be divisible by 4")
    quarter = dim // 4
    omega = 1.0 / temperature ** (torch.arange(quarter, dtype=torch.float32) / quarter)
    rows, cols = torch.meshgrid(
        torch.arange(grid_h, dtype=torch.float32), torch.arange(grid_w, dtype=torch.float32), indexing="ij"
    )
    rows = rows.reshape(-1, 1) * omega
    cols = cols.reshape(-1, 1) * omega
    return torch.cat([rows.sin(), rows.cos(), cols.sin(), cols.cos()], dim=1)


def resize_table(table: torch.Tensor, src_hw: tuple[int, int], dst_hw: tuple[int, int]) -> torch.Tensor:
    """Bicubic resize (align_corners=False) of a [G, C] grid table to [dst_h, dst_w, C]."""
    grid = table.reshape(1, src_hw[0], src_hw[1], -1)
    if tuple(src_hw) == tuple(dst_hw):
        return grid[0]
    grid = F.interpolate(grid.permute(0, 3, 1, 2), size=dst_hw, mode="bicubic", align_corners=False)
    return grid[0].permute(1, 2, 0)
