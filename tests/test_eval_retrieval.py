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


def test_random_init_baseline_is_seeded():
    from cast.eval.model_loading import load_model

    torch.manual_seed(123)
    first = load_model("cast_tiny", None, seed=1).state_dict()
    torch.manual_seed(456)  # the caller's RNG state does not matter
    again = load_model("cast_tiny", None, seed=1).state_dict()
    other = load_model("cast_tiny", None, seed=2).state_dict()
    assert all(torch.equal(first[k], again[k]) for k in first)
    assert not torch.equal(first["blocks.0.attn.qkv.weight"], other["blocks.0.attn.qkv.weight"])


def test_moco_projector_per_token_from_ours_and_released(tmp_path):
    """The projector of our MoCo run and of a released ``.pth.tar`` is rebuilt and applied per token."""
    import timm

    from cast.eval.model_loading import build_projector, projector_state
    from cast.eval.retrieval import unit_embeddings
    from cast.models import CASTOutput
    from cast.train.config import MocoConfig
    from cast.train.objectives import MoCo
    from tests.test_models_checkpoint import moco_checkpoint

    moco = MoCo(timm.create_model("cast_seg_tiny_pretrain", num_classes=0), MocoConfig(dim=16, mlp_dim=32))
    moco.eval()
    run = tmp_path / "ours.pth"
    torch.save({"model": moco.state_dict()}, run)
    projector = build_projector(projector_state(str(run)))
    tokens = torch.randn(2, 5, moco.base_encoder.embed_dim)
    output = CASTOutput(tokens.mean(1), tokens.mean(1), [tokens], [], [], [], dense_tokens=tokens)
    embedded = unit_embeddings(output, "projector", projector)
    assert embedded.shape == (2, 5, 16)
    torch.testing.assert_close(embedded[1, 3], moco.base_encoder.head(tokens[1, 3:4])[0])
    released = tmp_path / "checkpoint_0149.pth.tar"
    torch.save(moco_checkpoint(moco.base_encoder), released)
    assert projector_state(str(released)).keys() == {"0.weight", "1.weight", "1.bias", "1.running_mean",
                                                     "1.running_var", "1.num_batches_tracked", "6.weight"}
    assert unit_embeddings(output, "fused").shape == (2, 5, moco.base_encoder.embed_dim)
    plain = tmp_path / "plain.pth"
    torch.save(timm.create_model("cast_seg_tiny_pretrain", num_classes=3).state_dict(), plain)
    with pytest.raises(ValueError, match="no MoCo projector"):
        projector_state(str(plain))


def test_retrieval_view_resizes_to_the_long_side_and_back():
    from cast.eval.retrieval import resize_labels, retrieval_view, view_size

    assert view_size(375, 500, 512) == (384, 512) and view_size(333, 500, 512) == (344, 512)
    labels = torch.arange(12).view(3, 4).repeat_interleave(10, 0).repeat_interleave(10, 1)  # [30, 40]
    batch = {"images": torch.randn(1, 1, 3, 30, 40), "superpixels": labels[None, None],
             "mask": (labels % 3)[None]}
    images, superpixels, masks = retrieval_view(batch, "cpu", 80)
    assert images.shape == (1, 3, 64, 80) and superpixels.shape == masks.shape == (1, 64, 80)
    assert set(superpixels.unique().tolist()) == set(range(12))  # nearest keeps the labels
    back = resize_labels(masks[0], (30, 40))
    assert back.shape == (30, 40) and (back == labels % 3).float().mean() > 0.9
