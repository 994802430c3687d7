"""A small labelled image set cut from a folder of photos: random square crops, one class per photo.

The demo's stand-in when Debian's Fashion-MNIST is not installed: the scikit-image photos are always
there (``data_tools.sample_data skimage``), and "which photo is this crop from" is a task that kNN on
learned features can score. Train and val use different seeds, so their crops differ.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

# Photos with enough texture for many distinct crops (scikit-image names; chelsea is also shipped as cat).
CROP_PHOTOS = (
    "astronaut", "brick", "camera", "chelsea", "coffee", "coins", "grass", "gravel", "immunohistochemistry",
    "rocket",
)  # fmt: skip


def photo_crops(
    photos: str | Path,
    dest: str | Path,
    *,
    per_class: int = 200,
    size: int = 64,
    seed: int = 0,
    names: tuple[str, ...] = CROP_PHOTOS,
    min_frac: float = 0.25,
    max_frac: float = 0.6,
) -> Path:
    """Write ``per_class`` crops of ``photos/<name>.jpg`` to ``dest/<name>/crop_<i>.png`` at ``size`` px;
    a crop's side is ``min_frac..max_frac`` of the photo's shorter side."""
    photos, dest = Path(photos), Path(dest)
    missing = [name for name in names if not (photos / f"{name}.jpg").exists()]
    if missing:
        raise FileNotFoundError(
            f"{photos}: missing {', '.join(f'{m}.jpg' for m in missing)} "
            "(write them with `python -m data_tools.sample_data skimage DIR`)"
        )
    if not 0 < min_frac <= max_frac <= 1:
        raise ValueError(f"photo_crops: need 0 < min_frac <= max_frac <= 1, got {min_frac}, {max_frac}")
    rng = np.random.default_rng(seed)
    for name in names:
        photo = Image.open(photos / f"{name}.jpg").convert("RGB")
        width, height = photo.size
        folder = dest / name
        folder.mkdir(parents=True, exist_ok=True)
        for index in range(per_class):
            side = int(rng.uniform(min_frac, max_frac) * min(width, height))
            left, top = int(rng.integers(0, width - side + 1)), int(rng.integers(0, height - side + 1))
            crop = photo.crop((left, top, left + side, top + side)).resize((size, size), Image.BICUBIC)
            crop.save(folder / f"crop_{index:05d}.png")
    return dest
