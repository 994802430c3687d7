"""`make demo` in short (``--quick``): a real Ray head on 127.0.0.1, a real ``ray job submit`` of MoCo
pretraining, kNN evaluation and segmentation as users run them; every promised output exists and Ray is
gone afterwards, also when the demo is interrupted mid-training. Plus the offline fallback data set."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cast.local_ray import RAY_ENV, group_alive
from data_tools.photo_crops import CROP_PHOTOS, photo_crops
from tools.demo import QUICK, Demo, DemoOptions

REPO = Path(__file__).resolve().parents[1]
DEMO = [sys.executable, "-m", "jobs.demo", "--quick"]


def _assert_gone(pid: int) -> None:
    assert not group_alive(pid), f"processes of the Ray head's group {pid} still run"
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)


def _popen_demo(out: Path) -> subprocess.Popen:
    return subprocess.Popen(
        [*DEMO, "--out", str(out)],
        cwd=REPO,
        env={**os.environ, **RAY_ENV},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _finish(proc: subprocess.Popen, timeout: float) -> tuple[str, str]:
    """Wait for the demo; past ``timeout`` SIGTERM it (it then stops its Ray head) and fail."""
    try:
        return proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.terminate()
        stdout, _ = proc.communicate(timeout=90)
        raise AssertionError(f"the demo took over {timeout} s:\n{stdout[-4000:]}") from None
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


@pytest.mark.ray
def test_quick_demo_writes_every_output_and_stops_ray(tmp_path):
    out = tmp_path / "demo_out"
    proc = _popen_demo(out)
    stdout, stderr = _finish(proc, timeout=480)
    assert proc.returncode == 0, stdout[-6000:] + stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())

    counts = {"train": 10 * QUICK["train_per_class"], "val": 10 * QUICK["val_per_class"]}
    for split, count in counts.items():
        info = json.loads((out / "shards" / split / "_info.json").read_text())
        assert info["num_samples"] == count and len(info["classes"]) == 10
        assert sum(shard["num_samples"] for shard in info["shards"]) == count

    checkpoint = Path(summary["run"]["checkpoint"])
    assert checkpoint.parent == out / "runs" / "demo"
    assert (checkpoint / "_COMPLETE").exists() and (checkpoint / "state.pt").stat().st_size > 1_000_000
    assert (out / "runs" / "demo" / "config.yaml").exists()
    assert "submitted successfully" in (out / "logs" / "pretrain.log").read_text()

    for which, weights in (("trained", str(checkpoint)), ("random_init", "random-init (seed 0)")):
        result = json.loads((out / "eval" / f"{which}.knn.json").read_text())
        assert result["checkpoint"] == weights
        assert result["test_samples"] == counts["val"] and result["train_samples"] == counts["train"]
        assert 0 <= result["top1"] <= result["top5"] <= 100
        assert summary["knn"][which]["top1"] == result["top1"]

    size = QUICK["segment_size"]
    manifest = json.loads((out / "segments" / "segments.json").read_text())
    assert [entry["name"] for entry in manifest["images"]] == list(QUICK["photos"])
    for name in QUICK["photos"]:
        with Image.open(out / "segments" / "overlays" / f"{name}.png") as overlay:
            overlay.load()
            assert overlay.size[0] > 4 * size and overlay.size[1] >= size  # the photo beside 4 levels
        levels = np.load(out / "segments" / "labels" / f"{name}_levels.npy")
        assert levels.shape == (4, size, size)
        segments = [len(np.unique(level)) for level in levels]
        assert segments == sorted(segments, reverse=True) and segments[0] > segments[-1] >= 1, segments
        with Image.open(out / "segments" / "labels" / f"{name}_level1.png") as label_map:
            assert label_map.size == (size, size)

    _assert_gone(summary["ray"]["pid"])
    assert "[demo] step 8/8 done" in stdout and "kNN accuracy" in stdout
    assert str(checkpoint) in stdout  # the summary says where things are


@pytest.mark.ray
def test_interrupted_demo_stops_ray(tmp_path):
    """Ctrl-C during training: exit 130, the step named, the head's whole process group gone."""
    proc = _popen_demo(tmp_path / "demo_out")
    pid, stderr = None, ""
    try:
        deadline = time.monotonic() + 180
        for line in proc.stdout:
            if line.startswith("Ray head:"):
                pid = int(line.split("(pid ")[1].split(",")[0])
            if "jobs.pretrain" in line and line.startswith("$ "):  # submitted: the job is starting
                break
            assert time.monotonic() < deadline, "the demo did not reach the pretraining step"
        assert pid is not None and group_alive(pid)
        time.sleep(5)
    finally:  # also when an assertion above failed: the demo must not run on
        proc.send_signal(signal.SIGINT)
        _, stderr = _finish(proc, timeout=120)
    assert proc.returncode == 130, stderr[-3000:]
    assert "interrupted at step 'MoCo pretraining" in stderr
    _assert_gone(pid)


def test_photo_crops_without_fashion_mnist(tmp_path, capsys):
    """The stand-in labelled set: one class per photo, crops at the asked size, train and val different."""
    demo = Demo(DemoOptions(out=str(tmp_path), train_per_class=3, val_per_class=2, image_size=32,
                            fashion_mnist=str(tmp_path / "no-fashion-mnist")))  # fmt: skip
    demo.sample_images()
    assert "falling back to random crops" in capsys.readouterr().out
    assert "crops of the scikit-image photos" in demo.summary["data"]["source"]
    assert demo.summary["data"]["images"] == {"train": 3 * len(CROP_PHOTOS), "val": 2 * len(CROP_PHOTOS)}
    train = tmp_path / "data" / "train"
    assert sorted(p.name for p in train.iterdir()) == sorted(CROP_PHOTOS)
    first = np.asarray(Image.open(train / "coffee" / "crop_00000.png"))
    assert first.shape == (32, 32, 3)
    assert not np.array_equal(
        first, np.asarray(Image.open(tmp_path / "data" / "val" / "coffee" / "crop_00000.png"))
    )
    with pytest.raises(FileNotFoundError, match="astronaut.jpg"):
        photo_crops(tmp_path / "empty", tmp_path / "x", per_class=1)
