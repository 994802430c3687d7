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


HOW = ("SIGKILL", "SIGTERM", "ctrl-c")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_killed_make_shards_leaves_no_worker(many, tmp_path):
    """Three real runs side by side (start-up, mostly imports, dominates): SIGKILL of the parent,
    SIGTERM to it, Ctrl-C (SIGINT to the whole process group, as a terminal sends it)."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    runs = {}
    for how in HOW:
        folder = tmp_path / how
        (folder / "tmp").mkdir(parents=True)
        with open(folder / "stderr.txt", "wb") as stderr:  # a file: an orphan holding a pipe would hang us
            runs[how] = subprocess.Popen(
                [sys.executable, "-m", "data_tools.make_shards", "--src", str(many), "--dest",
                 str(folder / "out"), "--layout", "imagefolder", "--max-count", "1", "--workers", "2"],
                cwd=REPO, env={**env, "TMPDIR": str(folder / "tmp")}, stdout=subprocess.DEVNULL,
                stderr=stderr, start_new_session=True,
            )
    workers: dict[str, set[int]] = {}
    try:
        deadline = time.monotonic() + 90
        while len(workers) < len(HOW) and time.monotonic() < deadline:
            for how, parent in runs.items():
                if how not in workers and parent.poll() is None and len(_children(parent.pid)) >= 2:
                    workers[how] = _children(parent.pid)
                    if how == "ctrl-c":
                        os.killpg(parent.pid, signal.SIGINT)  # parent and workers alike
                    else:
                        parent.send_signal(getattr(signal, how))
            time.sleep(0.01)
        for how, parent in runs.items():
            try:
                parent.wait(timeout=60)
            except subprocess.TimeoutExpired:
                pytest.fail(f"{how}: make_shards still running 60 s after the signal: "
                            f"{(tmp_path / how / 'stderr.txt').read_text()[-2000:]}")
    finally:
        for parent in runs.values():
            if parent.poll() is None:
                parent.kill()
    deadline = time.monotonic() + 5
    pids = set().union(*workers.values())
    while any(_alive(pid) for pid in pids) and time.monotonic() < deadline:
        time.sleep(0.05)
    survivors = {how: [pid for pid in found if _alive(pid)] for how, found in workers.items()}
    for pid in sum(survivors.values(), []):
        os.kill(pid, signal.SIGKILL)
    for how in HOW:
        folder, err = tmp_path / how, (tmp_path / how / "stderr.txt").read_text()
        assert how in workers, f"{how}: no pool workers seen: {err[-2000:]}"
        assert not survivors[how], f"workers {survivors[how]} outlived their parent ({how}): {err[-2000:]}"
        assert not (folder / "out/_info.json").exists(), f"{how}: the run finished before the kill"
        if how != "SIGKILL":  # handled: pool stopped, scratch files removed, the user told how to go on
            assert runs[how].returncode == 130, f"{how}: exit {runs[how].returncode}: {err[-2000:]}"
            assert "rerun the same command" in err, err[-2000:]
            left = list((folder / "tmp").rglob("*"))
            assert not left, f"{how}: scratch files left: {left[:5]}"


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
