"""CAST models: our dgl-free implementation of CAST (Ke, Mo, Yu; ICLR 2024), registered with timm.

import timm, torch
import cast.models as cm                           # registers cast_* with timm

model = timm.create_model("cast_tiny", num_classes=10).eval()
images = torch.randn(2, 3, 64, 64)                 # ImageNet-normalised, H and W divisible by 8
cells = torch.arange(64).view(8, 8).repeat_interleave(8, 0).repeat_interleave(8, 1)
superpixels = cells.expand(2, -1, -1)              # int64 [B, H, W], labels 0..K-1 (e.g. SEEDS)
logits = model(images, superpixels)                # [2, 10]
out = model.forward_features(images, superpixels, segmentation=True)
levels = cm.hierarchy(out, superpixels)            # [2, 4, 64, 64]: 16 / 8 / 4 / 2 segments
report = cm.load_original_checkpoint("s3://bucket/cast_small.pth.tar", timm.create_model("cast_small"))
"""

from cast.models import registry as _registry  # noqa: F401  (registers the timm entrypoints)
from cast.models.cast import CAST, CASTConfig, CASTOutput
from cast.models.hierarchy import hierarchy, paint_superpixels
from cast.models.original_checkpoint import LoadReport, load_original_checkpoint
from cast.models.registry import PRESETS, cast_config, create_model

__all__ = [
    "CAST",
    "CASTConfig",
    "CASTOutput",
    "LoadReport",
    "PRESETS",
    "cast_config",
    "create_model",
    "hierarchy",
    "load_original_checkpoint",
    "paint_superpixels",
]
