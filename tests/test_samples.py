"""How images decode: every PIL mode the way a user means it (pixel values checked)."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from cast.data.samples import decode_image


def _encode(picture: Image.Image, fmt: str = "PNG", **kwargs) -> bytes:
    out = io.BytesIO()
    picture.save(out, format=fmt, **kwargs)
    return out.getvalue()


def _pixels(data: bytes) -> np.ndarray:
    image = decode_image(data, "sample.png")
    assert image.mode == "RGB"
    return np.asarray(image)


def test_16_bit_png_is_scaled_not_clipped():
    values = np.linspace(0, 65535, 64 * 64).reshape(64, 64).astype(np.uint16)
    data = _encode(Image.fromarray(values))  # a 16-bit greyscale PNG
    assert Image.open(io.BytesIO(data)).mode.startswith("I")
    pixels = _pixels(data)
    expected = np.rint(values / 257.0).astype(np.uint8)
    assert np.array_equal(pixels[..., 0], expected) and np.array_equal(pixels[..., 2], expected)
    assert (pixels == 255).mean() < 0.01  # convert("RGB") alone made 98 % of them 255


@pytest.mark.parametrize("top, scale", [(1.0, 255.0), (200.0, 1.0)], ids=["unit-range", "0-255-range"])
def test_float_tiff_is_scaled_by_its_range(top, scale):
    values = np.linspace(0, top, 32 * 32, dtype=np.float32).reshape(32, 32)
    pixels = _pixels(_encode(Image.fromarray(values, "F"), "TIFF"))
    assert np.array_equal(pixels[..., 1], np.clip(np.rint(values.astype(np.float64) * scale), 0, 255))


def test_alpha_and_palette_transparency_are_composited_over_white():
    rgba = np.zeros((8, 8, 4), np.uint8)
    rgba[..., 0] = 200  # red under every pixel
    rgba[:4, :, 3] = 255  # top half opaque, bottom half fully transparent
    pixels = _pixels(_encode(Image.fromarray(rgba, "RGBA")))
    assert (pixels[:4] == [200, 0, 0]).all() and (pixels[4:] == 255).all()
    palette = Image.new("P", (8, 8), 1)
    palette.putpalette([0, 0, 0, 10, 20, 30] + [0] * 762)
    palette.paste(0, (0, 0, 8, 4))  # index 0, declared transparent, on the top half
    pixels = _pixels(_encode(palette, transparency=0))
    assert (pixels[:4] == 255).all() and (pixels[4:] == [10, 20, 30]).all()


def test_exif_orientation_is_applied():
    wide = np.zeros((10, 30, 3), np.uint8)
    wide[:, :10] = 255  # white on the left
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to view"
    pixels = _pixels(_encode(Image.fromarray(wide), "JPEG", exif=exif, quality=95))
    assert pixels.shape == (30, 10, 3)  # shown upright: tall
    assert pixels[:10].mean() > 200 and pixels[20:].mean() < 50  # the white band ends on top


def test_grey_cmyk_and_garbage():
    assert _pixels(_encode(Image.new("L", (4, 4), 77)))[0, 0].tolist() == [77, 77, 77]
    assert _pixels(_encode(Image.new("CMYK", (4, 4), (0, 0, 0, 0)), "JPEG")).shape == (4, 4, 3)
    with pytest.raises(ValueError, match="sample.png: not a readable image"):
        decode_image(b"not an image", "sample.png")
