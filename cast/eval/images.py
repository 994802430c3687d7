"""Images for inference: files, folders, URLs (through fsspec) or shards, cut to the model's square view.

The view is the reference's evaluation crop (resize the shorter side, centre crop), on which SEEDS runs
at full resolution, so segment borders follow superpixel borders at the view's pixel level.
"""

from __future__ import annotations

import io
import json
import posixpath
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass

import fsspec
import numpy as np
from PIL import Image, UnidentifiedImageError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".ppm")
SHARD_INFO = "_info.json"


@dataclass
class NamedImage:
    name: str          # unique stem used for output files
    image: np.ndarray  # uint8 [H, W, 3]


def _is_image(path: str) -> bool:
    return path.lower().endswith(IMAGE_EXTENSIONS)


def _decode(payload: bytes, source: str) -> np.ndarray:
    try:
        with Image.open(io.BytesIO(payload)) as picture:
            return np.asarray(picture.convert("RGB"))
    except (UnidentifiedImageError, OSError) as error:
        raise ValueError(f"{source}: not a readable image ({error})") from error


def read_shard_info(source: str) -> tuple[dict, str]:
    """(``_info.json`` contents, its URL) of a shard set given the file or its folder."""
    fs, path = fsspec.core.url_to_fs(source)
    info_path = path if path.endswith(SHARD_INFO) else posixpath.join(path, SHARD_INFO)
    if not fs.exists(info_path):
        raise ValueError(f"{source}: no {SHARD_INFO} (expected a shard folder or its {SHARD_INFO})")
    with fs.open(info_path, "r") as handle:
        try:
            return json.load(handle), fs.unstrip_protocol(info_path)
        except json.JSONDecodeError as error:
            raise ValueError(f"{info_path}: not valid JSON ({error})") from error


def _shard_urls(source: str) -> list[str]:
    """Tar URLs of a shard set given its ``_info.json``, its directory, or one ``.tar``."""
    fs, path = fsspec.core.url_to_fs(source)
    if path.endswith(".tar"):
        return [source]
    info, info_url = read_shard_info(source)
    info_path = fsspec.core.url_to_fs(info_url)[1]
    base = posixpath.dirname(info_path)
    urls = []
    for shard in info.get("shards", []):
        name = shard.get("url") or shard.get("name")
        if name is None:
            raise ValueError(f"{info_path}: a shard entry has neither 'url' nor 'name': {shard}")
        absolute = "://" in name or name.startswith("/")
        urls.append(name if absolute else fs.unstrip_protocol(posixpath.join(base, name)))
    if not urls:
        raise ValueError(f"{info_path}: lists no shards")
    return urls


def _iter_shard_images(url: str) -> Iterator[NamedImage]:
    """The first image member of every sample (``__key__`` = member name up to the first dot)."""
    with fsspec.open(url, "rb") as handle, tarfile.open(fileobj=handle, mode="r|*") as tar:
        seen: set[str] = set()
        for member in tar:
            if not member.isfile():
                continue
            base = posixpath.basename(member.name)
            key, _, extension = base.partition(".")
            key = posixpath.join(posixpath.dirname(member.name), key)
            if key in seen or not _is_image(f".{extension}") or extension == "seg.png":
                continue
            seen.add(key)
            payload = tar.extractfile(member).read()
            yield NamedImage(key.replace("/", "_"), _decode(payload, f"{url}:{member.name}"))


def _image_urls(source: str) -> list[str]:
    fs, path = fsspec.core.url_to_fs(source)
    if _is_image(path):
        return [source]
    if fs.isdir(path):
        found = sorted(p for p in fs.find(path) if _is_image(p))
        if not found:
            raise ValueError(f"{source}: no image files ({', '.join(IMAGE_EXTENSIONS)}) in this folder")
        return [fs.unstrip_protocol(p) if "://" in source else p for p in found]
    raise ValueError(f"{source}: expected an image file/URL, a folder of images, or shards "
                     f"(a .tar, or a folder/URL with {SHARD_INFO})")


def is_shard_source(source: str) -> bool:
    fs, path = fsspec.core.url_to_fs(source)
    if path.endswith((".tar", SHARD_INFO)):
        return True
    return fs.isdir(path) and fs.exists(posixpath.join(path, SHARD_INFO))


def iter_images(sources: list[str]) -> Iterator[NamedImage]:
    """Decoded images of every source, in order, with output names made unique (``name``, ``name_1``, ...)."""
    used: dict[str, int] = {}
    for source in sources:
        if is_shard_source(source):
            items: Iterator[NamedImage] = (
                item for url in _shard_urls(source) for item in _iter_shard_images(url))
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
    return NamedImage(stem, _decode(payload, url))


def centre_view(image: np.ndarray, size: int) -> np.ndarray:
    """Resize the shorter side to ``size`` (bicubic) and centre-crop ``size`` x ``size`` (uint8 HWC)."""
    height, width = image.shape[:2]
    scale = size / min(height, width)
    new_w, new_h = max(size, round(width * scale)), max(size, round(height * scale))
    resized = np.asarray(Image.fromarray(image).resize((new_w, new_h), Image.Resampling.BICUBIC))
    top, left = (new_h - size) // 2, (new_w - size) // 2
    return np.ascontiguousarray(resized[top:top + size, left:left + size])
