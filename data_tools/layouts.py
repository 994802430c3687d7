"""Source data-set layouts -> a flat list of samples to shard.

Each layout yields ``SourceSample`` records (file paths, not bytes) so planning stays cheap and
the original image bytes are copied into the shards untouched.
"""

from __future__ import annotations

import logging
import posixpath
from dataclasses import dataclass, field

import fsspec

from cast.data.samples import is_image_file
from cast.data.transforms import IGNORE_INDEX

LAYOUTS = ("imagefolder", "flat", "voc", "pcontext", "ade20k", "partimagenet")
DENSE_LAYOUTS = ("voc", "pcontext", "ade20k")

# Class names in label order, as the benchmarks' label PNGs number them (mmseg's lists).
VOC_CLASSES = tuple(
    "background aeroplane bicycle bird boat bottle bus car cat chair cow diningtable dog horse motorbike "
    "person pottedplant sheep sofa train tvmonitor".split()
)
# Pascal Context, the 60-class variant Segmenter trains on (0 = background, no zero reduction).
PCONTEXT_CLASSES = tuple(
    "background aeroplane bag bed bedclothes bench bicycle bird boat book bottle building bus cabinet car "
    "cat ceiling chair cloth computer cow cup curtain dog door fence floor flower food grass ground horse "
    "keyboard light motorbike mountain mouse person plate platform pottedplant road rock sheep shelves "
    "sidewalk sign sky snow sofa table track train tree truck tvmonitor wall water window wood".split()
)
# ADE20K SceneParsing: PNG value 0 is "other" and becomes the ignore label, value v > 0 is class v - 1
# (mmseg's reduce_zero_label), so these 150 names index the reduced labels.
ADE20K_CLASSES = tuple(
    name.strip()
    for name in (
        "wall,building,sky,floor,tree,ceiling,road,bed,windowpane,grass,cabinet,sidewalk,person,earth,door,"
        "table,mountain,plant,curtain,chair,car,water,painting,sofa,shelf,house,sea,mirror,rug,field,"
        "armchair,seat,fence,desk,rock,wardrobe,lamp,bathtub,railing,cushion,base,box,column,signboard,"
        "chest of drawers,counter,sand,sink,skyscraper,fireplace,refrigerator,grandstand,path,stairs,runway,"
        "case,pool table,pillow,screen door,stairway,river,bridge,bookcase,blind,coffee table,toilet,flower,"
        "book,hill,bench,countertop,stove,palm,kitchen island,computer,swivel chair,boat,bar,arcade machine,"
        "hovel,bus,towel,light,truck,tower,chandelier,awning,streetlight,booth,television receiver,airplane,"
        "dirt track,apparel,pole,land,bannister,escalator,ottoman,bottle,buffet,poster,stage,van,ship,"
        "fountain,conveyer belt,canopy,washer,plaything,swimming pool,stool,barrel,basket,waterfall,tent,bag,"
        "minibike,cradle,oven,ball,food,step,tank,trade name,microwave,pot,animal,bicycle,lake,dishwasher,"
        "screen,blanket,sculpture,hood,sconce,vase,traffic light,tray,ashcan,fan,pier,crt screen,plate,"
        "monitor,bulletin board,shower,radiator,glass,clock,flag"
    ).split(",")
)
CLASSES_FILE = "classes.txt"  # optional, at the root of a voc/pcontext folder: one class name per line


@dataclass(frozen=True)
class SourceSample:
    key: str
    image: str
    size: int
    label: int = -1
    mask: str | None = None
    meta: dict = field(default_factory=dict, compare=False, hash=False)
    num_classes: int = 0  # > 0: every mask value must be a class id (after reduction) or the ignore label
    reduce_zero_label: bool = False  # mask value 0 -> ignore, v -> v - 1 (ADE20K)


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
        folders = [
            posixpath.basename(info["name"].rstrip("/"))
            for info in fs.ls(root, detail=True)
            if info.get("type") == "directory"
        ]
        samples, classes = _imagefolder(rel, folders)
    elif layout == "flat":
        samples, classes = [SourceSample(_key(r), p, s) for r, (p, s) in rel.items() if is_image_file(r)], []
    elif layout in ("voc", "pcontext"):
        samples, classes = _voc(fs, root, rel, split_list, layout)
    elif layout == "partimagenet":
        samples, classes = _partimagenet(fs, root, rel, split_list)
    else:
        samples, classes = _ade20k(rel, split_list)
    if not samples:
        raise ValueError(f"--src {src}: no images found for layout {layout!r}")
    samples.sort(key=lambda sample: sample.key)
    keys = [sample.key for sample in samples]
    if len(set(keys)) != len(keys):
        raise ValueError(
            f"--src {src}: two images map to the same sample key (same name, different extension?)"
        )
    return samples, classes


def _imagefolder(
    rel: dict[str, tuple[str, int]], folders: list[str]
) -> tuple[list[SourceSample], list[str]]:
    """Classes are the top-level folders, sorted, as torchvision's ``ImageFolder`` numbers them, empty
    ones included: a class with no images in one split keeps the index it has in every other split.
    (Object stores have no empty folders; there a class needs at least one object under its prefix.)"""
    images = {r: v for r, v in rel.items() if is_image_file(r) and "/" in r}
    classes = sorted(set(folders) | {r.split("/", 1)[0] for r in rel if "/" in r})
    empty = sorted(set(classes) - {r.split("/", 1)[0] for r in images})
    if empty:
        logging.getLogger(__name__).warning(
            "imagefolder: %d class folder(s) without images keep their index: %s",
            len(empty),
            ", ".join(empty[:8]),
        )
    index = {name: i for i, name in enumerate(classes)}
    samples = [
        SourceSample(_key(r), p, s, label=index[r.split("/", 1)[0]], meta={"class": r.split("/", 1)[0]})
        for r, (p, s) in images.items()
    ]
    return samples, classes


def check_labels(samples: list[SourceSample], classes: list[str]) -> None:
    """Every ``cls`` to be written must index ``classes`` (-1 = unlabelled, no ``cls``): a ValueError names
    the first bad sample and its file, before any shard is written."""
    for sample in samples:
        if sample.label != -1 and not 0 <= sample.label < len(classes):
            raise ValueError(
                f"sample {sample.key} ({sample.image}): label {sample.label} outside the "
                f"{len(classes)} classes (0..{len(classes) - 1})"
            )


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


def _read_ids(fs, root: str, split_list: str) -> list[str]:
    """Ids of a split list (first word per line); relative paths are under the layout's root."""
    remote = "://" in split_list or split_list.startswith("/")
    opened = fsspec.open(split_list, "rt") if remote else fs.open(posixpath.join(root, split_list), "rt")
    with opened as handle:
        return [line.split()[0] for line in handle if line.strip()]


def _voc(
    fs, root: str, rel: dict[str, tuple[str, int]], split_list: str | None, layout: str = "voc"
) -> tuple[list[SourceSample], list[str]]:
    """``JPEGImages/<id>.jpg`` + ``SegmentationClass/<id>.png`` (voc) or ``SegmentationClassContext/<id>.png``
    (pcontext, the 60-class label PNGs); classes from ``classes.txt`` when the folder has one (the pasted
    sample set), else the benchmark's."""
    mask_folder = "SegmentationClassContext/" if layout == "pcontext" else "SegmentationClass/"
    images, masks = _images_and_masks(rel, "JPEGImages/", mask_folder)
    ids = _read_ids(fs, root, split_list) if split_list else sorted(set(images) & set(masks))
    missing = [i for i in ids if i not in images or i not in masks]
    if missing:
        raise FileNotFoundError(
            f"{layout} split lists {len(missing)} ids without JPEGImages/<id>.jpg or "
            f"{mask_folder}<id>.png, e.g. {missing[0]!r}"
        )
    if CLASSES_FILE in rel:
        classes = [line.strip() for line in fs.cat_file(rel[CLASSES_FILE][0]).decode().splitlines()]
        classes = [name for name in classes if name]
    else:
        classes = list(PCONTEXT_CLASSES if layout == "pcontext" else VOC_CLASSES)
    samples = [
        SourceSample(_key(i), images[i][0], images[i][1] + masks[i][1], mask=masks[i][0],
                     num_classes=len(classes))
        for i in ids
    ]
    return samples, classes


def _ade20k(rel: dict[str, tuple[str, int]], split: str | None = None
            ) -> tuple[list[SourceSample], list[str]]:
    """``images/<split>/*.jpg`` + ``annotations/<split>/*.png`` (ADEChallengeData2016); ``--split-list``
    names the split folder (training, validation), else every split is taken."""
    if split:
        rel = {r: v for r, v in rel.items() if r.startswith((f"images/{split}/", f"annotations/{split}/"))}
    images, masks = _images_and_masks(rel, "images/", "annotations/")
    unmatched = sorted(set(images) ^ set(masks))
    if unmatched:
        raise FileNotFoundError(
            f"ADE20K layout: {len(unmatched)} images/ and annotations/ entries without a "
            f"partner, e.g. {unmatched[0]!r}"
        )
    samples = [
        SourceSample(_key(i), v[0], v[1] + masks[i][1], mask=masks[i][0], num_classes=len(ADE20K_CLASSES),
                     reduce_zero_label=True)
        for i, v in images.items()
    ]
    return samples, list(ADE20K_CLASSES)


def mask_bytes(sample: SourceSample, data: bytes) -> bytes:
    """The ``seg.png`` member of a dense sample: label values checked against its classes (ValueError
    naming the file when one is neither a class id nor 255) and, for ADE20K, reduced by one (0 -> 255)."""
    if not sample.num_classes and not sample.reduce_zero_label:
        return data
    import io

    import numpy as np
    from PIL import Image

    from cast.data.samples import decode_mask

    labels = np.asarray(decode_mask(data, sample.mask))
    if labels.ndim != 2:
        raise ValueError(f"{sample.mask}: a label PNG needs one channel of class ids, got {labels.shape}")
    labels = labels.astype(np.int64)
    if sample.reduce_zero_label:
        labels = np.where((labels == 0) | (labels == IGNORE_INDEX), IGNORE_INDEX, labels - 1)
    bad = np.unique(labels[(labels != IGNORE_INDEX) & (labels >= sample.num_classes)])
    if sample.num_classes and bad.size:
        shift = 1 if sample.reduce_zero_label else 0
        raise ValueError(
            f"{sample.mask}: label value(s) {(bad + shift).tolist()[:8]} outside the "
            f"{sample.num_classes} classes (0..{sample.num_classes - 1 + shift}) and not {IGNORE_INDEX}"
        )
    if not sample.reduce_zero_label:
        return data  # valid: copied untouched (palette PNGs keep their palette)
    buffer = io.BytesIO()
    Image.fromarray(labels.astype(np.uint8), mode="L").save(buffer, format="PNG")
    return buffer.getvalue()


def _partimagenet(fs, root: str, rel: dict[str, tuple[str, int]], split: str | None
                  ) -> tuple[list[SourceSample], list[str]]:
    """PartImageNet (COCO style): ``annotations/<split>.json`` and ``images/<split>/<file_name>``; the
    split comes from ``--split-list`` (train, val, test) unless there is only one.

    ``seg.png`` holds the part of every pixel (category order of the JSON, later annotations painted
    over earlier ones as the reference's loader does; background = the last id), and the classes are
    ``<super-category>/<part>`` plus ``background``, so the object of every part is in the manifest.
    Masks are rasterised with pycocotools into a temporary folder (removed at exit), as shards copy mask
    files; an annotation that does not decode is named in a warning and left out.
    """
    import atexit
    import json
    import shutil
    import tempfile

    import numpy as np
    from PIL import Image
    from pycocotools import mask as coco_mask

    splits = sorted(posixpath.splitext(r[len("annotations/"):])[0] for r in rel
                    if r.startswith("annotations/") and r.endswith(".json") and r.count("/") == 1)
    if split is None and len(splits) == 1:
        split = splits[0]
    if split not in splits:
        raise FileNotFoundError(f"partimagenet layout: choose a split with --split-list, one of {splits} "
                                f"(annotations/<split>.json), got {split!r}")
    record = json.loads(fs.cat_file(posixpath.join(root, "annotations", f"{split}.json")))
    categories = record.get("categories") or []
    if not categories or any(not c.get("supercategory") for c in categories):
        raise ValueError(f"annotations/{split}.json: needs 'categories' with a 'supercategory' each")
    index = {c["id"]: i for i, c in enumerate(categories)}
    classes = [f"{c['supercategory']}/{c['name']}" for c in categories] + ["background"]
    by_image: dict[int, list[dict]] = {}
    for annotation in record.get("annotations", []):
        by_image.setdefault(annotation["image_id"], []).append(annotation)
    prefix = f"images/{split}/"
    by_name = {posixpath.basename(r): r for r in rel if r.startswith(prefix)}
    folder = tempfile.mkdtemp(prefix="cast-partimagenet-masks-")
    atexit.register(shutil.rmtree, folder, ignore_errors=True)
    samples = []
    for image in sorted(record.get("images", []), key=lambda item: item["id"]):
        relative = prefix + image["file_name"]
        relative = relative if relative in rel else by_name.get(posixpath.basename(image["file_name"]), "")
        if relative not in rel:
            raise FileNotFoundError(f"annotations/{split}.json: image {image['file_name']} is not under "
                                    f"{prefix}")
        height, width = image["height"], image["width"]
        labels = np.full((height, width), len(categories), dtype=np.uint8)
        for annotation in by_image.get(image["id"], []):
            try:
                segmentation = annotation["segmentation"]
                if isinstance(segmentation, list):
                    rle = coco_mask.merge(coco_mask.frPyObjects(segmentation, height, width))
                elif isinstance(segmentation.get("counts"), list):
                    rle = coco_mask.frPyObjects(segmentation, height, width)
                else:
                    rle = segmentation
                labels[coco_mask.decode(rle) > 0] = index[annotation["category_id"]]
            except (KeyError, TypeError, ValueError, IndexError) as error:
                logging.getLogger(__name__).warning("annotations/%s.json: annotation %s of %s left out (%s)",
                                                    split, annotation.get("id"), image["file_name"], error)
        key = _key(relative[len(prefix):])
        mask = posixpath.join(folder, f"{key.replace('/', '_')}.png")
        Image.fromarray(labels, mode="L").save(mask)
        path, size = rel[relative]
        samples.append(SourceSample(key, path, size, mask=mask, meta={"image_id": image["id"]}))
    return samples, classes
