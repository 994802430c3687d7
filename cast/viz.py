"""Pictures of CAST's part-whole hierarchy: the image beside each level, segments filled and outlined.

Pure numpy + PIL, so it runs anywhere the model does. Every writer takes a path or any fsspec URL.

    panel = render_hierarchy(image_uint8_hwc, levels_lhw)           # uint8 [H', W', 3]
    save_overlay("out/overlays/cat.png", image, levels)
    save_label_maps("out/labels", "cat", levels)                    # level PNGs + one .npy
"""

from __future__ import annotations

import colorsys
import io
import posixpath

import fsspec
import numpy as np
from PIL import Image, ImageDraw, ImageFont

FILLS = ("mean", "palette")
HEADER_HEIGHT = 14
PANEL_GAP = 4


def palette(num_colours: int) -> np.ndarray:
    """``num_colours`` distinct RGB colours (uint8 [N, 3]); hues step by the golden ratio so neighbours
    in label order differ strongly, and the result is the same on every call."""
    colours = np.empty((num_colours, 3), dtype=np.uint8)
    for index in range(num_colours):
        hue = (index * 0.618033988749895) % 1.0
        saturation = 0.55 + 0.35 * ((index * 7) % 3) / 2
        value = 0.95 - 0.25 * ((index * 5) % 2)
        colours[index] = np.round(np.array(colorsys.hsv_to_rgb(hue, saturation, value)) * 255)
    return colours


def segment_boundaries(labels: np.ndarray) -> np.ndarray:
    """Pixels with a 4-neighbour of another label, on both sides of each border (bool [H, W])."""
    labels = np.asarray(labels)
    edge = np.zeros(labels.shape, dtype=bool)
    horizontal = labels[:, :-1] != labels[:, 1:]
    vertical = labels[:-1, :] != labels[1:, :]
    edge[:, :-1] |= horizontal
    edge[:, 1:] |= horizontal
    edge[:-1, :] |= vertical
    edge[1:, :] |= vertical
    return edge


def mean_colour_fill(image: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Each segment painted with its mean colour (uint8 [H, W, 3])."""
    flat = np.asarray(labels, dtype=np.int64).ravel()
    counts = np.bincount(flat).astype(np.float64)
    sums = np.stack([np.bincount(flat, weights=image[..., c].ravel(), minlength=counts.size)
                     for c in range(3)], axis=1)
    means = sums / np.maximum(counts, 1)[:, None]
    return np.round(means[flat]).astype(np.uint8).reshape(image.shape)


def palette_fill(image: np.ndarray, labels: np.ndarray, opacity: float = 0.55) -> np.ndarray:
    """The image tinted by a distinct colour per segment (uint8 [H, W, 3])."""
    labels = np.asarray(labels, dtype=np.int64)
    colours = palette(int(labels.max()) + 1).astype(np.float32)
    mixed = (1 - opacity) * image.astype(np.float32) + opacity * colours[labels]
    return np.round(mixed).astype(np.uint8)


def _check(image: np.ndarray, levels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    image = np.asarray(image)
    levels = np.asarray(levels)
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(f"viz: image must be uint8 [H, W, 3], got {image.dtype} {image.shape}")
    if levels.ndim == 2:
        levels = levels[None]
    if levels.ndim != 3 or levels.shape[1:] != image.shape[:2]:
        raise ValueError(f"viz: levels must be [L, H, W] matching the image {image.shape[:2]}, "
                         f"got {levels.shape}")
    if levels.size and levels.min() < 0:
        raise ValueError("viz: segment labels must be >= 0")
    return image, levels.astype(np.int64)


def _level_numbers(levels: np.ndarray, level_numbers: list[int] | None) -> list[int]:
    if level_numbers is None:
        return list(range(1, len(levels) + 1))
    if len(level_numbers) != len(levels):
        raise ValueError(f"viz: {len(level_numbers)} level numbers for {len(levels)} levels")
    return list(level_numbers)


def upscale_factor(height: int, width: int, min_panel_size: int) -> int:
    """Integer factor that brings the shorter side to at least ``min_panel_size`` (1 if it is already)."""
    return max(1, -(-min_panel_size // min(height, width)))


def render_hierarchy(
    image: np.ndarray,
    levels: np.ndarray,
    *,
    fill: str = "mean",
    boundary_colour: tuple[int, int, int] = (255, 255, 255),
    min_panel_size: int = 0,
    titles: bool = True,
    level_numbers: list[int] | None = None,
) -> np.ndarray:
    """The image followed by one panel per level: segments filled (``mean`` colour or ``palette`` tint)
    and outlined, as the paper's figures show the hierarchy. Small images are upscaled by an integer
    factor (nearest) to ``min_panel_size`` before drawing, so borders stay one pixel wide per side.
    ``level_numbers`` names the panels when ``levels`` is a subset (default 1..L).

    Returns uint8 [header + s*H, (L+1)*s*W + L*gap, 3], where the header exists only with ``titles``.
    """
    if fill not in FILLS:
        raise ValueError(f"viz: fill must be one of {FILLS}, got {fill!r}")
    image, levels = _check(image, levels)
    numbers = _level_numbers(levels, level_numbers)
    scale = upscale_factor(*image.shape[:2], min_panel_size) if min_panel_size else 1
    if scale > 1:
        image = image.repeat(scale, 0).repeat(scale, 1)
        levels = levels.repeat(scale, 1).repeat(scale, 2)
    height, width = image.shape[:2]
    header = HEADER_HEIGHT if titles else 0
    num_panels = levels.shape[0] + 1
    canvas = np.full((header + height, num_panels * width + (num_panels - 1) * PANEL_GAP, 3), 255, np.uint8)
    captions = ["image"]
    canvas[header:, :width] = image
    for index, (number, labels) in enumerate(zip(numbers, levels), start=1):
        panel = mean_colour_fill(image, labels) if fill == "mean" else palette_fill(image, labels)
        panel[segment_boundaries(labels)] = boundary_colour
        left = index * (width + PANEL_GAP)
        canvas[header:, left:left + width] = panel
        captions.append(f"level {number}: {len(np.unique(labels))}")
    if titles:
        picture = Image.fromarray(canvas)
        draw = ImageDraw.Draw(picture)
        font = ImageFont.load_default()
        for index, caption in enumerate(captions):
            draw.text((index * (width + PANEL_GAP) + 2, 1), caption, fill=(0, 0, 0), font=font)
        canvas = np.asarray(picture)
    return canvas


def _write_bytes(url: str, payload: bytes) -> None:
    fs, path = fsspec.core.url_to_fs(url)
    parent = posixpath.dirname(path)
    if parent:
        fs.makedirs(parent, exist_ok=True)
    with fs.open(path, "wb") as handle:
        handle.write(payload)


def save_png(url: str, picture: Image.Image) -> None:
    buffer = io.BytesIO()
    picture.save(buffer, format="PNG")
    _write_bytes(url, buffer.getvalue())


def save_overlay(url: str, image: np.ndarray, levels: np.ndarray, **render_options) -> None:
    """Write ``render_hierarchy(image, levels, **render_options)`` as a PNG."""
    save_png(url, Image.fromarray(render_hierarchy(image, levels, **render_options)))


def label_map_image(labels: np.ndarray) -> Image.Image:
    """A label map as a lossless PNG image: palette mode (coloured, viewable) below 256 labels, 16-bit
    greyscale up to 65535. Reading it back with PIL gives the labels exactly."""
    labels = np.asarray(labels)
    if labels.ndim != 2 or labels.size == 0 or labels.min() < 0:
        raise ValueError(f"viz: a label map must be a non-empty [H, W] of labels >= 0, got {labels.shape}")
    top = int(labels.max())
    if top < 256:
        picture = Image.fromarray(labels.astype(np.uint8), mode="P")
        picture.putpalette(palette(256).ravel().tolist())
        return picture
    if top < 65536:
        return Image.fromarray(labels.astype(np.uint16))
    raise ValueError(f"viz: label {top} does not fit a 16-bit PNG")


def save_label_maps(out_dir: str, stem: str, levels: np.ndarray,
                    level_numbers: list[int] | None = None) -> list[str]:
    """Write ``{stem}_level{l}.png`` per level (l = ``level_numbers``, default 1..L) and ``{stem}_levels.npy``
    (int32 [L, H, W]) under ``out_dir``; returns the written URLs."""
    levels = np.asarray(levels)
    if levels.ndim != 3:
        raise ValueError(f"viz: levels must be [L, H, W], got {levels.shape}")
    written = []
    for index, labels in zip(_level_numbers(levels, level_numbers), levels):
        url = posixpath.join(out_dir, f"{stem}_level{index}.png")
        save_png(url, label_map_image(labels))
        written.append(url)
    buffer = io.BytesIO()
    np.save(buffer, levels.astype(np.int32))
    url = posixpath.join(out_dir, f"{stem}_levels.npy")
    _write_bytes(url, buffer.getvalue())
    written.append(url)
    return written


def semantic_panels(image: np.ndarray, target: np.ndarray, prediction: np.ndarray, num_classes: int,
                    ignore_index: int = 255, opacity: float = 0.6) -> np.ndarray:
    """[image | ground truth | prediction] side by side (uint8 [H, 3W + 2 gaps, 3]): each class tinted
    with its palette colour (the same in both maps), ignored ground-truth pixels left as the image."""
    image = np.asarray(image, dtype=np.uint8)
    colours = palette(num_classes).astype(np.float32)

    def tinted(labels: np.ndarray) -> np.ndarray:
        labels = np.asarray(labels, dtype=np.int64)
        known = labels != ignore_index
        mixed = image.astype(np.float32).copy()
        mixed[known] = (1 - opacity) * mixed[known] + opacity * colours[labels[known]]
        edges = segment_boundaries(np.where(known, labels, -1))
        mixed[edges] = 255
        return np.round(mixed).astype(np.uint8)

    gap = np.full((image.shape[0], PANEL_GAP, 3), 255, dtype=np.uint8)
    return np.concatenate([image, gap, tinted(target), gap, tinted(prediction)], axis=1)
