"""Source data-set layouts -> a flat list of samples to shard.

Each layout yields ``SourceSample`` records (file paths, not bytes) so planning stays cheap and
the original image bytes are copied into the shards untouched.
"""

from __future__ import annotations

import posixpath
from dataclasses import dataclass, field

import fsspec

from cast.data.samples import is_image_file

LAYOUTS = ("imagefolder", "flat", "voc", "ade20k")


@dataclass(frozen=True)
class SourceSample:
    key: str
    image: str
    size: int
    label: int = -1
    mask: str | None = None
    meta: dict = field(default_factory=dict, compare=False, hash=False)


def _key(relative: str) -> str:
    """Sample key from a relative path: no extension and no dots (WebDataset splits keys at the first dot)."""
    stem = posixpath.splitext(relative)[0]
    return stem.replace(".", "_")


def _listing(fs, root: str) -> dict[str, int]:
    found = fs.find(root, detail=True)
    return {path: info.get("size") or 0 for path, info in found.items() if info.get("type", "file") == "file"}


def scan(src: str, layout: str, split_list: str | None = None) -> tuple[list[SourceSample], list[str]]:
    """All samples of ``src`` in ``layout`` (sorted by key) and the class names (empty if unlabelled)."""
    if layout not in LAYOUTS:
        raise ValueError(f"--layout {layout!r}: expected one of {', '.join(LAYOUTS)}")
    fs, root = fsspec.core.url_to_fs(src)
    root = root.rstrip("/")
    if not fs.isdir(root):
        raise FileNotFoundError(f"--src {src}: not a directory")
    files = _listing(fs, root)
    rel = {posixpath.relpath(path, root): (path, size) for path, size in files.items()}
    if layout == "imagefolder":
        samples, classes = _imagefolder(rel)
    elif layout == "flat":
        samples, classes = [SourceSample(_key(r), p, s) for r, (p, s) in rel.items() if is_image_file(r)], []
    elif layout == "voc":
        samples, classes = _voc(fs, root, rel, split_list)
    else:
        samples, classes = _ade20k(rel)
    if not samples:
        raise ValueError(f"--src {src}: no images found for layout {layout!r}")
    samples.sort(key=lambda sample: sample.key)
    keys = [sample.key for sample in samples]
    if len(set(keys)) != len(keys):
        raise ValueError(
            f"--src {src}: two images map to the same sample key (same name, different extension?)"
        )
    return samples, classes


def _imagefolder(rel: dict[str, tuple[str, int]]) -> tuple[list[SourceSample], list[str]]:
    images = {r: v for r, v in rel.items() if is_image_file(r) and "/" in r}
    classes = sorted({r.split("/", 1)[0] for r in images})
    index = {name: i for i, name in enumerate(classes)}
    samples = [
        SourceSample(_key(r), p, s, label=index[r.split("/", 1)[0]], meta={"class": r.split("/", 1)[0]})
        for r, (p, s) in images.items()
    ]
    return samples, classes


def _images_and_masks(
    rel: dict[str, tuple[str, int]], image_folder: str, mask_folder: str
) -> tuple[dict[str, tuple[str, int]], dict[str, tuple[str, int]]]:
    """Images under ``image_folder`` and PNG masks under ``mask_folder``, each keyed by file stem."""

    def by_stem(folder: str, wanted) -> dict[str, tuple[str, int]]:
        return {
            posixpath.splitext(r.split("/", 1)[1])[0]: v
            for r, v in rel.items()
            if r.startswith(folder) and wanted(r)
        }

    return by_stem(image_folder, is_image_file), by_stem(mask_folder, lambda r: r.endswith(".png"))


def _voc(
    fs, root: str, rel: dict[str, tuple[str, int]], split_list: str | None
) -> tuple[list[SourceSample], list[str]]:
    images, masks = _images_and_masks(rel, "JPEGImages/", "SegmentationClass/")
    if split_list:
        with (
            fsspec.open(split_list, "rt")
            if "://" in split_list or split_list.startswith("/")
            else fs.open(posixpath.join(root, split_list), "rt") as handle
        ):
            ids = [line.split()[0] for line in handle if line.strip()]
    else:
        ids = sorted(set(images) & set(masks))
    missing = [i for i in ids if i not in images or i not in masks]
    if missing:
        raise FileNotFoundError(
            f"VOC split lists {len(missing)} ids without JPEGImages/<id>.jpg or "
            f"SegmentationClass/<id>.png, e.g. {missing[0]!r}"
        )
    samples = [SourceSample(_key(i), images[i][0], images[i][1] + masks[i][1], mask=masks[i][0]) for i in ids]
    return samples, []


def _ade20k(rel: dict[str, tuple[str, int]]) -> tuple[list[SourceSample], list[str]]:
    images, masks = _images_and_masks(rel, "images/", "annotations/")
    unmatched = sorted(set(images) ^ set(masks))
    if unmatched:
        raise FileNotFoundError(
            f"ADE20K layout: {len(unmatched)} images/ and annotations/ entries without a "
            f"partner, e.g. {unmatched[0]!r}"
        )
    return [SourceSample(_key(i), v[0], v[1] + masks[i][1], mask=masks[i][0]) for i, v in images.items()], []
