"""Dense layouts (voc, pcontext, ade20k) through ``make_shards`` and the reader, label checks, and the
pasted Fashion-MNIST-on-photos set."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from cast.data import DataConfig, build_loader, read_manifest
from cast.data.transforms import IGNORE_INDEX
from data_tools.layouts import ADE20K_CLASSES, PCONTEXT_CLASSES
from data_tools.make_shards import build_shards
from data_tools.sample_data import pasted_segmentation
from tests.fixtures.datasets import make_ade20k, make_pcontext


def _masks(shards: str, size: int = 48) -> tuple[list, list]:
    cfg = DataConfig(shards=shards, recipe="segmentation_eval", image_size=size, batch_size=1, num_workers=0,
                     shuffle=False, drop_remainder=False, superpixels="")
    batches = list(build_loader(cfg, rank=0, world_size=1, epoch=0))
    return [b["mask"][0] for b in batches], [b["key"][0] for b in batches]


def test_pcontext_layout_round_trips_with_its_60_classes(tmp_path):
    src = make_pcontext(tmp_path / "pc", count=6)
    info = build_shards(str(src), str(tmp_path / "pc_val"), "pcontext", name="val",
                        split_list="ImageSets/SegmentationContext/val.txt", progress=False)
    assert info.num_samples == 2 and info.classes == list(PCONTEXT_CLASSES) and len(info.classes) == 60
    masks, keys = _masks(str(tmp_path / "pc_val"))
    assert keys == ["2008_000004", "2008_000005"]
    original = np.asarray(Image.open(src / "SegmentationClassContext/2008_000004.png"))
    assert np.array_equal(masks[0].numpy(), original)  # 48 px image, eval view at 48: the mask as stored


def test_ade20k_reduces_the_zero_label(tmp_path):
    src = make_ade20k(tmp_path / "ade", count=3)
    path = src / "annotations/training/ADE_train_00000000.png"
    raw = np.asarray(Image.open(path)).astype(np.int64)
    raw[20:24, 20:24] = 0  # "other"
    Image.fromarray(raw.astype(np.uint8)).save(path)
    build_shards(str(src), str(tmp_path / "out"), "ade20k", split_list="training", progress=False)
    assert read_manifest(str(tmp_path / "out")).classes == list(ADE20K_CLASSES)
    with pytest.raises(ValueError, match="no images found"):
        build_shards(str(src), str(tmp_path / "none"), "ade20k", split_list="validation", progress=False)
    masks, keys = _masks(str(tmp_path / "out"))
    reduced = masks[keys.index("training/ADE_train_00000000")].numpy()
    expected = np.where((raw == 0) | (raw == IGNORE_INDEX), IGNORE_INDEX, raw - 1)
    assert (raw == 0).any() and np.array_equal(reduced, expected)


def test_a_label_outside_the_classes_names_the_file(tmp_path):
    src = make_pcontext(tmp_path / "pc", count=3)
    bad = src / "SegmentationClassContext/2008_000001.png"
    labels = np.asarray(Image.open(bad)).copy()
    labels[10, 10] = 77
    Image.fromarray(labels).save(bad)
    with pytest.raises(ValueError, match=r"2008_000001\.png: label value\(s\) \[77\] outside the 60 classes"):
        build_shards(str(src), str(tmp_path / "out"), "pcontext", progress=False)


def test_pasted_set_builds_in_the_voc_layout_with_its_classes(tmp_path):
    src = pasted_segmentation(tmp_path / "pasted", train=6, val=2, size=64, num_classes=3)
    info = build_shards(str(src), str(tmp_path / "val"), "voc", name="val",
                        split_list="ImageSets/Segmentation/val.txt", progress=False)
    assert info.num_samples == 2 and info.classes[0] == "background" and len(info.classes) == 4
    masks, _ = _masks(str(tmp_path / "val"), size=64)
    values = set(np.unique(np.concatenate([m.numpy().ravel() for m in masks])).tolist())
    assert 0 in values and values - {0} and values <= {0, 1, 2, 3}
    again = pasted_segmentation(tmp_path / "again", train=6, val=2, size=64, num_classes=3)
    first, second = (np.asarray(Image.open(p / "SegmentationClass/val_00001.png")) for p in (src, again))
    assert np.array_equal(first, second)  # seeded


def test_image_recipes_read_dense_shards_without_class_labels(tmp_path):
    """Classes in a dense manifest name mask ids: MoCo views of VOC-layout shards need no cls member."""
    src = pasted_segmentation(tmp_path / "pasted", train=4, val=0, size=64, num_classes=2)
    build_shards(str(src), str(tmp_path / "train"), "voc", split_list="ImageSets/Segmentation/train.txt",
                 progress=False)
    cfg = DataConfig(shards=str(tmp_path / "train"), recipe="moco", image_size=32, batch_size=2,
                     num_workers=0, superpixels="")
    loader = build_loader(cfg, rank=0, world_size=1, epoch=0)
    batches = list(loader)
    assert len(batches) == 2 and batches[0]["images"].shape == (2, 2, 3, 32, 32)
    assert not any(loader.counters.values())
