"""Offline sample data sets for the demo and tests.

- Fashion-MNIST (Debian's ``dataset-fashion-mnist``, idx .gz under /usr/share/datasets/fashion-mnist)
  as class-per-folder RGB images upscaled to ``size`` px, the layout ``make_shards`` reads.
- The photos shipped with scikit-image as a flat folder of unlabelled images.

Usage: ``python -m data_tools.sample_data fashion-mnist DEST [--per-class N] [--size 64] [--split train]``
       ``python -m data_tools.sample_data skimage DEST``
"""

from __future__ import annotations

import argparse
import gzip
import struct
from pathlib import Path

import numpy as np
from PIL import Image

FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
FASHION_MNIST_CLASSES = (
    "t-shirt",
    "trouser",
    "pullover",
    "dress",
    "coat",
    "sandal",
    "shirt",
    "sneaker",
    "bag",
    "ankle-boot",
)
SKIMAGE_PHOTOS = (
    "astronaut",
    "coffee",
    "chelsea",
    "rocket",
    "immunohistochemistry",
    "hubble_deep_field",
    "motorcycle_left",
    "retina",
    "cat",
    "colorwheel",
    "logo",
    "page",
    "camera",
    "moon",
    "text",
    "brick",
    "grass",
    "gravel",
    "horse",
    "clock",
    "coins",
)


def read_idx(path: Path) -> np.ndarray:
    """An idx file (optionally gzipped) as a numpy array."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as handle:
        data = handle.read()
    zero, dtype_code, ndim = struct.unpack(">HBB", data[:4])
    if zero != 0 or dtype_code != 0x08:
        raise ValueError(f"{path}: not an unsigned-byte idx file (magic {data[:4].hex()})")
    shape = struct.unpack(f">{ndim}I", data[4 : 4 + 4 * ndim])
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(shape)


def fashion_mnist(
    dest: str | Path,
    *,
    split: str = "train",
    per_class: int | None = 100,
    size: int = 64,
    fmt: str = "png",
    source: Path = FASHION_MNIST_DIR,
) -> Path:
    """Write ``per_class`` images of each class (all with None) to ``dest/<class>/<split>_<index>.<fmt>``."""
    prefix = "train" if split == "train" else "t10k"
    images_path, labels_path = (
        source / f"{prefix}-images-idx3-ubyte.gz",
        source / f"{prefix}-labels-idx1-ubyte.gz",
    )
    for path in (images_path, labels_path):
        if not path.exists():
            raise FileNotFoundError(f"{path}: Fashion-MNIST missing (apt-get install dataset-fashion-mnist)")
    images, labels = read_idx(images_path), read_idx(labels_path)
    dest = Path(dest)
    for label, name in enumerate(FASHION_MNIST_CLASSES):
        indices = np.flatnonzero(labels == label)[:per_class]
        folder = dest / name
        folder.mkdir(parents=True, exist_ok=True)
        for index in indices:
            picture = Image.fromarray(images[index]).resize((size, size), Image.BICUBIC).convert("RGB")
            picture.save(folder / f"{split}_{index:05d}.{fmt}", **({"quality": 95} if fmt == "jpg" else {}))
    return dest


def skimage_photos(dest: str | Path) -> Path:
    """The scikit-image sample photos as RGB JPEGs in one flat folder."""
    import skimage.data

    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    for name in SKIMAGE_PHOTOS:
        loader = getattr(skimage.data, name, None)
        if loader is None:
            continue
        image = np.asarray(loader())
        if image.dtype != np.uint8:
            image = image.astype(float)
            image = (255 * (image - image.min()) / max(np.ptp(image), 1e-9)).astype(np.uint8)
        if image.ndim == 2:
            image = np.stack([image] * 3, -1)
        Image.fromarray(image[..., :3]).save(dest / f"{name}.jpg", quality=95)
    return dest


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m data_tools.sample_data", description=__doc__.split("\n")[0]
    )
    parser.add_argument("which", choices=("fashion-mnist", "skimage"))
    parser.add_argument("dest")
    parser.add_argument("--per-class", type=int, default=100, help="Fashion-MNIST images per class (0 = all)")
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--split", choices=("train", "test"), default="train")
    parser.add_argument("--format", choices=("png", "jpg"), default="png")
    args = parser.parse_args(argv)
    if args.which == "fashion-mnist":
        out = fashion_mnist(
            args.dest, split=args.split, per_class=args.per_class or None, size=args.size, fmt=args.format
        )
    else:
        out = skimage_photos(args.dest)
    print(f"wrote {sum(1 for p in Path(out).rglob('*') if p.is_file())} images under {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
