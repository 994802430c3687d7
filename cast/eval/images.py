"""Images for inference: files, folders, URLs (through fsspec) or shards, cut to the model's square view.

The view is the reference's evaluation crop (resize the shorter side, centre crop), on which SEEDS runs
at full resolution, so segment borders follow superpixel borders at the view's pixel level.
"""

from __future__ import annotations

import posixpath
from collections.abc import Iterator
from dataclasses import dataclass

import fsspec
import numpy as np
from PIL import Image

from cast.data.samples import IMAGE_EXTENSIONS, decode_image, image_key, is_image_file
from cast.data.shards import INFO_FILE, Counters, is_shard_set, iter_raw_samples, list_shards


@dataclass
class NamedImage:
    name: str          # unique stem used for output files
    image: np.ndarray  # uint8 [H, W, 3]


def _iter_shard_images(source: str) -> Iterator[NamedImage]:
    """The image of every sample of a shard set (named by ``__key__``; samples without one are passed
    over); a damaged tar raises ``ValueError`` naming it, after the images read before the damage."""
    for shard in list_shards(source).shards:
        damage = Counters()
        for sample in iter_raw_samples(shard.url, damage):
            key = image_key(sample)
            if key is not None:
                image = decode_image(sample[key], f"{shard.url}:{sample['__key__']}.{key}")
                yield NamedImage(sample["__key__"].replace("/", "_"), np.asarray(image))
        if damage:
            raise ValueError(damage.messages[0])


def _image_urls(source: str) -> list[str]:
    fs, path = fsspec.core.url_to_fs(source)
    if is_image_file(path):
        return [source]
    if fs.isdir(path):
        found = sorted(p for p in fs.find(path) if is_image_file(p))
        if not found:
            raise ValueError(f"{source}: no image files ({', '.join(IMAGE_EXTENSIONS)}) in this folder")
        return [fs.unstrip_protocol(p) if "://" in source else p for p in found]
    raise ValueError(f"{source}: expected an image file/URL, a folder of images, or shards "
                     f"(a .tar, or a folder/URL with {INFO_FILE})")


def iter_images(sources: list[str]) -> Iterator[NamedImage]:
    """Decoded images of every source, in order, with output names made unique (``name``, ``name_1``, ...)."""
    used: dict[str, int] = {}
    for source in sources:
        if is_shard_set(source):
            items: Iterator[NamedImage] = _iter_shard_images(source)
        else:
            items = (_read_image(url) for url in _image_urls(source))
        for item in items:
            count = used.get(item.name, 0)
            used[item.name] = count + 1
            yield item if count == 0 else NamedImage(f"{item.name}_{count}", item.image)


def _read_image(url: str) -> NamedImage:
    with fsspec.open(url, "rb") as handle:
        payload = handle.read()
    stem = posixpath.basename(url.rstrip("/")).rsplit(".", 1)[0] or "image"
    return NamedImage(stem, np.asarray(decode_image(payload, url)))


def centre_view(image: np.ndarray, size: int, nearest: bool = False) -> np.ndarray:
    """Resize the shorter side to ``size`` (bicubic; ``nearest`` for label maps) and centre-crop ``size`` x
    ``size`` (uint8 HWC, or HW for a label map)."""
    height, width = image.shape[:2]
    scale = size / min(height, width)
    new_w, new_h = max(size, round(width * scale)), max(size, round(height * scale))
    resample = Image.Resampling.NEAREST if nearest else Image.Resampling.BICUBIC
    resized = np.asarray(Image.fromarray(image).resize((new_w, new_h), resample))
    top, left = (new_h - size) // 2, (new_w - size) // 2
    return np.ascontiguousarray(resized[top:top + size, left:left + size])
