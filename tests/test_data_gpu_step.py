"""The loader's side of the static-shape step: the token budget and the poison samples it rejects."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import transforms as T

from cast.data import DataConfig, build_loader
from cast.data.batches import to_device
from cast.data.transforms import IMAGENET_MEAN, IMAGENET_STD
from cast.superpixels.base import SuperpixelProvider, merge_to_budget
from cast.train.config import ModelConfig
from data_tools.make_shards import build_shards
from tests.fixtures.datasets import make_imagefolder


class BlocksOrFlat(SuperpixelProvider):
    """4x4 blocks split in two by brightness (up to 32 segments); a flat image is one segment, as a
    colour-driven method gives on it (SEEDS keeps its initial grid instead, so it cannot make one)."""

    name = "blocks_or_flat"
    on_device = False

    def __call__(self, image: np.ndarray) -> np.ndarray:
        if image.std() < 1:
            return np.zeros(image.shape[:2], dtype=np.int64)
        h, w = image.shape[:2]
        rows, cols = np.arange(h)[:, None] * 4 // h, np.arange(w)[None, :] * 4 // w
        bright = image.mean(-1) > np.median(image.mean(-1))
        return (rows * 4 + cols) * 2 + bright


def _shards_with_flat_images(root: Path, flat: int) -> str:
    make_imagefolder(root / "src", num_classes=2, per_class=8, size=32)
    for i in range(flat):
        Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(root / "src" / "class_0" / f"flat_{i}.jpg")
    build_shards(str(root / "src"), str(root / "shards"), "imagefolder", max_count=5, seed=3, progress=False)
    return str(root / "shards")


def test_flat_images_are_skipped_counted_and_logged_and_the_epoch_goes_on(tmp_path, caplog):
    shards = _shards_with_flat_images(tmp_path, flat=3)
    cfg = DataConfig(shards=shards, recipe="eval", image_size=32, batch_size=4, num_workers=2,
                     shuffle_buffer=0, max_superpixels=20, min_superpixels=8)
    loader = build_loader(cfg, rank=0, world_size=1, epoch=0, provider=BlocksOrFlat())
    with caplog.at_level("WARNING"):
        batches = list(loader)
    assert len(batches) == len(loader) == 19 // 4  # full length: readers wrap around for the skipped
    assert loader.counters["too_few_superpixels"] == 3
    assert loader.counters["superpixels_merged"] > 0  # up to 32 segments, budget 20
    keys = [key for batch in batches for key in batch["key"]]
    assert not any("flat" in key for key in keys)
    skipped = [r.message for r in caplog.records if "fewer than" in r.message]
    assert len(skipped) == 3
    assert all(".tar" in m and "flat_" in m and "min_superpixels=8" in m for m in skipped)
    for batch in batches:
        maps = batch["superpixels"]
        assert maps.dtype == torch.int16 and batch["images"].dtype == torch.uint8 and int(maps.max()) < 20
        on_device = to_device(batch, "cpu")  # normalised and widened after the copy
        assert on_device["superpixels"].dtype == torch.int64 and on_device["images"].dtype == torch.float32
        reference = T.Normalize(IMAGENET_MEAN, IMAGENET_STD)(batch["images"].float() / 255)
        torch.testing.assert_close(on_device["images"], reference)
        for view in maps.reshape(-1, 32, 32):
            assert torch.equal(view.unique(), torch.arange(int(view.max()) + 1))  # 0..K-1, no gaps


def test_merge_to_budget_joins_the_smallest_segment_with_its_longest_neighbour():
    labels = np.array([
        [0, 0, 0, 1, 1, 1],
        [0, 0, 0, 1, 1, 1],
        [0, 0, 2, 1, 1, 1],
        [3, 3, 3, 3, 3, 3],
    ])
    merged, count = merge_to_budget(labels * 5, 3)  # gaps in the labels are closed as well
    assert count == 1
    assert merged.max() == 2 and merged[2, 2] == merged[0, 0]  # 2 touches 0 on 2 edges, 1 and 3 on 1 each
    same, none = merge_to_budget(labels, 4)
    assert none == 0 and np.array_equal(same, labels)
    rng = np.random.default_rng(0)
    noisy = rng.integers(0, 50, (24, 24))
    out, merged_away = merge_to_budget(noisy, 10)
    assert out.max() + 1 == 10 and merged_away == 40


def test_training_config_carries_the_budget_to_model_and_loader():
    from cast.config import ConfigError
    from cast.train.config import TrainConfig

    cfg = TrainConfig(model=ModelConfig(name="cast_tiny"), data=DataConfig(shards="x", max_superpixels=40))
    assert cfg.model_kwargs() == {"num_tokens": 40}
    assert cfg.training_data().min_superpixels == 16  # cast_tiny's first pooling
    cfg.data.max_superpixels = 8
    with pytest.raises(ConfigError, match="data.max_superpixels.*num_tokens=8"):
        cfg.validate()
