"""The CAST encoder: conv stem -> superpixel tokens -> [transformer blocks -> graph pooling] per stage.

One config dataclass covers every released variant: the classification models (``cast.py``, MoCo flavour
with fixed sin-cos positions, or ``cast_deit.py`` with learned positions), the COCO MoCo "pretrain" model
(``cast_seg.py``, stage 'pretrain') and the dense models (``cast_seg.py`` stage 'segmentation',
``cast_seg_deit.py``). See shared/reference/cast_reference.md sections 1-3.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass

import torch
from timm.layers import trunc_normal_
from torch import nn

from cast.models.blocks import TransformerBlock
from cast.models.fusion import BlockFusion
from cast.models.graph_pool import GraphPooling
from cast.models.positions import sincos_2d_table
from cast.models.segment_ops import masked_mean
from cast.models.stem import ConvStem
from cast.models.superpixel_tokens import TOKEN_POOLING_MODES, superpixel_tokens

TASKS = ("classification", "pretrain", "dense")
POSITION_KINDS = ("sincos", "learned")


@dataclass
class CASTConfig:
    """Architecture of one CAST variant.

    task: ``classification`` (image embedding = final-normed cls before the last pooling), ``pretrain``
      (BlockFusion; embedding = mean of the fused superpixel tokens, as the COCO MoCo model) or ``dense``
      (BlockFusion; per-superpixel fused tokens, the head is applied per token).
    pos_embed: ``sincos`` (fixed, MoCo) or ``learned`` (DeiT; its index 0 is the cls position).
    token_pooling: ``nearest`` | ``area`` | ``bilinear`` (see ``superpixel_tokens``); None picks
      ``nearest`` for classification/pretrain and ``area`` for dense (``bilinear``, the original dense path,
      when ``compat``).
    compat: reproduce the original exactly for released weights: padded tokens unmasked in attention and
      means, the token count taken batch-wide after snapping, float64 FPS, the last pooling always run.
    num_tokens: the token budget per image (the recipe's superpixel count, e.g. 196). When set (and not
      ``compat``) every shape is static and the forward never syncs with the host, so ``torch.compile``
      gives one graph; labels must lie in [0, num_tokens) and each image needs ``num_clusters[0]`` of them,
      which the loader checks (``data.max_superpixels``). None: the batch's largest label sets the count
      and the model checks the maps itself (host syncs).
    """

    embed_dim: int = 384
    depths: tuple[int, ...] = (3, 3, 3, 2)
    num_clusters: tuple[int, ...] = (64, 32, 16, 8)
    num_heads: int = 12
    pool_num_heads: int | None = None
    mlp_ratio: float = 4.0
    qkv_bias: bool = True
    img_size: int = 224
    in_chans: int = 3
    num_classes: int = 1000
    task: str = "classification"
    pos_embed: str = "sincos"
    token_pooling: str | None = None
    drop_rate: float = 0.0
    drop_path_rate: float = 0.0
    pool_dropout: float = 0.1
    fusion_dropout: float = 0.2
    logit_scale: float = 5.0
    compat: bool = False
    num_tokens: int | None = None

    def __post_init__(self):
        self.depths = tuple(int(d) for d in self.depths)
        self.num_clusters = tuple(int(k) for k in self.num_clusters)
        if len(self.depths) != len(self.num_clusters) or len(self.depths) < 2:
            raise ValueError(
                f"CASTConfig: depths {self.depths} and num_clusters {self.num_clusters} "
                "need the same length >= 2"
            )
        if min(self.depths) < 1 or any(a <= b for a, b in zip(self.num_clusters, self.num_clusters[1:])):
            raise ValueError(
                f"CASTConfig: depths must be >= 1 and num_clusters strictly decreasing; "
                f"got {self.depths} / {self.num_clusters}"
            )
        if self.num_tokens is not None and self.num_tokens < self.num_clusters[0]:
            raise ValueError(
                f"CASTConfig.num_tokens={self.num_tokens} is below the first pooling's "
                f"{self.num_clusters[0]} clusters"
            )
        if self.task not in TASKS:
            raise ValueError(f"CASTConfig.task={self.task!r} is not one of {TASKS}")
        if self.pos_embed not in POSITION_KINDS:
            raise ValueError(f"CASTConfig.pos_embed={self.pos_embed!r} is not one of {POSITION_KINDS}")
        if self.token_pooling is not None and self.token_pooling not in TOKEN_POOLING_MODES:
            raise ValueError(
                f"CASTConfig.token_pooling={self.token_pooling!r} is not one of {TOKEN_POOLING_MODES}"
            )
        if self.img_size % 8 or self.embed_dim % 8 or self.embed_dim % self.num_heads:
            raise ValueError(
                f"CASTConfig: img_size ({self.img_size}) and embed_dim ({self.embed_dim}) must be divisible "
                f"by 8 and embed_dim by num_heads ({self.num_heads})"
            )

    @property
    def resolved_token_pooling(self) -> str:
        if self.token_pooling is not None:
            return self.token_pooling
        if self.task == "dense":
            return "bilinear" if self.compat else "area"
        return "nearest"

    @property
    def static_shapes(self) -> bool:
        """A fixed token budget: no data-dependent shape and no host sync in the forward."""
        return self.num_tokens is not None and not self.compat

    @property
    def grid_size(self) -> tuple[int, int]:
        return (self.img_size // 8, self.img_size // 8)


@dataclass
class CASTOutput:
    """Result of ``CAST.forward_features``; lists are indexed by level (0 = superpixel tokens).

    embedding: [B, C] image feature the head consumes (classification: LayerNorm(cls) before the last
      pooling; pretrain/dense: mean of the valid fused superpixel tokens).
    cls: [B, C] raw cls token (classification: after the last stage's blocks; fusion variants: fused cls).
    tokens: stage outputs (transformer blocks, before pooling, no cls), [B, N_l, C].
    logits: assignment logits [B, N_l, K_l] of each computed pooling (the last one only when asked for).
    seeds: FPS seed indices [B, K_l] into level-l tokens.
    padding_masks: [B, N_l] bool, True = padded (only level 0 can have padded tokens).
    dense_tokens: [B, N_1, C] fused per-superpixel tokens (pretrain/dense variants), else None.
    """

    embedding: torch.Tensor
    cls: torch.Tensor
    tokens: list[torch.Tensor]
    logits: list[torch.Tensor]
    seeds: list[torch.Tensor]
    padding_masks: list[torch.Tensor]
    dense_tokens: torch.Tensor | None = None


class CAST(nn.Module):
    """CAST encoder plus head. ``model(images, superpixels)`` returns logits.

    images: float [B, 3, H, W] with H, W divisible by 8; superpixels: int64 [B, H', W'] labels 0..K-1 per
    image (usually H' = H). Token i is superpixel label i; labels absent from an image become padded
    tokens. Without ``compat`` every image needs at least ``num_clusters[0]`` non-padded tokens.
    """

    def __init__(self, config: CASTConfig):
        super().__init__()
        self.config = config
        dim = config.embed_dim
        self.embed_dim = self.num_features = dim
        self.num_classes = config.num_classes
        self.stem = ConvStem(dim, config.in_chans)
        grid = config.grid_size
        if config.pos_embed == "sincos":
            self.register_buffer("pos_embed", sincos_2d_table(*grid, dim).unsqueeze(0))
        else:
            self.pos_embed = nn.Parameter(torch.zeros(1, 1 + grid[0] * grid[1], dim))
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_drop = nn.Dropout(config.drop_rate)
        num_blocks = sum(config.depths)  # plain Python below keeps the model buildable on the meta device
        drop_path = [config.drop_path_rate * i / max(num_blocks - 1, 1) for i in range(num_blocks)]
        self.blocks = nn.ModuleList(
            TransformerBlock(dim, config.num_heads, config.mlp_ratio, config.qkv_bias, rate)
            for rate in drop_path
        )
        self.stage_ends = tuple(itertools.accumulate(config.depths))
        pool_heads = config.pool_num_heads or config.num_heads
        self.pools = nn.ModuleList(
            GraphPooling(dim, k, pool_heads, config.qkv_bias, config.pool_dropout, config.logit_scale)
            for k in config.num_clusters
        )
        self.uses_fusion = config.task != "classification"
        self.norm = nn.Identity() if self.uses_fusion else nn.LayerNorm(dim, eps=1e-6)
        self.fusion = (
            BlockFusion(dim, len(config.depths), config.fusion_dropout) if self.uses_fusion else None
        )
        self.head: nn.Module = nn.Identity()
        self._init_weights()
        self.reset_classifier(config.num_classes)
        # The last pooling only feeds the hierarchy's top level: classification models freeze it (as the
        # original); fusion models still train its cls path, but its grouping never receives a gradient.
        last_pool = self.pools[-1]
        (last_pool.centroid_fc if self.uses_fusion else last_pool).requires_grad_(False)

    def _init_weights(self) -> None:
        """MoCo flavour: xavier-uniform linears (q, k, v bounded separately). DeiT flavour: timm's ViT init
        for the transformer part; the graph poolings keep torch's defaults, as in the original."""
        if self.config.pos_embed == "sincos":
            for name, module in self.named_modules():
                if isinstance(module, nn.Linear):
                    if name.endswith("qkv"):
                        bound = math.sqrt(6.0 / (module.weight.shape[0] // 3 + module.weight.shape[1]))
                        nn.init.uniform_(module.weight, -bound, bound)
                    else:
                        nn.init.xavier_uniform_(module.weight)
                    nn.init.zeros_(module.bias)
            nn.init.normal_(self.cls_token, std=1e-6)
        else:
            for module in self.blocks.modules():
                if isinstance(module, nn.Linear):
                    trunc_normal_(module.weight, std=0.02)
                    nn.init.zeros_(module.bias)
            trunc_normal_(self.pos_embed, std=0.02)
            trunc_normal_(self.cls_token, std=0.02)

    def reset_classifier(self, num_classes: int) -> None:
        """Replace the head: Linear(C, num_classes), or identity for 0."""
        self.num_classes = num_classes
        self.head = nn.Linear(self.embed_dim, num_classes) if num_classes > 0 else nn.Identity()
        if num_classes > 0:
            trunc_normal_(self.head.weight, std=0.02)
            nn.init.zeros_(self.head.bias)

    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        """Names timm's optimizer factory keeps out of weight decay (the DeiT recipe; 1-D params too)."""
        return {"pos_embed", "cls_token"}

    def _positions(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(grid table [G, C], cls position [1, 1, C])."""
        if self.config.pos_embed == "sincos":
            return self.pos_embed[0], torch.zeros_like(self.cls_token)
        return self.pos_embed[0, 1:], self.pos_embed[:, :1]

    def _check_inputs(self, images: torch.Tensor, superpixels: torch.Tensor) -> None:
        """Shape and dtype always; label values only without a token budget (reading them is a sync)."""
        if images.dim() != 4 or superpixels.dim() != 3 or images.shape[0] != superpixels.shape[0]:
            raise ValueError(
                f"CAST expects images [B, 3, H, W] and superpixels [B, H, W]; got {tuple(images.shape)} and "
                f"{tuple(superpixels.shape)}"
            )
        if superpixels.dtype.is_floating_point or superpixels.dtype == torch.bool:
            raise ValueError(f"CAST: superpixels must be integer labels, got dtype {superpixels.dtype}")
        if not self.config.static_shapes and int(superpixels.min()) < 0:
            raise ValueError("CAST: superpixel labels must be >= 0")

    def _tokens(self, images: torch.Tensor, superpixels: torch.Tensor):
        """Superpixel tokens [B, S, C] with positions, their padding mask [B, S] and the cls token."""
        self._check_inputs(images, superpixels)
        config = self.config
        table, cls_pos = self._positions()
        superpixels = superpixels.long()
        if config.static_shapes:  # labels past the budget (the loader keeps none) join the last token
            superpixels = superpixels.clamp(0, config.num_tokens - 1)
        tokens, support = superpixel_tokens(
            self.stem(images),
            table,
            config.grid_size,
            superpixels,
            config.resolved_token_pooling,
            count_labels_on_grid=config.compat,
            num_segments=config.num_tokens if config.static_shapes else None,
        )
        padding = support == 0
        if not config.compat and not config.static_shapes:
            fewest = int((~padding).sum(dim=1).amin())
            if fewest < config.num_clusters[0]:
                raise ValueError(
                    f"CAST: an image has only {fewest} superpixel tokens but the first pooling makes "
                    f"{config.num_clusters[0]} clusters; use more superpixels or fewer clusters"
                )
        cls = (self.cls_token + cls_pos).expand(tokens.shape[0], -1, -1)
        return self.pos_drop(tokens), padding, cls

    def forward_features(
        self, images: torch.Tensor, superpixels: torch.Tensor, *, segmentation: bool = False
    ) -> CASTOutput:
        """Encode a batch. The last graph pooling (the hierarchy's top level) runs only when
        ``segmentation=True`` or in compat mode: the image embedding never depends on it (classification
        reads the cls before it; the fusion variants need only its cls update, which skips the clustering).
        """
        compat = self.config.compat
        x, padding, cls = self._tokens(images, superpixels)
        batch = x.shape[0]
        stage_tokens, logits, seeds, pooled_cls = [], [], [], []
        padding_masks = [padding]
        level_padding: torch.Tensor | None = padding
        final_cls = cls
        start = 0
        for level, end in enumerate(self.stage_ends):
            attn_mask = None
            if level_padding is not None and not compat:
                attn_mask = torch.cat([level_padding.new_zeros(batch, 1), level_padding], dim=1)
            h = torch.cat([cls, x], dim=1)
            for block in self.blocks[start:end]:
                h = block(h, attn_mask)
            start = end
            final_cls, x = h[:, :1], h[:, 1:]
            stage_tokens.append(x)
            pool = self.pools[level]
            if level < len(self.pools) - 1 or segmentation or compat:
                result = pool(final_cls, x, level_padding, compat)
                cls, x = result.cls, result.tokens
                logits.append(result.logits)
                seeds.append(result.seeds)
                padding_masks.append(padding.new_zeros(batch, x.shape[1]))
            elif self.uses_fusion:
                cls = pool.update_cls(final_cls)
            pooled_cls.append(cls)
            level_padding = None
        padding_masks = padding_masks[: len(stage_tokens)]
        if not self.uses_fusion:
            return CASTOutput(
                embedding=self.norm(final_cls[:, 0]),
                cls=final_cls[:, 0],
                tokens=stage_tokens,
                logits=logits,
                seeds=seeds,
                padding_masks=padding_masks,
            )
        fusion_mask = None if compat else padding
        dense, fused_cls = self.fusion(stage_tokens, pooled_cls, logits, fusion_mask)
        return CASTOutput(
            embedding=masked_mean(dense, fusion_mask),
            cls=fused_cls,
            tokens=stage_tokens,
            logits=logits,
            seeds=seeds,
            padding_masks=padding_masks,
            dense_tokens=dense,
        )

    def forward(self, images: torch.Tensor, superpixels: torch.Tensor) -> torch.Tensor:
        """Logits [B, num_classes]; for ``task='dense'`` per superpixel token: [B, N_1, num_classes]."""
        out = self.forward_features(images, superpixels)
        if self.config.task == "dense":
            return self.head(out.dense_tokens)
        return self.head(out.embedding)
