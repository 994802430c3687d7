"""Superpixel providers: one interface, several methods (see ``base`` for the contract).

    from cast.superpixels import get_provider
    provider = get_provider("seeds_fast")            # CPU, per view in the data loader
    labels = provider(view_uint8_hwc)                # int64 [H, W], labels 0..K-1
    slic = get_provider("slic_torch")                # on the training device, per batch
    labels = slic.batch(images01)                    # int64 [B, H, W] on images01.device

Names: ``seeds`` (reference SEEDS; ``preset`` = moco | deit | segmentation), ``seeds_fast``
(downscaled SEEDS, the classification default), ``slic_torch`` (batched, on device) and
``precomputed`` (maps stored in the shards under ``SAMPLE_KEY``).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable

from cast.superpixels.base import SuperpixelProvider, relabel_contiguous, relabel_contiguous_batch
from cast.superpixels.precomputed import SAMPLE_KEY, PrecomputedProvider, decode_labels, encode_labels
from cast.superpixels.seeds import SEEDS_PRESETS, SeedsFastProvider, SeedsProvider, make_seeds
from cast.superpixels.slic_torch import SlicTorchProvider

PROVIDERS: dict[str, Callable[..., SuperpixelProvider]] = {
    "seeds": make_seeds,
    "seeds_fast": SeedsFastProvider,
    "slic_torch": SlicTorchProvider,
    "precomputed": PrecomputedProvider,
}


def get_provider(name: str, **params) -> SuperpixelProvider:
    """Build the provider ``name`` with ``params``; unknown names or parameters raise ValueError."""
    if name not in PROVIDERS:
        raise ValueError(f"unknown superpixel provider {name!r}; expected one of {sorted(PROVIDERS)}")
    factory = PROVIDERS[name]
    accepted = _parameters(factory)
    unknown = sorted(set(params) - accepted)
    if unknown:
        raise ValueError(f"superpixel provider {name!r}: unknown parameter(s) {unknown}; "
                         f"accepted: {sorted(accepted)}")
    return factory(**params)


def _parameters(factory: Callable) -> set[str]:
    if factory is make_seeds:  # preset + any SeedsProvider field
        return {"preset"} | _parameters(SeedsProvider)
    return {p for p in inspect.signature(factory).parameters}


__all__ = [
    "PROVIDERS", "SAMPLE_KEY", "SEEDS_PRESETS", "PrecomputedProvider", "SeedsFastProvider", "SeedsProvider",
    "SlicTorchProvider", "SuperpixelProvider", "decode_labels", "encode_labels", "get_provider",
    "relabel_contiguous", "relabel_contiguous_batch",
]
