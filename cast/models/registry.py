"""timm registration of every CAST variant: ``timm.create_model("cast_small", num_classes=1000)``.

Keyword arguments override ``CASTConfig`` fields (e.g. ``img_size=64``, ``compat=True``,
``token_pooling="area"``). No weights are downloaded: load released ones with ``load_original_checkpoint``.
"""

from __future__ import annotations

import sys
from dataclasses import fields

from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.models import register_model

from cast.models.cast import CAST, CASTConfig

_SMALL = dict(embed_dim=384, depths=(3, 3, 3, 2))
_SMALL_DEEP = dict(embed_dim=384, depths=(6, 3, 3, 3))
_BASE = dict(embed_dim=768, depths=(3, 3, 3, 2))
_BASE_DEEP = dict(embed_dim=768, depths=(6, 3, 3, 3))
_TINY = dict(embed_dim=192, depths=(1, 1, 1, 1), num_heads=3, num_clusters=(16, 8, 4, 2), img_size=64)
_DEIT = dict(pos_embed="learned", drop_path_rate=0.1)
_DENSE = dict(task="dense", num_clusters=(320, 160, 80, 40), img_size=512, num_classes=0)
_PRETRAIN = dict(task="pretrain")

PRESETS: dict[str, dict] = {
    "cast_tiny": _TINY,
    "cast_small": _SMALL,
    "cast_small_deep": _SMALL_DEEP,
    "cast_base": _BASE,
    "cast_base_deep": _BASE_DEEP,
    "cast_small_deit": {**_SMALL, **_DEIT},
    "cast_small_deep_deit": {**_SMALL_DEEP, **_DEIT},
    "cast_base_deit": {**_BASE, **_DEIT},
    "cast_base_deep_deit": {**_BASE_DEEP, **_DEIT},
    "cast_seg_tiny": {**_TINY, "task": "dense", "num_classes": 0},
    "cast_seg_small": {**_SMALL, **_DENSE},
    "cast_seg_small_deep": {**_SMALL_DEEP, **_DENSE},
    "cast_seg_base": {**_BASE, **_DENSE},
    "cast_seg_base_deep": {**_BASE_DEEP, **_DENSE},
    "cast_seg_small_deit": {**_SMALL, **_DENSE, "pos_embed": "learned"},
    "cast_seg_base_deit": {**_BASE, **_DENSE, "pos_embed": "learned"},
    "cast_seg_tiny_pretrain": {**_TINY, **_PRETRAIN},
    "cast_seg_small_pretrain": {**_SMALL, **_PRETRAIN},
    "cast_seg_small_deep_pretrain": {**_SMALL_DEEP, **_PRETRAIN},
    "cast_seg_base_pretrain": {**_BASE, **_PRETRAIN},
    "cast_seg_base_deep_pretrain": {**_BASE_DEEP, **_PRETRAIN},
}

_TIMM_ONLY_ARGS = ("pretrained_cfg", "pretrained_cfg_overlay", "cache_dir")
NON_CONFIG_ARGS = ("device", "dtype", *_TIMM_ONLY_ARGS)  # create_model keywords that are no CASTConfig field
_CONFIG_FIELDS = {f.name for f in fields(CASTConfig)}


def cast_config(name: str, **overrides) -> CASTConfig:
    """The ``CASTConfig`` of a registered variant with field overrides; unknown fields raise TypeError."""
    if name not in PRESETS:
        raise KeyError(f"unknown CAST variant {name!r}; known: {sorted(PRESETS)}")
    unknown = sorted(set(overrides) - _CONFIG_FIELDS)
    if unknown:
        raise TypeError(f"{name}: unknown option(s) {unknown}; valid: {sorted(_CONFIG_FIELDS)}")
    return CASTConfig(**{**PRESETS[name], **overrides})


def create_model(name: str, **overrides) -> CAST:
    """Build a registered variant (what ``timm.create_model(name, **overrides)`` calls)."""
    placement = {key: overrides.pop(key) for key in ("device", "dtype") if key in overrides}
    model = CAST(cast_config(name, **overrides)).to(**placement)
    size = model.config.img_size
    # what timm.data.resolve_data_config reads; models are trained on ImageNet-normalised images
    model.pretrained_cfg = model.default_cfg = {
        "architecture": name,
        "input_size": (3, size, size),
        "mean": IMAGENET_DEFAULT_MEAN,
        "std": IMAGENET_DEFAULT_STD,
        "interpolation": "bicubic",
        "crop_pct": 0.875,
        "num_classes": model.num_classes,
        "first_conv": "stem.proj.0",
        "classifier": "head",
    }
    return model


def _entrypoint(name: str):
    def create(pretrained: bool = False, **kwargs) -> CAST:
        if pretrained:
            raise ValueError(f"{name}: no weights are downloaded; use cast.models.load_original_checkpoint")
        for key in _TIMM_ONLY_ARGS:
            kwargs.pop(key, None)
        return create_model(name, **kwargs)

    create.__name__ = create.__qualname__ = name
    create.__module__ = __name__
    create.__doc__ = f"CAST variant {name}: {PRESETS[name]}"
    return create


for _name in PRESETS:
    setattr(sys.modules[__name__], _name, register_model(_entrypoint(_name)))
