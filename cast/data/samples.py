"""What the members of a raw shard sample mean, and how they decode: the one place for it.

A raw sample is the dict ``cast.data.shards`` yields (``__key__``, ``__url__``, one bytes value per
member extension). Training, evaluation, the segment job and ``verify_shards`` all decode through
these functions, so a change in how images are read (bit depth, EXIF orientation) happens here once.
"""

from __future__ import annotations

import io

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

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
    """Encoded image bytes -> an 8-bit RGB image as the user sees it; ``ValueError`` naming ``source``
    when they are not one.

    ``convert("RGB")`` alone is wrong for several modes, so (decided here, once):
    - EXIF orientation is applied (a phone photo stored sideways is shown upright);
    - 16-bit (``I;16*``, and ``I``, which 16-bit PNG/TIFF readers give) is scaled by 255/65535, and
      float (``F``) by 255 when its values lie in [0, 1], else taken as 0..255; both rounded and
      clipped (``convert`` clips 16-bit values to 255: a 16-bit photo turns almost white);
    - transparency (``RGBA``, ``LA``, ``PA``, a palette or grey image with a transparent colour) is
      composited over white, instead of keeping the colour under transparent pixels.
    """
    try:
        with Image.open(io.BytesIO(data)) as picture:
            picture.load()
            return _to_rgb(ImageOps.exif_transpose(picture))
    except (UnidentifiedImageError, OSError, SyntaxError) as error:  # PIL's bad-EXIF errors included
        raise ValueError(f"{source}: not a readable image ({error})") from error


def _to_rgb(picture: Image.Image) -> Image.Image:
    mode = picture.mode
    if mode.startswith("I") or mode == "F":
        values = np.asarray(picture, dtype=np.float64)
        if mode == "F":
            scale = 255.0 if values.size and values.max() <= 1.0 else 1.0
        else:
            scale = 255.0 / 65535.0
        grey = np.clip(np.rint(values * scale), 0, 255).astype(np.uint8)
        return Image.fromarray(grey, "L").convert("RGB")
    if mode in ("P", "L", "RGB") and "transparency" in picture.info:
        picture = picture.convert("RGBA")
    if picture.mode in ("RGBA", "LA", "PA"):
        picture = picture.convert("RGBA")
        white = Image.new("RGBA", picture.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, picture).convert("RGB")
    return picture.convert("RGB")


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
