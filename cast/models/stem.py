"""Convolutional stem with output stride 8 (Xiao et al., "Early convolutions help transformers see")."""

from __future__ import annotations

import torch
from torch import nn


class ConvStem(nn.Module):
    """Four 3x3 conv-BN-ReLU layers (C/8, C/4, C/2, C; strides 2, 2, 2, ``last_stride``) and a 1x1 conv.

    CAST uses ``last_stride=1`` (stride 8: a 224 image gives a 28x28 token grid); the ViT baselines use 2
    (stride 16) with identical parameters. The layers sit in one ``Sequential`` whose indices match the
    released checkpoints (``patch_embed.proj.{0..12}``). Returns channels-last features [B, H/s, W/s, C].
    """

    def __init__(self, embed_dim: int, in_chans: int = 3, last_stride: int = 1):
        super().__init__()
        if embed_dim % 8:
            raise ValueError(f"ConvStem: embed_dim={embed_dim} must be divisible by 8")
        layers: list[nn.Module] = []
        in_dim, out_dim = in_chans, embed_dim // 8
        for index in range(4):
            stride = 2 if index < 3 else last_stride
            layers += [
                nn.Conv2d(in_dim, out_dim, kernel_size=3, stride=stride, padding=1, bias=False),
                nn.BatchNorm2d(out_dim),
                nn.ReLU(inplace=True),
            ]
            in_dim, out_dim = out_dim, out_dim * 2
        layers.append(nn.Conv2d(in_dim, embed_dim, kernel_size=1))
        self.proj = nn.Sequential(*layers)
        self.stride = 8 * last_stride

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        height, width = images.shape[-2:]
        if height % self.stride or width % self.stride:
            raise ValueError(
                f"ConvStem: image size {height}x{width} must be divisible by the stem stride {self.stride}"
            )
        if images.is_cuda:  # NHWC convolutions (tensor cores in bf16/fp16), and the permute below is free
            images = images.contiguous(memory_format=torch.channels_last)
        return self.proj(images).permute(0, 2, 3, 1)
