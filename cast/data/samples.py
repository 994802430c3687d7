"""What the members of a raw shard sample mean, and how they decode: the one place for it.

A raw sample is the dict ``cast.data.shards`` yields (``__key__``, ``__url__``, one bytes value per
member extension). Training, evaluation, the segment job and ``verify_shards`` all decode through
these functions, so a change in how images are read (bit depth, EXIF orientation) happens here once.
"""

from __future__ import annotations

import io

from PIL import Image, UnidentifiedImageError

# member extensions that hold the sample's image, in order of preference; ``seg.png`` is a mask
IMAGE_KEYS = ("jpg", "jpeg", "png", "webp", "bmp", "tif", "tiff", "ppm", "gif")
IMAGE_EXTENSIONS = tuple(f".{key}" for key in IMAGE_KEYS)
MASK_KEY = "seg.png"
LABEL_KEY = "cls"
NO_LABEL = -1


def is_image_file(path: str) -> bool:
    """Whether a file name has an image extension (the same ones a shard member may carry)."""
    return path.lower().endswith(IMAGE_EXTENSIONS)


def image_key(sample: dict) -> str | None:
    """The member extension holding the image (``None`` when the sample has none)."""
    return next((key for key in IMAGE_KEYS if key in sample), None)


def decode_image(data: bytes, source: str) -> Image.Image:
    """Encoded image bytes -> an RGB image; ``ValueError`` naming ``source`` when they are not one."""
    try:
        with Image.open(io.BytesIO(data)) as picture:
            return picture.convert("RGB")
    except (UnidentifiedImageError, OSError) as error:
        raise ValueError(f"{source}: not a readable image ({error})") from error


def decode_mask(data: bytes, source: str) -> Image.Image:
    """A ``seg.png`` member -> the label image as stored (no mode conversion: values are class ids)."""
    try:
        mask = Image.open(io.BytesIO(data))
        mask.load()
    except (UnidentifiedImageError, OSError) as error:
        raise ValueError(f"{source}: not a readable mask ({error})") from error
    return mask


def decode_label(sample: dict) -> int:
    """The ``cls`` member as an int, ``NO_LABEL`` when the sample is unlabelled."""
    if LABEL_KEY not in sample:
        return NO_LABEL
    try:
        return int(sample[LABEL_KEY])
    except ValueError as error:
        raise ValueError(f"{sample.get('__key__')}.{LABEL_KEY}: not an integer label ({error})") from error
