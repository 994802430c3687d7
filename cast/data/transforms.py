"""Recipe transforms, split in two so superpixels see the augmented uint8 view.

Each recipe is an ``augment`` step (decoded PIL image -> list of uint8 HWC views, plus the mask
for segmentation) and a ``finish`` step (uint8 view -> the tensor a batch carries). The loader runs
the superpixel provider between the two, as the original computed SEEDS on the augmented view
before normalisation (``cast_reference.md`` §5).

``finish`` keeps uint8 ``[3, H, W]`` wherever the recipe ends in plain normalisation: a quarter of
the float32 bytes cross the DataLoader and the host-to-device copy, and ``to_input`` normalises on
the device. Only DeiT's recipe hands over normalised float32 (random erasing draws float pixels).
"""

from __future__ import annotations

import random
from collections.abc import Callable

import numpy as np
import torch
from PIL import Image, ImageFilter
from torchvision import transforms as T
from torchvision import tv_tensors
from torchvision.transforms import v2

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
IGNORE_INDEX = 255  # mask value of pixels that count for no class (VOC/ADE borders, crop padding)


def _channel_stats(images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    shape = (1,) * (images.dim() - 3) + (3, 1, 1)
    mean = torch.tensor(IMAGENET_MEAN, device=images.device).view(shape)
    std = torch.tensor(IMAGENET_STD, device=images.device).view(shape)
    return mean, std


def normalize(images01: torch.Tensor) -> torch.Tensor:
    """Images in [0, 1] (``[..., 3, H, W]``) -> ImageNet-normalised float32, what the models take."""
    mean, std = _channel_stats(images01)
    return (images01.float() - mean) / std


def denormalize(images: torch.Tensor) -> torch.Tensor:
    """ImageNet-normalised ``[..., 3, H, W]`` -> [0, 1] (what on-device superpixel providers take)."""
    mean, std = _channel_stats(images)
    return (images.float() * std + mean).clamp(0, 1)


def to_input(images: torch.Tensor) -> torch.Tensor:
    """A batch's images as the models take them: uint8 ones normalised here (on their device),
    float ones (already normalised by their recipe) unchanged."""
    if images.dtype == torch.uint8:
        return normalize(images.float().div_(255))
    return images


def to_unit(images: torch.Tensor) -> torch.Tensor:
    """A batch's images in [0, 1] (what on-device superpixel providers take), uint8 or normalised."""
    return images.float().div_(255) if images.dtype == torch.uint8 else denormalize(images)


def views_to_input(views: np.ndarray) -> torch.Tensor:
    """uint8 views ``[B, H, W, 3]`` -> normalised float ``[B, 3, H, W]``."""
    return normalize(torch.from_numpy(views).permute(0, 3, 1, 2).float() / 255)


class RandomGaussianBlur:
    """PIL Gaussian blur with sigma ~ U(0.1, 2.0), as MoCo v3 / BYOL use it."""

    def __init__(self, sigma: tuple[float, float] = (0.1, 2.0)):
        self.sigma = sigma

    def __call__(self, image: Image.Image) -> Image.Image:
        return image.filter(ImageFilter.GaussianBlur(radius=random.uniform(*self.sigma)))


def _moco_view(size: int, blur_p: float, solarize_p: float) -> T.Compose:
    steps = [
        T.RandomResizedCrop(size, scale=(0.08, 1.0)),
        T.RandomApply([T.ColorJitter(0.4, 0.4, 0.2, 0.1)], p=0.8),
        T.RandomGrayscale(p=0.2),
        T.RandomApply([RandomGaussianBlur()], p=blur_p),
    ]
    if solarize_p:
        steps.append(T.RandomSolarize(threshold=128, p=solarize_p))
    steps.append(T.RandomHorizontalFlip())
    return T.Compose(steps)


def _to_uint8(image: Image.Image) -> np.ndarray:
    return np.array(image.convert("RGB"), dtype=np.uint8)


class Recipe:
    """``augment(image, mask) -> (views_uint8, mask)`` then ``finish(view_uint8) -> tensor``: uint8
    [3, H, W], normalised later by ``to_input``, unless the recipe overrides it."""

    num_views = 1
    needs_mask = False  # segmentation recipes read seg.png with the image and need no cls label

    def __init__(self, size: int):
        self.size = size

    def augment(
        self, image: Image.Image, mask: Image.Image | None = None
    ) -> tuple[list[np.ndarray], torch.Tensor | None]:
        raise NotImplementedError

    def finish(self, view: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(view).permute(2, 0, 1).contiguous()


class MocoRecipe(Recipe):
    """Asymmetric views (§5.1): view 1 always blurred; view 2 rarely blurred, sometimes solarised."""

    num_views = 2

    def __init__(self, size: int):
        super().__init__(size)
        self.views = (
            _moco_view(size, blur_p=1.0, solarize_p=0.0),
            _moco_view(size, blur_p=0.1, solarize_p=0.2),
        )

    def augment(self, image, mask=None):
        return [_to_uint8(view(image)) for view in self.views], None


def _posterize(image: Image.Image, bits_to_keep: int, **kwargs) -> Image.Image:
    """timm's posterize, with 0 bits kept giving black. RandAugment's increasing posterize keeps 0 bits at
    magnitude 10, drawn by rand-m9-mstd0.5 on about one application in 44: Pillow before 13 (what DeiT
    trained with) blacked the image, Pillow 13 raises in the loader worker."""
    from timm.data.auto_augment import posterize

    if bits_to_keep <= 0:
        return Image.new(image.mode, image.size)
    return posterize(image, bits_to_keep, **kwargs)


class SupervisedRecipe(Recipe):
    """DeiT training transform via timm (§5.3): RandAugment rand-m9-mstd0.5-inc1, jitter 0.3, bicubic,
    random erasing 0.25 (pixel mode). timm's ``separate=True`` hands back the geometric/colour part
    and the tensor part apart, so random erasing stays after normalisation as in DeiT."""

    def __init__(self, size: int):
        super().__init__(size)
        from timm.data import create_transform

        primary, secondary, final = create_transform(
            size,
            is_training=True,
            auto_augment="rand-m9-mstd0.5-inc1",
            color_jitter=0.3,
            interpolation="bicubic",
            re_prob=0.25,
            re_mode="pixel",
            re_count=1,
            mean=IMAGENET_MEAN,
            std=IMAGENET_STD,
            separate=True,
        )
        self.pil_part = T.Compose([*primary.transforms, *secondary.transforms])
        for step in self.pil_part.transforms:
            for op in getattr(step, "ops", ()):  # timm's RandAugment
                if op.name.startswith("Posterize"):
                    op.aug_fn = _posterize
        self.normalise = final

    def augment(self, image, mask=None):
        return [_to_uint8(self.pil_part(image))], None

    def finish(self, view):
        return self.normalise(Image.fromarray(view))


class EvalRecipe(Recipe):
    """Resize(size * 256/224) + CenterCrop(size): bicubic as DeiT evaluates (§5.3); bilinear, torchvision's
    default, for the linear probe's validation (``linear_eval``, MoCo v3 lincls, §5.2)."""

    def __init__(self, size: int, interpolation: T.InterpolationMode = T.InterpolationMode.BICUBIC):
        super().__init__(size)
        self.resize = T.Compose(
            [T.Resize(int(size * 256 / 224), interpolation=interpolation), T.CenterCrop(size)]
        )

    def augment(self, image, mask=None):
        return [_to_uint8(self.resize(image))], None


class LinearRecipe(Recipe):
    """Linear-probe training view (§5.2, MoCo v3 lincls): RandomResizedCrop(size) with torchvision's
    defaults (scale 0.08-1, ratio 3/4-4/3, bilinear) + horizontal flip, no colour or blur."""

    def __init__(self, size: int):
        super().__init__(size)
        self.view = T.Compose([T.RandomResizedCrop(size), T.RandomHorizontalFlip()])

    def augment(self, image, mask=None):
        return [_to_uint8(self.view(image))], None


def _random_crop_box(mask: torch.Tensor, size: int, cat_max_ratio: float, tries: int = 10):
    """(top, left) of a ``size`` crop (clipped to the image) in which no class
    covers more than ``cat_max_ratio`` of the labelled pixels, if one of ``tries`` draws finds one
    (mmseg's RandomCrop); ``torch`` RNG, so the reader's per-epoch seed makes it reproducible."""
    height, width = mask.shape[-2:]
    top = left = 0
    for _ in range(tries):
        top = int(torch.randint(max(height - size, 0) + 1, ()))
        left = int(torch.randint(max(width - size, 0) + 1, ()))
        if cat_max_ratio >= 1:
            break
        crop = mask[..., top : top + size, left : left + size]
        labels = crop[crop != IGNORE_INDEX]
        counts = torch.bincount(labels.flatten()) if labels.numel() else torch.zeros(1)
        if (counts > 0).sum() > 1 and counts.max() < cat_max_ratio * counts.sum():
            break
    return top, left


def _resize_pair(image: torch.Tensor, mask: torch.Tensor, height: int, width: int):
    image = v2.functional.resize(image, [height, width], antialias=True)
    mask = v2.functional.resize(mask, [height, width], interpolation=v2.InterpolationMode.NEAREST)
    return image, mask


def _pad_pair(image: torch.Tensor, mask: torch.Tensor, size: int):
    """Pad bottom/right up to ``size`` (image 0, mask the ignore label), as mmseg pads to the crop."""
    pad_h, pad_w = max(size - image.shape[-2], 0), max(size - image.shape[-1], 0)
    if pad_h or pad_w:
        image = v2.functional.pad(image, [0, 0, pad_w, pad_h], fill=0)
        mask = v2.functional.pad(mask, [0, 0, pad_w, pad_h], fill=IGNORE_INDEX)
    return image, mask


class SegmentationRecipe(Recipe):
    """The mmseg training pipeline on torchvision v2 (§5.4), image and mask jointly: rescale so the image
    fits ``scale x ratio`` (ratio ~ U(0.5, 2.0), aspect kept), random crop whose largest class covers at
    most ``cat_max_ratio``, flip 0.5, photometric distortion (brightness, contrast, saturation, hue, each
    p 0.5), then pad to the crop (image 0, mask the ignore label). ``scale`` defaults to (4 x crop, crop),
    mmseg's (2048, 512) at 512 px. Every draw uses torch's RNG, which the reader seeds per (seed, epoch,
    reader): resumable. Evaluation reads images as stored (``segmentation_eval``); ``cast.eval.dense``
    resizes and windows them."""

    needs_mask = True

    def __init__(self, size: int, scale: tuple[int, int] | None = None,
                 ratio_range: tuple[float, float] = (0.5, 2.0), cat_max_ratio: float = 0.75,
                 photometric: bool = True):
        super().__init__(size)
        self.scale = scale or (4 * size, size)
        self.ratio_range, self.cat_max_ratio = ratio_range, cat_max_ratio
        self.flip = v2.RandomHorizontalFlip()
        self.photometric = v2.RandomPhotometricDistort(
            brightness=(0.875, 1.125), contrast=(0.5, 1.5), saturation=(0.5, 1.5), hue=(-0.1, 0.1), p=0.5
        ) if photometric else None

    def augment(self, image, mask=None):
        if mask is None:
            raise ValueError("segmentation recipe needs a mask (seg.png) per sample")
        image_t = tv_tensors.Image(torch.from_numpy(_to_uint8(image)).permute(2, 0, 1))
        mask_t = tv_tensors.Mask(torch.from_numpy(np.asarray(mask, dtype=np.int64)))
        height, width = image_t.shape[-2:]
        low, high = self.ratio_range
        ratio = low + (high - low) * float(torch.rand(()))
        long_side, short_side = self.scale[0] * ratio, self.scale[1] * ratio
        factor = min(long_side / max(height, width), short_side / min(height, width))
        image_t, mask_t = _resize_pair(image_t, mask_t, max(1, round(height * factor)),
                                       max(1, round(width * factor)))
        top, left = _random_crop_box(mask_t, self.size, self.cat_max_ratio)
        window = (slice(None), slice(top, top + self.size), slice(left, left + self.size))
        image_t, mask_t = tv_tensors.Image(image_t[window]), tv_tensors.Mask(mask_t[window[1:]])
        image_t, mask_t = self.flip(image_t, mask_t)
        if self.photometric is not None:
            image_t = self.photometric(image_t)
        image_t, mask_t = _pad_pair(image_t, mask_t, self.size)
        view = image_t.as_subclass(torch.Tensor).permute(1, 2, 0).contiguous().numpy()
        return [view], mask_t.as_subclass(torch.Tensor).long()


class StoredRecipe(Recipe):
    """Image and mask as stored, unaugmented: evaluation protocols resize or window them themselves
    (segment retrieval to a long side, PartImageNet to a centre view), so ``size`` is not used."""

    needs_mask = True

    def augment(self, image, mask=None):
        if mask is None:
            raise ValueError("segmentation_eval recipe needs a mask (seg.png) per sample")
        return [_to_uint8(image)], torch.from_numpy(np.asarray(mask, dtype=np.int64))


RECIPES: dict[str, Callable[[int], Recipe]] = {
    "moco": MocoRecipe,
    "supervised": SupervisedRecipe,
    "eval": EvalRecipe,
    "linear": LinearRecipe,
    "linear_eval": lambda size: EvalRecipe(size, T.InterpolationMode.BILINEAR),
    "segmentation": SegmentationRecipe,
    "segmentation_eval": StoredRecipe,
}


def build_recipe(name: str, size: int) -> Recipe:
    if name not in RECIPES:
        raise ValueError(f"recipe {name!r}: expected one of {', '.join(RECIPES)}")
    return RECIPES[name](size)
