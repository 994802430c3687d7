"""Segmentation decoders over CAST's fused superpixel tokens, and the dense model that joins them.

Both decoders score superpixel tokens, not pixels: a class score per superpixel is painted onto its pixels
through the superpixel map (``paint_superpixels``), so the prediction follows superpixel boundaries.

- ``MaskTransformer`` (Segmenter, reference section 5.4): 2 blocks over [tokens; class embeddings], d = C,
  C/64 heads, FFN 4C, dropout 0.1; class masks = L2-normalised token features . L2-normalised class
  features, then LayerNorm over the classes.
- ``SoftmaxHead`` (SPML, section 5.6): 1x1 conv (no bias) -> BN -> ReLU -> 1x1 conv. A 1x1 convolution
  over painted pixels equals a Linear per superpixel; the one difference is BN statistics, which here weigh
  every valid superpixel once instead of by its pixel count.
No IO and no distributed code here.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from timm.layers import trunc_normal_
from torch import nn

from cast.models.blocks import TransformerBlock
from cast.models.cast import CAST
from cast.models.hierarchy import paint_superpixels

DECODERS = ("mask_transformer", "softmax")


class MaskTransformer(nn.Module):
    def __init__(self, num_classes: int, dim: int, depth: int = 2, num_heads: int | None = None,
                 mlp_ratio: float = 4.0, dropout: float = 0.1, drop_path: float = 0.0):
        super().__init__()
        self.num_classes = num_classes
        heads = num_heads or max(1, dim // 64)
        self.proj_dec = nn.Linear(dim, dim)
        self.cls_emb = nn.Parameter(torch.zeros(1, num_classes, dim))
        self.blocks = nn.ModuleList(
            TransformerBlock(dim, heads, mlp_ratio, True, drop_path, dropout) for _ in range(depth)
        )
        self.decoder_norm = nn.LayerNorm(dim)
        self.proj_patch = nn.Parameter(dim**-0.5 * torch.randn(dim, dim))
        self.proj_classes = nn.Parameter(dim**-0.5 * torch.randn(dim, dim))
        self.mask_norm = nn.LayerNorm(num_classes)
        for module in self.modules():
            if isinstance(module, nn.Linear):
                trunc_normal_(module.weight, std=0.02)
                nn.init.zeros_(module.bias)
        trunc_normal_(self.cls_emb, std=0.02)

    def forward(self, tokens: torch.Tensor, padding: torch.Tensor | None = None) -> torch.Tensor:
        """tokens [B, N, C], padding [B, N] (True = padded) -> class scores per token [B, N, K]."""
        batch, length = tokens.shape[:2]
        x = torch.cat([self.proj_dec(tokens), self.cls_emb.expand(batch, -1, -1)], dim=1)
        mask = None
        if padding is not None:
            mask = torch.cat([padding, padding.new_zeros(batch, self.num_classes)], dim=1)
        for block in self.blocks:
            x = block(x, mask)
        x = self.decoder_norm(x)
        patches = F.normalize(x[:, :length] @ self.proj_patch, dim=-1)
        classes = F.normalize(x[:, length:] @ self.proj_classes, dim=-1)
        return self.mask_norm(patches @ classes.transpose(1, 2))


class SoftmaxHead(nn.Module):
    def __init__(self, num_classes: int, dim: int, hidden: int | None = None):
        super().__init__()
        hidden = hidden or dim
        self.num_classes = num_classes
        self.embed = nn.Linear(dim, hidden, bias=False)
        self.norm = nn.BatchNorm1d(hidden)
        self.classifier = nn.Linear(hidden, num_classes)

    def forward(self, tokens: torch.Tensor, padding: torch.Tensor | None = None) -> torch.Tensor:
        batch, length, _ = tokens.shape
        hidden = self.embed(tokens).reshape(batch * length, -1)
        if padding is None:
            hidden = self.norm(hidden)
        else:  # padded tokens stay out of the batch statistics
            valid = ~padding.reshape(-1)
            hidden = hidden.new_zeros(hidden.shape).index_put((valid,), self.norm(hidden[valid]))
        return self.classifier(F.relu(hidden)).view(batch, length, -1)


def build_decoder(name: str, num_classes: int, dim: int, **options) -> nn.Module:
    if name == "mask_transformer":
        return MaskTransformer(num_classes, dim, **options)
    if name == "softmax":
        return SoftmaxHead(num_classes, dim, **options)
    raise ValueError(f"decoder {name!r}: expected one of {DECODERS}")


class DenseSegmenter(nn.Module):
    """A dense CAST encoder (``task='dense'``) + a decoder: ``model(images, superpixels)`` -> pixel logits
    [B, K, H', W'] at the superpixel map's resolution. ``encoder`` / ``decoder`` are the parameter prefixes
    the optimizer's groups (backbone vs head learning rates) go by."""

    def __init__(self, encoder: CAST, decoder: nn.Module):
        super().__init__()
        if encoder.config.task != "dense":
            raise ValueError(f"DenseSegmenter needs a dense CAST (task='dense'), got {encoder.config.task!r}")
        self.encoder, self.decoder = encoder, decoder
        self.num_classes = decoder.num_classes

    def token_logits(self, images: torch.Tensor, superpixels: torch.Tensor) -> torch.Tensor:
        """Class scores per superpixel token [B, N, K] (padded tokens score, but own no pixel)."""
        out = self.encoder.forward_features(images, superpixels)
        padding = None if self.encoder.config.compat else out.padding_masks[0]
        return self.decoder(out.dense_tokens, padding)

    def forward(self, images: torch.Tensor, superpixels: torch.Tensor) -> torch.Tensor:
        scores = self.token_logits(images, superpixels)
        return paint_superpixels(scores, superpixels).permute(0, 3, 1, 2)
