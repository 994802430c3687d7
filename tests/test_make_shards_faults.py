"""make_shards under faults: a killed parent leaves no worker behind, empty class folders keep their
index, labels outside ``classes`` are refused before anything is written."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from data_tools.layouts import SourceSample, scan
from data_tools.make_shards import build_shards, write_shards
from tests.fixtures.datasets import make_imagefolder

REPO = Path(__file__).resolve().parents[1]


def _children(pid: int) -> set[int]:
    """Pids whose parent is ``pid`` (from /proc, so a test needs no psutil)."""
    found = set()
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                found.add(int(entry))
    return found


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


@pytest.fixture(scope="module")
def many(tmp_path_factory) -> Path:
    """400 tiny images: at one sample per shard a two-worker run lasts well past the first shard."""
    return make_imagefolder(tmp_path_factory.mktemp("many"), num_classes=2, per_class=200, size=8)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
@pytest.mark.parametrize("how", [signal.SIGKILL, signal.SIGTERM], ids=["SIGKILL", "SIGTERM"])
def test_killed_make_shards_leaves_no_worker(many, tmp_path, how):
    dest = tmp_path / "out"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    log = tmp_path / "stderr.txt"  # a file, not a pipe: an orphan holding a pipe would hang the test
    with open(log, "wb") as stderr:
        parent = subprocess.Popen(
            [sys.executable, "-m", "data_tools.make_shards", "--src", str(many), "--dest", str(dest),
             "--layout", "imagefolder", "--max-count", "1", "--workers", "2"],
            cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=stderr,
        )
    try:
        deadline = time.monotonic() + 60
        workers: set[int] = set()
        while len(workers) < 2 and parent.poll() is None and time.monotonic() < deadline:
            workers = _children(parent.pid)
            time.sleep(0.01)
        assert len(workers) >= 2, f"no pool workers seen: {log.read_text()[-2000:]}"
        parent.send_signal(how)
        parent.wait(timeout=20)
    finally:
        if parent.poll() is None:
            parent.kill()
    err = log.read_bytes()
    assert not (dest / "_info.json").exists(), "the run finished before the kill: the test proves nothing"
    assert len(list(dest.glob("*.tar"))) < 400
    deadline = time.monotonic() + 5
    while any(_alive(pid) for pid in workers) and time.monotonic() < deadline:
        time.sleep(0.05)
    survivors = [pid for pid in workers if _alive(pid)]
    for pid in survivors:
        os.kill(pid, signal.SIGKILL)
    assert not survivors, f"workers {survivors} outlived their parent ({how.name})"
    if how == signal.SIGTERM:  # handled: the pool is stopped and the user told how to go on
        assert parent.returncode == 130 and b"rerun the same command" in err


def test_empty_class_folder_keeps_its_index(tmp_path):
    src = make_imagefolder(tmp_path / "src", num_classes=3, per_class=2, size=8)
    for image in (src / "class_1").iterdir():
        image.unlink()
    samples, classes = scan(str(src), "imagefolder")
    assert classes == ["class_0", "class_1", "class_2"]  # torchvision's ImageFolder numbering
    assert {s.meta["class"]: s.label for s in samples} == {"class_0": 0, "class_2": 2}
    info = build_shards(str(src), str(tmp_path / "out"), "imagefolder", max_count=4, progress=False)
    assert info.classes == ["class_0", "class_1", "class_2"] and info.num_samples == 4


def test_label_outside_classes_is_refused_before_writing(tmp_path):
    src = make_imagefolder(tmp_path / "src", num_classes=2, per_class=2, size=8)
    samples, classes = scan(str(src), "imagefolder")
    bad = SourceSample("class_1/odd", samples[-1].image, samples[-1].size, label=2)
    dest = tmp_path / "out"
    named = r"sample class_1/odd \(.*img_1_0001\.jpg\): label 2 outside the 2 classes \(0\.\.1\)"
    with pytest.raises(ValueError, match=named):
        write_shards(samples + [bad], classes, str(dest), "imagefolder", source=str(src), progress=False)
    assert not dest.exists() or not list(dest.iterdir())
    with pytest.raises(ValueError, match="label -2"):
        write_shards([SourceSample("a", samples[0].image, 1, label=-2)], classes, str(dest), "imagefolder",
                     source=str(src), progress=False)
    with pytest.raises(ValueError, match=r"label 0 outside the 0 classes"):  # labelled, no class names
        write_shards(samples, [], str(dest), "flat", source=str(src), progress=False)
