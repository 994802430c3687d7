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


def test_evaluate_job_wiring_writes_report_and_table(tmp_path, monkeypatch, capsys):
    """jobs.evaluate end to end with the shard reader swapped for mosaic batches (the loader is tested
    with the data package); checks model loading, the JSON beside the checkpoint and the table."""
    import jobs.evaluate as job

    class MosaicSource:
        def __init__(self, size, batch_size, workers, provider):
            assert size == 64 and provider.name == "seeds"

        def batches(self, url):
            return _batches(url)

        def class_names(self, url):
            return CLASS_NAMES

    torch.manual_seed(0)
    checkpoint = tmp_path / "tiny.pth"
    torch.save(create_model("cast_tiny", num_classes=0).state_dict(), checkpoint)
    monkeypatch.setattr(job, "ShardBatches", MosaicSource)
    code = job.main(["--checkpoint", str(checkpoint), "--model", "cast_tiny", "--train-shards", "mem://train",
                     "--val-shards", "mem://val", "--device", "cpu", "--no-progress"])
    assert code == 0
    report = json.loads((tmp_path / "tiny.pth.eval.json").read_text())
    assert report["checkpoint"] == str(checkpoint) and report["knn"]["test_samples"] == 4
    assert "knn.top1" in capsys.readouterr().out


def test_evaluate_job_rejects_half_a_pair_before_loading_anything(capsys):
    import jobs.evaluate as job

    code = job.main(["--checkpoint", "does/not/exist.pth", "--seg-shards", "x"])
    assert code == 2 and "seg_bank_shards and seg_shards go together" in capsys.readouterr().err


def test_class_names_come_from_shard_info(tmp_path):
    from cast.eval.shard_source import ShardBatches

    (tmp_path / "_info.json").write_text(json.dumps({"name": "d", "classes": ["cat", "dog"], "shards": []}))
    source = ShardBatches(64, 8, 0, get_provider("seeds"))
    assert source.class_names(str(tmp_path)) == ["cat", "dog"]
    (tmp_path / "_info.json").write_text(json.dumps({"name": "d", "classes": [], "shards": []}))
    with pytest.raises(ValueError, match="'classes' is empty or missing"):
        source.class_names(str(tmp_path))
    with pytest.raises(ValueError, match="no _info.json"):
        source.class_names(str(tmp_path / "nowhere"))


def test_evaluate_job_takes_superpixel_params_and_rejects_unknown_ones(capsys):
    import jobs.evaluate as job

    args = job.parse_args(["--random-init", "--out", "x.json", "--superpixels", "seeds_fast",
                           "--superpixel-param", "num_superpixels=36"])
    assert args.superpixel_params == {"num_superpixels": 36}
    code = job.main(["--random-init", "--out", "x.json", "--train-shards", "a", "--val-shards", "b",
                     "--superpixel-param", "num_segments=36"])
    assert code == 2 and "num_segments" in capsys.readouterr().err
