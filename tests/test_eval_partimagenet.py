"""PartImageNet part/whole evaluation: the COCO-style layout -> shards, the vocabulary, the scoring against
hand-computed per-image mIoU (and torchmetrics), and the OpenCLIP ViT-B/16 labeller built without weights
(masking, the restricted part vocabulary, the background rule)."""

import io
import tarfile

import numpy as np
import pytest
import torch
from PIL import Image

from cast.eval.partimagenet import (
    MASK_VALUE,
    ClipLabeller,
    PartVocabulary,
    image_miou,
    label_and_score,
    load_clip,
)
from data_tools.make_shards import build_shards
from tests.fixtures.partimagenet import CLASSES, make_partimagenet


def test_layout_rasterises_parts_and_names_objects(tmp_path, caplog):
    expected = make_partimagenet(tmp_path / "src", count=4)
    manifest = build_shards(str(tmp_path / "src"), str(tmp_path / "shards"), "partimagenet", name="val",
                            max_count=2, workers=1, progress=False, split_list="val")
    assert manifest.classes == CLASSES and manifest.num_samples == 4 and manifest.num_shards == 2
    assert "annotation" in caplog.text and "left out" in caplog.text  # the empty polygon is named
    seen = {}
    for shard in manifest.shards:
        with tarfile.open(shard.url) as tar:
            for member in tar.getmembers():
                if member.name.endswith(".seg.png"):
                    data = tar.extractfile(member).read()
                    seen[member.name.split(".")[0]] = np.asarray(Image.open(io.BytesIO(data)))
    assert seen.keys() == expected.keys()
    for key, truth in expected.items():
        np.testing.assert_array_equal(seen[key], truth)  # polygons and the RLE part, background = 4
    with pytest.raises(FileNotFoundError, match="choose a split"):
        build_shards(str(tmp_path / "src"), str(tmp_path / "other"), "partimagenet", split_list="train",
                     progress=False)


def test_vocabulary_from_manifest_classes():
    vocabulary = PartVocabulary.from_classes(CLASSES)
    assert vocabulary.objects == ("Quadruped", "Car") and vocabulary.parts[2] == "Car Body"
    assert vocabulary.parts_of(1) == [2, 3] and vocabulary.object_background == 2
    parts = torch.tensor([[0, 1, 4], [2, 3, 4]])
    assert vocabulary.object_map(parts).tolist() == [[0, 0, 2], [1, 1, 2]]
    with pytest.raises(ValueError, match="partimagenet layout"):
        PartVocabulary.from_classes(["cat", "dog"], "s3://b/voc/_info.json")


def test_per_image_miou_agrees_with_torchmetrics():
    from torchmetrics import JaccardIndex

    generator = torch.Generator().manual_seed(0)
    for classes in (12, 41):
        metric = JaccardIndex(task="multiclass", num_classes=classes)
        for _ in range(5):
            truth = torch.randint(0, 5, (24, 24), generator=generator)
            pred = torch.randint(0, 7, (24, 24), generator=generator)
            assert image_miou(pred, truth, classes) == pytest.approx(metric(pred, truth).item(), abs=1e-6)


class KnownLabeller:
    """A labeller whose answer is fixed: segment s gets objects[s] / parts[s] (the scoring is under test)."""

    def __init__(self, objects: dict[int, int], parts: dict[int, int]):
        self.vocabulary, self.device = PartVocabulary.from_classes(CLASSES), torch.device("cpu")
        self.objects, self.parts = objects, parts

    def label_objects(self, image, segments):
        return segments.clone().apply_(lambda s: self.objects[s])

    def label_parts(self, image, segments, objects):
        return segments.clone().apply_(lambda s: self.parts[s])


def test_scoring_reproduces_hand_computed_miou():
    truth = torch.tensor([[0, 0, 4, 4],
                          [1, 1, 4, 4],
                          [4, 4, 4, 4],
                          [4, 4, 4, 4]])  # a quadruped: head on top of the body, the rest background
    coarse = torch.tensor([[0, 0, 1, 1]] * 4)  # left half / right half
    fine = torch.tensor([[0, 0, 1, 1], [2, 2, 1, 1], [3, 3, 1, 1], [3, 3, 1, 1]])
    labeller = KnownLabeller(objects={0: 0, 1: 2}, parts={0: 0, 1: 4, 2: 0, 3: 4})
    scores = label_and_score(labeller, None, coarse, fine, truth)
    # objects: truth quadruped = 4 px (left top), predicted = the 8 left px: IoU 4/8; background:
    # truth 12 px, predicted 8 (right half), overlap 8: IoU 8/12
    assert scores["object_miou"] == pytest.approx((4 / 8 + 8 / 12) / 2)
    # parts: head truth 2 px, predicted 4 px (rows 0 and 1 left): IoU 2/4; body truth 2 px, never
    # predicted: IoU 0; background truth 12, predicted 12 (all but the 4 head px), overlap 12-... :
    # predicted background = right half (8) + rows 2-3 left (4) = 12 px, all truly background: IoU 12/12
    assert scores["part_miou"] == pytest.approx((2 / 4 + 0 + 12 / 12) / 3)


@pytest.fixture(scope="module")
def labeller():
    clip, tokenizer = load_clip("ViT-B-16-quickgelu", None)  # the reference's architecture, no weights
    torch.manual_seed(0)
    return ClipLabeller(clip, tokenizer, PartVocabulary.from_classes(CLASSES), batch_size=8)


def test_clip_labeller_masks_and_restricts_parts(labeller):
    view = np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    image = labeller.prepare(view)
    assert image.shape == (3, 32, 32)
    segments = torch.zeros(32, 32, dtype=torch.long)
    segments[:, 16:] = 5
    ids, masked = labeller.masked_images(image, segments)
    assert ids.tolist() == [0, 5] and masked.shape == (2, 3, 224, 224)  # resized to CLIP's input
    raw = torch.where(segments[None] == 0, image, torch.full_like(image, MASK_VALUE))
    labeller_size, labeller.size = labeller.size, (32, 32)
    try:
        _, exact = labeller.masked_images(image, segments)
    finally:
        labeller.size = labeller_size
    torch.testing.assert_close(exact[0], raw)  # outside the segment: 0.5 in CLIP-normalised values
    assert torch.all(exact[1][:, :, :16] == MASK_VALUE)

    objects = labeller.label_objects(image, segments)
    assert objects.shape == (32, 32) and set(objects.unique().tolist()) <= {0, 1, 2}
    assert len(objects[:, :16].unique()) == 1 and len(objects[:, 16:].unique()) == 1  # one label a segment
    # parts: a segment takes a part of the object at its first pixel, or background
    objects = torch.full((32, 32), 2)
    objects[:16, :] = 1  # top half: Car; bottom half: background
    fine = torch.arange(4).repeat_interleave(8)[:, None].expand(32, 32).contiguous()  # 4 horizontal bands
    parts = labeller.label_parts(image, fine, objects)
    assert set(parts[:16].unique().tolist()) <= {2, 3}  # Car Body / Car Tier only
    assert parts[16:].unique().tolist() == [4]  # the background rule
    fine[15, 0] = 7  # a segment starting in the car half and running into the background half
    fine[16:, :] = torch.where(fine[16:, :] == 2, 7, fine[16:, :])
    parts = labeller.label_parts(image, fine, objects)
    assert int(parts[15, 0]) in (2, 3) and set(parts[fine == 7].unique().tolist()) <= {2, 3}
