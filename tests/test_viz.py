"""cast.viz: overlay layout and sizes, label-map PNGs that read back exactly, boundaries, fills."""

import io

import numpy as np
import pytest
from PIL import Image

from cast.viz import (
    HEADER_HEIGHT,
    PANEL_GAP,
    mean_colour_fill,
    palette,
    render_hierarchy,
    save_label_maps,
    save_overlay,
    segment_boundaries,
)
from tests.fixtures.mosaics import make_mosaic


def test_boundaries_mark_both_sides_of_a_border():
    labels = np.array([[0, 0, 1, 1]])
    assert segment_boundaries(labels).tolist() == [[False, True, True, False]]


def test_mean_colour_fill_by_hand():
    image = np.array([[[0, 0, 0], [10, 20, 30], [200, 200, 200]]], np.uint8)
    filled = mean_colour_fill(image, np.array([[0, 0, 1]]))
    assert filled.tolist() == [[[5, 10, 15], [5, 10, 15], [200, 200, 200]]]


def test_palette_is_deterministic_and_distinct():
    colours = palette(64)
    assert (colours == palette(64)).all()
    assert len({tuple(c) for c in colours}) == 64


@pytest.mark.parametrize("fill", ["mean", "palette"])
def test_overlay_png_size_and_content(tmp_path, fill):
    mosaic = make_mosaic(size=40, num_cells=5, seed=2)
    levels = np.stack([mosaic.cells, mosaic.mask])
    url = str(tmp_path / "nested" / "mosaic.png")
    save_overlay(url, mosaic.image, levels, fill=fill, min_panel_size=100)
    picture = Image.open(url)
    picture.load()
    scale = 3  # ceil(100 / 40)
    assert picture.format == "PNG" and picture.mode == "RGB"
    assert picture.size == (3 * 40 * scale + 2 * PANEL_GAP, HEADER_HEIGHT + 40 * scale)
    panel = np.asarray(picture)[HEADER_HEIGHT:, :40 * scale]
    np.testing.assert_array_equal(panel[::scale, ::scale], mosaic.image)  # first panel is the image


def test_render_without_titles_and_bad_input():
    image = np.zeros((8, 16, 3), np.uint8)
    levels = np.zeros((2, 8, 16), np.int64)
    assert render_hierarchy(image, levels, titles=False).shape == (8, 3 * 16 + 2 * PANEL_GAP, 3)
    with pytest.raises(ValueError, match="levels must be"):
        render_hierarchy(image, np.zeros((2, 8, 8), np.int64))
    with pytest.raises(ValueError, match="fill must be"):
        render_hierarchy(image, levels, fill="rainbow")


def test_label_maps_round_trip(tmp_path):
    rng = np.random.default_rng(0)
    small = rng.integers(0, 16, (12, 10))
    large = rng.integers(0, 1000, (12, 10))  # beyond a palette: 16-bit PNG
    written = save_label_maps(str(tmp_path), "photo", np.stack([small, large]))
    names = [w.rsplit("/", 1)[1] for w in written]
    assert names == ["photo_level1.png", "photo_level2.png", "photo_levels.npy"]
    first, second = Image.open(written[0]), Image.open(written[1])
    assert first.mode == "P" and second.mode.startswith("I")
    np.testing.assert_array_equal(np.asarray(first), small)
    np.testing.assert_array_equal(np.asarray(second), large)
    with open(written[2], "rb") as handle:
        np.testing.assert_array_equal(np.load(io.BytesIO(handle.read())), np.stack([small, large]))
