"""CAST models: our dgl-free implementation of CAST (Ke, Mo, Yu; ICLR 2024), registered with timm."""

from cast.models import registry as _registry  # noqa: F401  (registers the timm entrypoints)
from cast.models.cast import CAST, CASTConfig, CASTOutput
from cast.models.hierarchy import hierarchy, paint_superpixels
from cast.models.original_checkpoint import LoadReport, load_original_checkpoint
from cast.models.registry import PRESETS, cast_config

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


def create_model(name: str, **kwargs) -> CAST:
    """Build a registered variant (same as ``timm.create_model(name, **kwargs)``)."""
    return CAST(cast_config(name, **kwargs))
