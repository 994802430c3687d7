"""cast.eval.evaluate: kNN + segment retrieval + linear-probe pickup on mosaic data, and config checks."""

import json

import pytest
import torch

from cast.eval.evaluate import EvaluationConfig, evaluate
from cast.models import create_model
from cast.superpixels import get_provider
from tests.fixtures.mosaics import CLASS_NAMES, make_mosaics, mosaic_batches

DATA = {
    "mem://train": make_mosaics(8, size=64, num_cells=3, seed=11),
    "mem://val": make_mosaics(4, size=64, num_cells=3, seed=12),
}


def _batches(url):
    return mosaic_batches(DATA[url], batch_size=4, provider=get_provider("seeds", preset="moco"))


def test_evaluate_knn_retrieval_and_linear_probe(tmp_path):
    torch.manual_seed(0)
    model = create_model("cast_tiny", num_classes=0)
    checkpoint = str(tmp_path / "checkpoint_000001")
    with open(f"{checkpoint}.linear_probe.json", "w") as handle:
        json.dump({"top1": 12.5}, handle)
    config = EvaluationConfig(model="cast_tiny", checkpoint=checkpoint, train_shards="mem://train",
                              val_shards="mem://val", seg_bank_shards="mem://train", seg_shards="mem://val",
                              level=1)
    results = evaluate(model, config, _batches, lambda url: CLASS_NAMES, progress=False)
    knn = results["knn"]
    assert knn["train_samples"] == 8 and knn["test_samples"] == 4 and knn["k"] == 8  # k capped at 8
    assert 0 <= knn["top1"] <= knn["top5"] <= 100
    retrieval = results["segment_retrieval"]
    assert retrieval["images"] == 4 and retrieval["bank_images"] == 8 and retrieval["level"] == 1
    assert retrieval["bank_prototypes"] == 8 * 16 and 0 <= retrieval["miou"] <= 1
    assert results["linear_probe"] == {"top1": 12.5}
    json.dumps(results)  # JSON-ready


@pytest.mark.parametrize("fields, message", [
    ({"train_shards": "a"}, "train_shards and val_shards go together"),
    ({}, "nothing to do"),
    ({"seg_bank_shards": "a", "seg_shards": "b", "level": 0}, "level is 1-based"),
    ({"train_shards": "a", "val_shards": "b", "knn_temperature": 0.0}, "knn_temperature must be > 0"),
])
def test_bad_config_fails_before_any_work(fields, message):
    with pytest.raises(ValueError, match=message):
        evaluate(None, EvaluationConfig(**fields), _batches, lambda url: CLASS_NAMES)
