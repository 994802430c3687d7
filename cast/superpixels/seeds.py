"""OpenCV SEEDS superpixels, as the original CAST computes them, and a cheaper downscaled variant.

``seeds`` reproduces the reference pipeline exactly (uint8 RGB -> LAB ->
``createSuperpixelSEEDS(W, H, 3, n, num_levels=1, prior=2, bins, double_step=False)`` ->
``iterate(t)``). ``seeds_fast`` runs the same algorithm on an area-downscaled view with 5
histogram bins and 5 iterations and nearest-upsamples the labels: ~12x cheaper, with the same
label count and token grouping quality as the DeiT setting the authors also trained with
(reference/superpixel_calibration.md; measured again by ``python -m benchmarks.superpixels``).

SEEDS objects cost ~0.1-0.8 ms to build and cannot be pickled, so each provider builds them
lazily, once per (input size, parameters) per thread, and drops them when pickled.
"""

from __future__ import annotations

import dataclasses
import threading
from typing import ClassVar

import cv2
import numpy as np

from cast.superpixels.base import SuperpixelProvider, check_uint8_image, relabel_contiguous

# Settings of the reference pipelines (cast_reference.md section 4).
SEEDS_PRESETS: dict[str, dict] = {
    "moco": {"num_superpixels": 196, "histogram_bins": 15, "iterations": 20},
    "deit": {"num_superpixels": 196, "histogram_bins": 5, "iterations": 15},
    # Segmenter (ADE20K / Pascal Context): one superpixel per 16x16 pixels of the crop.
    "segmentation": {"num_superpixels": None, "pixels_per_superpixel": 256, "histogram_bins": 5,
                     "iterations": 15},
}


MIN_SIDE = 8  # OpenCV's SEEDS hangs on views of a few pixels; downscaling stops here


@dataclasses.dataclass
class SeedsProvider(SuperpixelProvider):
    """SEEDS on each view (CPU, per view in the data loader).

    ``num_superpixels`` is what SEEDS is asked for; with ``pixels_per_superpixel`` instead, the
    request is ``H * W // pixels_per_superpixel`` of the view. ``downscale`` > 1 runs SEEDS on
    an INTER_AREA-downscaled copy (``round(H / downscale)`` x ``round(W / downscale)``) and
    nearest-upsamples the labels, so the map always has the view's size.
    """

    name: ClassVar[str] = "seeds"
    on_device: ClassVar[bool] = False

    num_superpixels: int | None = 196
    pixels_per_superpixel: int | None = None
    histogram_bins: int = 15
    iterations: int = 20
    downscale: float = 1.0
    num_levels: int = 1
    prior: int = 2
    double_step: bool = False
    _local: threading.local = dataclasses.field(default_factory=threading.local, init=False, repr=False,
                                                compare=False)

    def __post_init__(self) -> None:
        if (self.num_superpixels is None) == (self.pixels_per_superpixel is None):
            raise ValueError(f"{self.name}: set exactly one of num_superpixels and pixels_per_superpixel")
        for field_name in ("num_superpixels", "pixels_per_superpixel", "histogram_bins", "num_levels"):
            value = getattr(self, field_name)
            if value is not None and (not isinstance(value, int) or value < 1):
                raise ValueError(f"{self.name}: {field_name} must be a positive integer, got {value!r}")
        if not isinstance(self.iterations, int) or self.iterations < 0:
            raise ValueError(f"{self.name}: iterations must be an integer >= 0, got {self.iterations!r}")
        if not self.downscale >= 1:
            raise ValueError(f"{self.name}: downscale must be >= 1, got {self.downscale!r}")

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        del state["_local"]  # cv2 SEEDS objects cannot be pickled; rebuilt lazily in the worker
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._local = threading.local()

    def __call__(self, image: np.ndarray) -> np.ndarray:
        check_uint8_image(image)
        height, width = image.shape[:2]
        if min(height, width) < MIN_SIDE:
            raise ValueError(
                f"{self.name}: view {height}x{width} is below SEEDS' minimum of {MIN_SIDE} pixels a side"
            )
        small_h = min(height, max(MIN_SIDE, round(height / self.downscale)))
        small_w = min(width, max(MIN_SIDE, round(width / self.downscale)))
        if (small_h, small_w) != (height, width):
            image = cv2.resize(image, (small_w, small_h), interpolation=cv2.INTER_AREA)
        lab = cv2.cvtColor(image, cv2.COLOR_RGB2LAB)
        # OpenCV's SEEDS crashes when asked for superpixels smaller than ~2x2 pixels (tiny views).
        count = min(self._requested_count(height, width), max(1, small_h * small_w // 4))
        engine = self._engine(small_w, small_h, count)
        engine.iterate(lab, self.iterations)
        labels = relabel_contiguous(engine.getLabels())
        if (small_h, small_w) != (height, width):
            rows = np.arange(height) * small_h // height
            cols = np.arange(width) * small_w // width
            labels = labels[rows[:, None], cols[None, :]]
        return labels

    def _requested_count(self, height: int, width: int) -> int:
        if self.num_superpixels is not None:
            return self.num_superpixels
        return max(1, height * width // self.pixels_per_superpixel)

    def _engine(self, width: int, height: int, count: int):
        """The SEEDS object for this input size, built once per thread (reuse gives identical labels)."""
        engines = self._local.__dict__.setdefault("engines", {})
        key = (width, height, count)
        if key not in engines:
            engines[key] = cv2.ximgproc.createSuperpixelSEEDS(
                width, height, 3, count, self.num_levels, self.prior, self.histogram_bins, self.double_step)
        return engines[key]


@dataclasses.dataclass
class SeedsFastProvider(SeedsProvider):
    """SEEDS at half resolution, 5 bins, 5 iterations: the classification default (~1.2 ms/view).

    The model reads the map at the top-left pixel of each 8x8 token cell, i.e. low-res pixel
    (4i, 4j) for a 224 view; the full-size map is kept so the contract stays ``[H, W]``.
    """

    name: ClassVar[str] = "seeds_fast"

    histogram_bins: int = 5
    iterations: int = 5
    downscale: float = 2.0


def make_seeds(preset: str = "moco", **overrides) -> SeedsProvider:
    """``seeds`` with a reference preset (``moco``, ``deit``, ``segmentation``) plus overrides."""
    if preset not in SEEDS_PRESETS:
        raise ValueError(f"seeds: unknown preset {preset!r}; expected one of {sorted(SEEDS_PRESETS)}")
    return SeedsProvider(**{**SEEDS_PRESETS[preset], **overrides})
