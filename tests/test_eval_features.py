"""Feature extraction and CAST segment retrieval on batches in the loader contract (mosaics, cast_tiny)."""

import numpy as np
import pytest
import torch

from cast.data.transforms import denormalize, views_to_input
from cast.eval.features import batch_views, extract_features
from cast.eval.knn import knn_accuracy
from cast.eval.retrieval import cast_segmented_images, evaluate_retrieval
from cast.models import cast_config, create_model
from cast.superpixels import get_provider
from tests.fixtures.mosaics import CLASS_NAMES, dominant_class, make_mosaics, mosaic_batches

SIZE = 64


def _batches(mosaics, batch_size=3, with_superpixels=True):
    provider = get_provider("seeds", preset="moco") if with_superpixels else None
    return mosaic_batches(mosaics, batch_size, provider)


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return create_model("cast_tiny", num_classes=0)


def test_denormalise_inverts_normalise():
    views = np.random.default_rng(0).integers(0, 256, (2, 8, 8, 3), dtype=np.uint8)
    restored = denormalize(views_to_input(views)) * 255
    np.testing.assert_allclose(restored.permute(0, 2, 3, 1).numpy(), views, atol=1e-3)


def test_extract_features_and_knn(model):
    mosaics = make_mosaics(7, size=SIZE, num_cells=3, seed=4)
    features = extract_features(model, _batches(mosaics), progress=False)
    assert features.embeddings.shape == (7, model.embed_dim) and features.embeddings.dtype == torch.float32
    assert features.keys == [f"mosaic{i}" for i in range(7)]
    expected = [dominant_class(m) for m in mosaics]
    assert features.labels.tolist() == expected
    # the same model and input give the same embedding, whatever the batch it sits in
    alone = extract_features(model, _batches(mosaics[6:], batch_size=1), progress=False)
    torch.testing.assert_close(alone.embeddings[0], features.embeddings[6], atol=1e-4, rtol=1e-4)
    # kNN of the train set on itself, k=1: every sample finds itself
    result = knn_accuracy(features.embeddings, features.labels, features.embeddings, features.labels,
                          num_classes=len(CLASS_NAMES), k=1)
    assert result["top1"] == 100.0
    assert len(extract_features(model, _batches(mosaics), max_batches=1, progress=False)) == 3


def test_on_device_provider_fills_missing_superpixels(model):
    batch = next(_batches(make_mosaics(2, size=SIZE, seed=1), with_superpixels=False))
    with pytest.raises(ValueError, match="no 'superpixels' and no provider"):
        batch_views(batch, "cpu")
    images, superpixels = batch_views(batch, "cpu", get_provider("slic_torch"))
    assert superpixels.shape == (2, SIZE, SIZE) and superpixels.dtype == torch.int64
    features = extract_features(model, [batch], provider=get_provider("slic_torch"), progress=False)
    assert features.embeddings.shape == (2, model.embed_dim)


def _segmented(model, batches, level):
    for batch in batches:
        images, superpixels = batch_views(batch, "cpu")
        yield from cast_segmented_images(model, images, superpixels, batch["mask"], level, batch["key"])


def test_cast_retrieval_runs_end_to_end(model):
    bank = list(_segmented(model, _batches(make_mosaics(4, size=SIZE, seed=7)), level=2))
    clusters = cast_config("cast_tiny").num_clusters
    assert all(len(image.segments.unique()) == clusters[1] for image in bank)
    assert all(image.embeddings.shape[1] == model.embed_dim for image in bank)
    test = _segmented(model, _batches(make_mosaics(2, size=SIZE, seed=8)), level=2)
    result = evaluate_retrieval(bank, test, num_classes=len(CLASS_NAMES), class_names=CLASS_NAMES)
    assert 0.0 <= result["miou"] <= 1.0 and result["images"] == 2
    assert result["bank_prototypes"] == 4 * clusters[1] - result["bank_dropped_ignore"]
    assert 0.0 <= result["boundary_recall"] <= 1.0
