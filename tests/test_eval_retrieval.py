"""Segment retrieval (reference 5.5) on small cases worked out by hand and on texture mosaics."""

import numpy as np
import pytest
import torch

from cast.eval.retrieval import (
    MemoryBank,
    SegmentedImage,
    build_memory_bank,
    evaluate_retrieval,
    majority_labels,
    retrieve_labels,
    segment_prototypes,
)
from tests.fixtures.mosaics import CLASS_NAMES, make_mosaics


def test_prototype_is_pixel_weighted_normalised_sum():
    # units 0 and 1 with orthogonal embeddings (scaled: only directions count)
    embeddings = torch.tensor([[2.0, 0.0], [0.0, 5.0]])
    units = torch.tensor([[0, 0, 0, 1],
                          [1, 1, 1, 1]])
    segments = torch.tensor([[7, 7, 7, 7],   # ids need not be contiguous
                             [3, 3, 3, 3]])
    prototypes, compact = segment_prototypes(SegmentedImage(embeddings, units, segments))
    torch.testing.assert_close(compact, torch.tensor([[1, 1, 1, 1], [0, 0, 0, 0]]))
    torch.testing.assert_close(prototypes[0], torch.tensor([0.0, 1.0]))           # segment 3: unit 1 only
    torch.testing.assert_close(prototypes[1], torch.tensor([3.0, 1.0]) / 10 ** 0.5)  # 3 px of unit 0, 1 of 1
    masked, _ = segment_prototypes(SegmentedImage(embeddings, units, segments,
                                                  valid_units=torch.tensor([True, False])))
    torch.testing.assert_close(masked[1], torch.tensor([1.0, 0.0]))


def test_majority_label_counts_ignore_and_breaks_ties_low():
    segments = torch.tensor([0, 0, 0, 1, 1, 2, 2])
    mask = torch.tensor([4, 255, 255, 3, 2, 1, 1])
    assert majority_labels(segments, mask, 3).tolist() == [255, 2, 1]


def test_bank_drops_ignore_majority_segments():
    embeddings = torch.eye(3)
    units = torch.tensor([[0, 1, 2]])
    image = SegmentedImage(embeddings, units, segments=torch.tensor([[0, 1, 2]]),
                           mask=torch.tensor([[5, 255, 6]]))
    bank = build_memory_bank([image])
    assert bank.labels.tolist() == [5, 6] and bank.dropped == 1 and bank.images == 1
    torch.testing.assert_close(bank.prototypes, torch.eye(3)[[0, 2]])


def test_top_k_majority_vote():
    bank = MemoryBank(prototypes=torch.tensor([[1.0, 0.0], [0.8, 0.6], [0.6, 0.8], [0.0, 1.0]]),
                      labels=torch.tensor([0, 1, 1, 2]))
    query = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    assert retrieve_labels(query, bank, num_classes=3, k=1).tolist() == [0, 2]
    assert retrieve_labels(query, bank, num_classes=3, k=3).tolist() == [1, 1]  # 2 of 3 neighbours say 1
    assert retrieve_labels(query, bank, num_classes=3, k=50).tolist() == [1, 1]  # k capped at the bank


def _mosaic_images(mosaics, scramble: bool, seed: int = 0):
    """Per-pixel embeddings that encode the texture class (a noisy one-hot); ``scramble`` shuffles them
    over the pixels of each image, destroying the link between a segment and its class."""
    rng = np.random.default_rng(seed)
    images = []
    for mosaic in mosaics:
        h, w = mosaic.mask.shape
        noise = 0.1 * rng.standard_normal((h * w, len(CLASS_NAMES)))
        embeddings = np.eye(len(CLASS_NAMES))[mosaic.mask.ravel()] + noise
        if scramble:
            embeddings = embeddings[rng.permutation(h * w)]
        images.append(SegmentedImage(
            embeddings=torch.from_numpy(embeddings).float(),
            units=torch.arange(h * w).view(h, w),
            segments=torch.from_numpy(mosaic.cells),
            mask=torch.from_numpy(mosaic.mask),
        ))
    return images


def test_retrieval_on_mosaics_known_answer():
    bank, test = make_mosaics(24, size=48, num_cells=6, seed=1), make_mosaics(6, size=48, num_cells=6, seed=2)
    result = evaluate_retrieval(_mosaic_images(bank, False), _mosaic_images(test, False),
                                num_classes=len(CLASS_NAMES), class_names=CLASS_NAMES)
    assert result["miou"] == pytest.approx(1.0) and result["image_miou"] == pytest.approx(1.0)
    assert result["bank_prototypes"] == 24 * 6 and result["k"] == 20
    # segments are the mosaic cells: every class border is a segment border
    assert result["boundary_recall"] == pytest.approx(1.0)
    scrambled = evaluate_retrieval(_mosaic_images(bank, True), _mosaic_images(test, True),
                                   num_classes=len(CLASS_NAMES))
    assert scrambled["miou"] < 0.5


def test_ignore_label_in_bank_and_test_masks():
    mosaic = make_mosaics(1, size=32, num_cells=4, seed=5)[0]
    bank = _mosaic_images([mosaic], False)
    bank[0].mask = torch.where(torch.from_numpy(mosaic.cells) == 0, 255, bank[0].mask)  # cell 0 unlabelled
    test = _mosaic_images([mosaic], False)
    test[0].mask = torch.where(torch.from_numpy(mosaic.cells) == 0, 255, test[0].mask)
    result = evaluate_retrieval(bank, test, num_classes=len(CLASS_NAMES), k=1)
    assert result["bank_dropped_ignore"] == 1 and result["bank_prototypes"] == 3
    assert result["miou"] == pytest.approx(1.0)  # cell 0 has no bank entry of its own, but is not scored


def test_shape_errors_name_the_image():
    with pytest.raises(ValueError, match="cat.jpg: units, segments and mask"):
        SegmentedImage(torch.zeros(4, 2), torch.zeros(2, 2, dtype=torch.long),
                       torch.zeros(2, 3, dtype=torch.long), key="cat.jpg")
    with pytest.raises(ValueError, match="unit labels must index the 4 embeddings"):
        SegmentedImage(torch.zeros(4, 2), torch.full((2, 2), 4), torch.zeros(2, 2, dtype=torch.long))
