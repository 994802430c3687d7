"""jobs.evaluate as a user runs it: real shards through the real loader (no monkeypatch of the data path),
one JSON per task beside the checkpoint, the printed table; bad arguments fail before any work."""

import json

import pytest
import torch

import jobs.evaluate as job
from cast.models import create_model
from data_tools.make_shards import build_shards
from tests.fixtures.datasets import make_imagefolder


@pytest.fixture(scope="module")
def labelled(tmp_path_factory):
    root = tmp_path_factory.mktemp("labelled")
    make_imagefolder(root / "src", num_classes=3, per_class=4, size=48)
    build_shards(str(root / "src"), str(root / "shards"), "imagefolder", max_count=6, workers=1,
                 progress=False)
    return str(root / "shards")


def test_knn_job_writes_json_beside_the_checkpoint_and_a_table(tmp_path, labelled, capsys):
    torch.manual_seed(0)
    checkpoint = tmp_path / "tiny.pth"
    torch.save(create_model("cast_tiny", num_classes=0).state_dict(), checkpoint)
    (tmp_path / "tiny.pth.linear_probe.json").write_text(json.dumps({"top1": 12.5}))
    code = job.main(["--checkpoint", str(checkpoint), "--model", "cast_tiny", "--train-shards", labelled,
                     "--val-shards", labelled, "--superpixels", "seeds_fast", "--superpixel-param",
                     "num_superpixels=36", "--loader-workers", "0", "--device", "cpu", "--knn-k", "3"])
    assert code == 0
    report = json.loads((tmp_path / "tiny.pth.knn.json").read_text())
    assert report["checkpoint"] == str(checkpoint) and report["test_samples"] == report["train_samples"] == 12
    assert report["top1"] == 100.0 and report["duplicate_samples"] == 0  # every sample finds itself first
    assert (tmp_path / "tiny.pth.knn-features" / "train" / "part-00000-of-00001.pt").exists()
    out = capsys.readouterr().out
    assert "knn.top1" in out and "linear_probe.top1" in out


@pytest.mark.parametrize("argv, message", [
    (["--checkpoint", "x.pth", "--seg-shards", "x"], "--seg-bank-shards and --seg-shards go together"),
    (["--random-init", "--out", "r"], "nothing to do"),
    (["--random-init", "--out", "r", "--part-shards", "p"], "--clip-weights"),
    (["--random-init", "--out", "r", "--train-shards", "nowhere", "--val-shards", "nowhere"], "nowhere"),
])
def test_bad_arguments_fail_before_any_work(argv, message, capsys):
    assert job.main(argv) == 2 and message in capsys.readouterr().err


def test_shards_without_what_the_task_needs_are_named(tmp_path, labelled, capsys):
    make_imagefolder(tmp_path / "flat-src" / "only", num_classes=1, per_class=2, size=32)
    build_shards(str(tmp_path / "flat-src"), str(tmp_path / "flat"), "flat", workers=1, progress=False)
    code = job.main(["--random-init", "--out", str(tmp_path / "r"), "--train-shards", str(tmp_path / "flat"),
                     "--val-shards", labelled, "--loader-workers", "0"])
    assert code == 2 and "knn: --train-shards" in (err := capsys.readouterr().err) and "'classes'" in err
    code = job.main(["--random-init", "--out", str(tmp_path / "r"), "--seg-bank-shards", labelled,
                     "--seg-shards", labelled, "--embedding", "fused", "--loader-workers", "0"])
    assert code == 2 and "no masks (seg.png)" in capsys.readouterr().err
    code = job.main(["--random-init", "--out", str(tmp_path / "r"), "--train-shards", labelled,
                     "--val-shards", labelled, "--workers", "4", "--loader-workers", "2"])
    assert code == 2 and "8 readers" in capsys.readouterr().err


def test_superpixel_and_model_arguments(capsys):
    args = job.parse_args(["--random-init", "--out", "x", "--superpixels", "seeds_fast", "--superpixel-param",
                           "num_superpixels=36", "--model-arg", "img_size=512", "--model-arg",
                           "num_clusters=[320,160,80,40]"])
    assert args.superpixel_params == {"num_superpixels": 36}
    assert args.model_options == {"img_size": 512, "num_clusters": [320, 160, 80, 40]}
    with pytest.raises(SystemExit):
        job.parse_args(["--random-init", "--out", "x", "--model-arg", "img_size"])


def test_partimagenet_job_on_real_shards(tmp_path, capsys):
    """The whole PartImageNet path a user runs: COCO-style folder -> shards -> jobs.evaluate (random CLIP,
    since no weights can be downloaded), every image scored once, the oracle beside CAST, nothing failed."""
    from tests.fixtures.partimagenet import make_partimagenet

    make_partimagenet(tmp_path / "src", count=2)
    build_shards(str(tmp_path / "src"), str(tmp_path / "parts"), "partimagenet", name="val", max_count=1,
                 workers=1, progress=False, split_list="val")
    argv = ["--random-init", "--out", str(tmp_path / "r"), "--model", "cast_tiny", "--task", "partimagenet",
            "--part-shards", str(tmp_path / "parts"), "--clip-random", "--size", "48", "--loader-workers",
            "0", "--device", "cpu", "--no-progress"]
    assert job.main(argv) == 0
    report = json.loads((tmp_path / "r.partimagenet.json").read_text())
    assert report["images"] == 2 and report["failed"] == 0 and report["failed_images"] == []
    for title in ("cast", "oracle"):
        assert all(0.0 <= report[title][name] <= 100.0 for name in ("object_miou", "part_miou"))
    assert (report["objects"], report["parts"]) == (2, 4)
    assert "partimagenet.cast" in capsys.readouterr().out
    assert job.main([*argv, "--coarse-level", "9"]) == 2 and "--coarse-level 9" in capsys.readouterr().err
