"""Recipe transforms: output contract per recipe, MoCo view asymmetry, joint image/mask geometry."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import transforms as T

from cast.data.transforms import (
    IGNORE_INDEX,
    LinearRecipe,
    MocoRecipe,
    RandomGaussianBlur,
    SegmentationRecipe,
    _random_crop_box,
    build_recipe,
    to_input,
)


@pytest.fixture()
def photo() -> Image.Image:
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:80, 0:100]
    image = np.stack([xx * 2, yy * 3, (xx + yy)], -1) % 256 + rng.integers(0, 20, (80, 100, 1))
    return Image.fromarray(image.clip(0, 255).astype(np.uint8))


@pytest.mark.parametrize("name", ["moco", "supervised", "eval", "linear", "linear_eval"])
def test_views_and_tensors_follow_the_contract(name, photo):
    random.seed(0)
    torch.manual_seed(0)
    recipe = build_recipe(name, 48)
    views, mask = recipe.augment(photo)
    assert mask is None and len(views) == recipe.num_views == (2 if name == "moco" else 1)
    for view in views:
        assert view.shape == (48, 48, 3) and view.dtype == np.uint8
        shipped = recipe.finish(view)  # uint8 crosses the DataLoader, except DeiT's (random erasing)
        assert shipped.dtype == (torch.float32 if name == "supervised" else torch.uint8)
        tensor = to_input(shipped)  # what to_device does on the device
        assert tensor.shape == (3, 48, 48) and tensor.dtype == torch.float32
        if name != "supervised":
            assert np.array_equal(shipped.permute(1, 2, 0).numpy(), view)
        low, high = (-6, 6) if name == "supervised" else (-2.2, 2.7)  # random erasing draws N(0, 1) pixels
        assert low < tensor.min() and tensor.max() < high  # ImageNet-normalised [0, 1] input
        assert tensor.std() > 0.1


def test_eval_is_deterministic_resize_then_centre_crop(photo):
    recipe = build_recipe("eval", 56)
    first, second = recipe.augment(photo)[0][0], recipe.augment(photo)[0][0]
    assert np.array_equal(first, second)
    resized = photo.resize((int(100 * 64 / 80), 64), Image.BICUBIC)  # short side 56 * 256 / 224 = 64
    left = (resized.width - 56) // 2
    expected = np.asarray(resized)[4:60, left : left + 56]
    assert np.abs(first.astype(int) - expected.astype(int)).mean() < 2


def test_linear_probe_recipe_is_the_reference_crop_and_flip_only(photo):
    """MoCo v3 lincls (§5.2): RandomResizedCrop with torchvision's defaults, then a flip; no colour step."""
    crop, flip = LinearRecipe(48).view.transforms
    assert isinstance(crop, T.RandomResizedCrop) and isinstance(flip, T.RandomHorizontalFlip)
    assert crop.size == (48, 48) and crop.scale == (0.08, 1.0) and crop.ratio == pytest.approx((3 / 4, 4 / 3))
    assert crop.interpolation == T.InterpolationMode.BILINEAR and flip.p == 0.5
    flat = Image.new("RGB", (100, 80), (200, 40, 90))
    left_half_darker = []
    torch.manual_seed(0)
    recipe = build_recipe("linear", 48)
    for _ in range(40):
        (view,), _ = recipe.augment(flat)
        assert (view == (200, 40, 90)).all()  # colours untouched: no jitter, grayscale, blur or solarize
        (view,), _ = recipe.augment(photo.crop((0, 0, 48, 80)))  # x-gradient: flips reverse it
        left_half_darker.append(view[:, :24].mean() < view[:, 24:].mean())
    assert 10 < sum(left_half_darker) < 30  # about half the views flipped
    crops = {recipe.augment(photo)[0][0].tobytes() for _ in range(5)}
    assert len(crops) == 5  # a random crop each time


def test_linear_eval_is_bilinear_resize_then_centre_crop(photo):
    recipe = build_recipe("linear_eval", 56)
    (view,), _ = recipe.augment(photo)
    resized = photo.resize((int(100 * 64 / 80), 64), Image.BILINEAR)  # short side 56 * 256 / 224 = 64
    left = (resized.width - 56) // 2
    expected = np.asarray(resized)[4:60, left : left + 56]
    assert np.abs(view.astype(int) - expected.astype(int)).mean() < 2
    bicubic = build_recipe("eval", 56).augment(photo)[0][0]
    assert not np.array_equal(view, bicubic)  # the DeiT eval (bicubic) is a different transform


def test_moco_views_are_asymmetric_as_in_the_reference():
    recipe = MocoRecipe(32)
    view1, view2 = (list(view.transforms) for view in recipe.views)
    blur1 = [
        t for t in view1 if isinstance(t, T.RandomApply) and isinstance(t.transforms[0], RandomGaussianBlur)
    ]
    blur2 = [
        t for t in view2 if isinstance(t, T.RandomApply) and isinstance(t.transforms[0], RandomGaussianBlur)
    ]
    assert [b.p for b in blur1] == [1.0] and [b.p for b in blur2] == [0.1]
    assert not [t for t in view1 if isinstance(t, T.RandomSolarize)]
    assert [(t.p, t.threshold) for t in view2 if isinstance(t, T.RandomSolarize)] == [(0.2, 128)]
    crop = view1[0]
    assert isinstance(crop, T.RandomResizedCrop) and crop.scale == (0.08, 1.0)
    jitter = view1[1]
    assert jitter.p == 0.8 and jitter.transforms[0].brightness == (0.6, 1.4)


def test_moco_view_one_is_blurred_more_than_view_two():
    """Measured, not just configured: view 1 (blur p=1) keeps less high-frequency energy than view 2."""
    noise = np.random.default_rng(1).integers(0, 256, (64, 64), dtype=np.uint8)
    image = Image.fromarray(np.stack([noise] * 3, -1)).resize((256, 256), Image.NEAREST)
    recipe = MocoRecipe(64)
    random.seed(0)
    torch.manual_seed(0)
    energy = {0: [], 1: []}
    for _ in range(40):
        views, _ = recipe.augment(image)
        for index, view in enumerate(views):
            energy[index].append(np.abs(np.diff(view.astype(float).mean(-1), axis=1)).mean())
    assert np.median(energy[0]) < 0.8 * np.median(energy[1])


def test_segmentation_transforms_image_and_mask_jointly():
    # mask = which quadrant a pixel is in; image colour encodes the same quadrant
    size = 64
    quadrant = (np.arange(size)[:, None] >= size // 2) * 2 + (np.arange(size)[None, :] >= size // 2)
    palette = np.array([[255, 0, 0], [0, 255, 0], [0, 0, 255], [255, 255, 0]], dtype=np.uint8)
    image = Image.fromarray(palette[quadrant])
    mask = Image.fromarray(quadrant.astype(np.uint8))
    recipe = SegmentationRecipe(48, photometric=False)  # colours must stay comparable to the palette
    torch.manual_seed(3)
    for _ in range(10):
        (view,), mask_t = recipe.augment(image, mask)
        assert view.shape == (48, 48, 3) and view.dtype == np.uint8
        assert mask_t.shape == (48, 48) and mask_t.dtype == torch.int64
        valid = mask_t != IGNORE_INDEX
        assert set(torch.unique(mask_t).tolist()) <= {0, 1, 2, 3, IGNORE_INDEX}
        colour_class = (
            np.abs(view[:, :, None, :].astype(int) - palette[None, None].astype(int)).sum(-1).argmin(-1)
        )
        agree = (torch.from_numpy(colour_class) == mask_t)[valid].float().mean()
        assert agree > 0.95  # same crop, scale and flip on both
        if (~valid).any():
            assert view[~valid.numpy()].max() == 0  # padding: black image, ignore mask
    with pytest.raises(ValueError, match="needs a mask"):
        recipe.augment(image)


def test_segmentation_recipe_is_seeded_and_keeps_classes_apart():
    """Same torch seed -> same crop, flip and colours; the crop avoids one class filling > 75 %."""
    rng = np.random.default_rng(1)
    mask = np.zeros((96, 128), dtype=np.uint8)
    mask[60:90, 10:40] = 3  # a small object on a big background: most random crops are > 75 % background
    image = Image.fromarray(rng.integers(0, 255, (96, 128, 3), dtype=np.uint8))
    recipe = build_recipe("segmentation", 48)
    draws = []
    for _ in range(2):
        torch.manual_seed(7)
        draws.append([recipe.augment(image, Image.fromarray(mask)) for _ in range(5)])
    for (view_a, mask_a), (view_b, mask_b) in zip(*draws):
        assert np.array_equal(view_a[0], view_b[0]) and torch.equal(mask_a, mask_b)
    square = torch.zeros(120, 120, dtype=torch.int64)
    square[:60, :60] = 1  # crops of 60 px: many hold > 75 % of one class

    def balanced(cat_max_ratio):
        torch.manual_seed(0)
        boxes = [_random_crop_box(square, 60, cat_max_ratio) for _ in range(200)]
        fractions = [(60 - min(top, 60)) * (60 - min(left, 60)) / 3600 for top, left in boxes]
        return sum(0.25 < f < 0.75 for f in fractions) / len(fractions)

    assert balanced(0.75) > 0.9 > 0.5 > balanced(1.0)


def test_every_randaugment_op_of_the_deit_recipe_takes_the_top_magnitude(photo):
    """rand-m9-mstd0.5 clips its Gaussian magnitude at 10, where increasing posterize keeps 0 bits: Pillow 13
    refuses 0 bits, so unpatched this killed a loader worker about once per 44 posterize draws."""
    recipe = build_recipe("supervised", 48)
    ops = [op for step in recipe.pil_part.transforms for op in getattr(step, "ops", ())]
    assert len(ops) > 10 and any(op.name == "PosterizeIncreasing" for op in ops)
    for op in ops:
        op.prob, op.magnitude_std = 1.0, 0.0
        op.magnitude = 10
        assert op(photo).size == photo.size, op.name
        if op.name == "PosterizeIncreasing":
            assert np.asarray(op(photo)).max() == 0  # 0 bits kept: black, as Pillow before 13 gave
            op.magnitude = 9  # 1 bit kept
            assert set(np.unique(np.asarray(op(photo)))) == {0, 128}
