"""Offline sample data sets for the demo and tests.

- Fashion-MNIST (Debian's ``dataset-fashion-mnist``, idx .gz under /usr/share/datasets/fashion-mnist)
  as class-per-folder RGB images upscaled to ``size`` px, the layout ``make_shards`` reads.
- The photos shipped with scikit-image as a flat folder of unlabelled images.
- ``pasted``: a segmentation set in the ``voc`` layout that needs no download: Fashion-MNIST items
  pasted at random scales and places onto crops of the scikit-image photos, masks from the items'
  pixels (0 = background, 1..N = item class), so real image statistics and a known answer. Without
  Fashion-MNIST, drawn shapes (disc, square, ...) stand in for the items, as the demo falls back.

Usage: ``python -m data_tools.sample_data fashion-mnist DEST [--per-class N] [--size 64] [--split train]``
       ``python -m data_tools.sample_data skimage DEST``
       ``python -m data_tools.sample_data pasted DEST [--train 200] [--val 50] [--size 128] [--classes 10]``
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


def _skimage_arrays():
    """(name, RGB uint8 array) of every scikit-image sample photo this version ships."""
    import skimage.data

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
        yield name, np.ascontiguousarray(image[..., :3])


def skimage_photos(dest: str | Path) -> Path:
    """The scikit-image sample photos as RGB JPEGs in one flat folder."""
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    for name, image in _skimage_arrays():
        Image.fromarray(image).save(dest / f"{name}.jpg", quality=95)
    return dest


SHAPE_CLASSES = ("disc", "square", "triangle", "ring", "cross", "diamond", "bar", "column", "corner", "plus")


def _drawn_shapes(count: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """28x28 grey items and labels of ``SHAPE_CLASSES``: the stand-in when Fashion-MNIST is missing."""
    yy, xx = np.mgrid[-1:1:28j, -1:1:28j]
    radius = np.hypot(yy, xx)
    shapes = [
        radius < 0.8,
        (abs(yy) < 0.7) & (abs(xx) < 0.7),
        (yy > -0.7) & (yy < 0.7) & (abs(xx) < (yy + 0.7) / 2),
        (radius < 0.85) & (radius > 0.5),
        (abs(yy - xx) < 0.3) | (abs(yy + xx) < 0.3),
        abs(yy) + abs(xx) < 0.85,
        (abs(yy) < 0.25) & (abs(xx) < 0.9),
        (abs(xx) < 0.25) & (abs(yy) < 0.9),
        ((abs(xx + 0.5) < 0.25) & (abs(yy) < 0.9)) | ((abs(yy - 0.6) < 0.25) & (abs(xx) < 0.9)),
        ((abs(yy) < 0.2) | (abs(xx) < 0.2)) & (radius < 0.9),
    ]
    labels = rng.integers(0, len(shapes), count)
    images = np.stack([np.where(shapes[k], 140 + rng.integers(0, 100), 0).astype(np.uint8) for k in labels])
    return images, labels


def _items(source: Path, split: str, count: int, rng: np.random.Generator):
    """(grey items [N, 28, 28], labels [N], class names): Fashion-MNIST, else drawn shapes."""
    prefix = "train" if split == "train" else "t10k"
    images_path = source / f"{prefix}-images-idx3-ubyte.gz"
    labels_path = source / f"{prefix}-labels-idx1-ubyte.gz"
    if images_path.exists() and labels_path.exists():
        return read_idx(images_path), read_idx(labels_path), FASHION_MNIST_CLASSES
    images, labels = _drawn_shapes(count, rng)
    return images, labels, SHAPE_CLASSES


def pasted_segmentation(
    dest: str | Path,
    *,
    train: int = 200,
    val: int = 50,
    size: int = 128,
    num_classes: int = 10,
    items_per_image: tuple[int, int] = (1, 3),
    item_size: tuple[float, float] = (0.25, 0.5),
    seed: int = 0,
    source: Path = FASHION_MNIST_DIR,
) -> Path:
    """Write the pasted set in the ``voc`` layout: ``JPEGImages/``, ``SegmentationClass/`` (L-mode PNGs,
    0 background, 1..``num_classes`` the item's class), ``ImageSets/Segmentation/{train,val}.txt`` and
    ``classes.txt`` (background + the first ``num_classes`` item classes). Items of the val split come
    from Fashion-MNIST's test split. Each item's side is ``item_size`` (a fraction of ``size``) and it
    covers the pixels where it is brighter than 24/255."""
    rng = np.random.default_rng(seed)
    photos = [image for _, image in _skimage_arrays()]
    dest = Path(dest)
    for folder in ("JPEGImages", "SegmentationClass", "ImageSets/Segmentation"):
        (dest / folder).mkdir(parents=True, exist_ok=True)
    names: list[str] = []
    for split, count in (("train", train), ("val", val)):
        items, labels, class_names = _items(source, split, 4 * count * items_per_image[1], rng)
        pool = np.flatnonzero(labels < num_classes)
        ids = []
        for index in range(count):
            photo = photos[int(rng.integers(len(photos)))]
            scale = size / min(photo.shape[:2]) * rng.uniform(1.0, 2.0)
            height, width = (max(size, round(side * scale)) for side in photo.shape[:2])
            canvas = np.asarray(Image.fromarray(photo).resize((width, height), Image.BILINEAR))
            top, left = int(rng.integers(height - size + 1)), int(rng.integers(width - size + 1))
            canvas = canvas[top : top + size, left : left + size].astype(np.float32)
            mask = np.zeros((size, size), dtype=np.uint8)
            for _ in range(int(rng.integers(items_per_image[0], items_per_image[1] + 1))):
                item = int(rng.choice(pool))
                side = int(rng.integers(round(size * item_size[0]), round(size * item_size[1]) + 1))
                grey = Image.fromarray(items[item]).resize((side, side), Image.BILINEAR)
                grey = np.asarray(grey, dtype=np.float32)
                y, x = int(rng.integers(size - side + 1)), int(rng.integers(size - side + 1))
                covered = grey > 24
                tint = rng.uniform(0.3, 1.0, 3).astype(np.float32)
                patch = canvas[y : y + side, x : x + side]
                patch[covered] = grey[covered, None] * tint
                mask[y : y + side, x : x + side][covered] = labels[item] + 1
            key = f"{split}_{index:05d}"
            picture = Image.fromarray(canvas.clip(0, 255).astype(np.uint8))
            picture.save(dest / "JPEGImages" / f"{key}.jpg", quality=92)
            Image.fromarray(mask, mode="L").save(dest / "SegmentationClass" / f"{key}.png")
            ids.append(key)
        (dest / "ImageSets/Segmentation" / f"{split}.txt").write_text("\n".join(ids) + "\n")
        names = ["background", *class_names[:num_classes]]
    (dest / "classes.txt").write_text("\n".join(names) + "\n")
    return dest


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m data_tools.sample_data", description=__doc__.split("\n")[0]
    )
    parser.add_argument("which", choices=("fashion-mnist", "skimage", "pasted"))
    parser.add_argument("dest")
    parser.add_argument("--per-class", type=int, default=100, help="Fashion-MNIST images per class (0 = all)")
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--split", choices=("train", "test"), default="train")
    parser.add_argument("--format", choices=("png", "jpg"), default="png")
    parser.add_argument("--train", type=int, default=200, help="pasted: train images")
    parser.add_argument("--val", type=int, default=50, help="pasted: val images")
    parser.add_argument("--classes", type=int, default=10, help="pasted: item classes (1-10)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.which == "pasted":
        out = pasted_segmentation(args.dest, train=args.train, val=args.val, size=args.size,
                                  num_classes=args.classes, seed=args.seed)
    elif args.which == "fashion-mnist":
        out = fashion_mnist(
            args.dest, split=args.split, per_class=args.per_class or None, size=args.size, fmt=args.format
        )
    else:
        out = skimage_photos(args.dest)
    images = Path(out) / "JPEGImages" if args.which == "pasted" else Path(out)
    print(f"wrote {sum(1 for p in images.rglob('*') if p.is_file())} images under {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
