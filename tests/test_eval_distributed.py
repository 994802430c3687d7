"""Distributed evaluation: kNN over 2 Ray workers (real shards, ``ray_driver``) equals the same task run in
one process; every sample is extracted exactly once; the blocked top-k equals a brute-force one."""

import pytest
import torch

from cast.eval.distributed import RunSettings, run_tasks
from cast.eval.features import FeatureBank, FeaturePart, Features, read_features, write_features
from cast.eval.knn import knn_scores, nearest_neighbours
from cast.eval.tasks import KnnTask, LoaderSpec, ModelSpec
from data_tools.make_shards import build_shards
from tests.fixtures.datasets import make_imagefolder


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    root = tmp_path_factory.mktemp("knn")
    out = {}
    for split, per_class, seed in (("train", 6, 0), ("val", 3, 1)):
        make_imagefolder(root / f"{split}-src", num_classes=3, per_class=per_class, size=48, seed=seed)
        manifest = build_shards(str(root / f"{split}-src"), str(root / split), "imagefolder", name=split,
                                max_count=4, workers=1, progress=False)
        out[split] = (str(root / split), manifest.num_samples)
    return root, out


def _task(root, shards, folder: str) -> KnnTask:
    return KnnTask(
        model=ModelSpec("cast_tiny", None, seed=3),
        data=LoaderSpec(recipe="eval", image_size=64, batch_size=4, workers=0, superpixels="seeds_fast",
                        superpixel_params={"num_superpixels": 36}),
        train_shards=shards["train"][0], val_shards=shards["val"][0], features=str(root / folder), k=5)


def _scores_by_key(folder) -> dict[str, torch.Tensor]:
    found = {}
    for part in sorted((folder / "val-scores").glob("part-*.pt")):
        features = read_features(str(part))
        found.update(zip(features.keys, features.embeddings))
    return found


@pytest.mark.ray
def test_knn_over_two_ray_workers_equals_one_process(ray_driver, shards):
    root, splits = shards
    (single,) = run_tasks([_task(root, splits, "single")], RunSettings(num_workers=0, device="cpu"))
    (spread,) = run_tasks([_task(root, splits, "spread")],
                          RunSettings(num_workers=2, storage_path=str(root / "ray"), name="knn-2"))
    assert spread["workers"] == 2 and single["workers"] == 1
    for key in ("top1", "top5", "k", "train_samples", "test_samples"):
        assert spread[key] == single[key], key
    # every sample extracted exactly once: the parts of the two workers hold each key once
    assert spread["train_samples"] == splits["train"][1] and spread["test_samples"] == splits["val"][1]
    assert spread["duplicate_samples"] == 0
    train_parts = sorted((root / "spread" / "train").glob("part-*-of-00002.pt"))
    keys = [key for part in train_parts for key in read_features(str(part)).keys]
    assert len(train_parts) == 2 and len(keys) == len(set(keys)) == splits["train"][1]
    assert all(len(read_features(str(part))) > 0 for part in train_parts)  # both workers did a share
    # the same scores for every val sample, whichever worker scored it
    one, two = _scores_by_key(root / "single"), _scores_by_key(root / "spread")
    assert one.keys() == two.keys() and len(one) == splits["val"][1]
    for key in one:
        torch.testing.assert_close(two[key], one[key], atol=1e-4, rtol=1e-4)
        assert int(two[key].argmax()) == int(one[key].argmax())


def test_blocked_top_k_equals_brute_force():
    torch.manual_seed(0)
    bank = torch.nn.functional.normalize(torch.randn(1000, 16), dim=1)
    queries = torch.nn.functional.normalize(torch.randn(37, 16), dim=1)
    expected_sim, expected_index = (queries @ bank.T).topk(7, dim=1)
    for block in (1, 64, 999, 5000):
        sim, index = nearest_neighbours(bank, queries, 7, bank_block=block)
        torch.testing.assert_close(sim, expected_sim)
        assert torch.equal(index, expected_index)
    labels = torch.arange(1000) % 4
    whole = knn_scores(bank, labels, queries, 4, k=7, bank_block=10_000)
    blocked = knn_scores(bank, labels, queries, 4, k=7, query_block=5, bank_block=100)
    torch.testing.assert_close(blocked, whole)


def test_feature_bank_is_filled_part_by_part_and_normalised(tmp_path):
    parts = []
    for rank, rows in enumerate((3, 0, 5)):
        features = Features(torch.full((rows, 4), float(rank + 1)), torch.full((rows,), rank),
                            [f"r{rank}-{i}" for i in range(rows)])
        parts.append(write_features(features, str(tmp_path / f"part-{rank}.pt")) if rows else
                     FeaturePart(str(tmp_path / "empty"), 0, 0))
    bank = FeatureBank.load(parts)
    assert len(bank) == 8 and bank.keys[:3] == ["r0-0", "r0-1", "r0-2"]
    assert bank.labels.tolist()[3:] == [2] * 5
    torch.testing.assert_close(bank.embeddings.norm(dim=1), torch.ones(8))
    bad = FeaturePart(parts[0].url, 4, 4)
    with pytest.raises(ValueError, match="holds 3 rows, expected 4"):
        FeatureBank.load([bad])


def _train_workers() -> list[int]:
    """Pids of this machine's Ray Train worker processes (``ray::RayTrainWorker...`` process titles)."""
    import subprocess

    listing = subprocess.run(["ps", "-eo", "pid=,args="], capture_output=True, text=True, check=True).stdout
    return [int(line.split()[0]) for line in listing.splitlines() if "ray::RayTrainWorker" in line]


@pytest.mark.ray
def test_killed_worker_is_restarted_and_reuses_finished_parts(ray_head, shards):
    """A preempted evaluation worker of a submitted ``jobs.evaluate`` (SIGKILL by pid once the bank parts
    are in storage): the worker group restarts, reads the bank parts it already wrote instead of
    extracting them again, and the result is the uninterrupted one."""
    import json
    import os
    import signal
    import time

    from tests.fixtures.ray import finished_job_logs, submit_job

    root, splits = shards
    (single,) = run_tasks([_task(root, splits, "single-ref")], RunSettings(num_workers=0, device="cpu"))
    out = root / "preempted"
    parts = [root / "preempted.knn-features" / "train" / f"part-0000{rank}-of-00002.pt" for rank in (0, 1)]
    # the same evaluation as _task, as a user submits it
    entrypoint = ["python", "-m", "jobs.evaluate", "--random-init", "--seed", "3", "--out", str(out),
                  "--model", "cast_tiny", "--size", "64", "--batch-size", "4", "--loader-workers", "0",
                  "--superpixels", "seeds_fast", "--superpixel-param", "num_superpixels=36", "--knn-k", "5",
                  "--train-shards", splits["train"][0], "--val-shards", splits["val"][0], "--workers", "2",
                  "--max-failures", "1", "--storage-path", str(root / "ray"), "--no-progress"]
    job_id = submit_job(ray_head, entrypoint, {})
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and not all(part.exists() for part in parts):
        time.sleep(0.05)
    pids = _train_workers()
    assert pids and all(part.exists() for part in parts), "the bank parts never appeared"
    written = max(part.stat().st_mtime_ns for part in parts)
    os.kill(pids[-1], signal.SIGKILL)
    logs = finished_job_logs(ray_head, job_id, timeout=240)
    assert max(part.stat().st_mtime_ns for part in parts) == written  # reused, not written again
    assert f"knn: reusing {parts[0].parent}" in logs, logs[-3000:]  # said by the restarted group
    result = json.loads((root / "preempted.knn.json").read_text())
    for key in ("top1", "top5", "train_samples", "test_samples", "duplicate_samples"):
        assert result[key] == single[key], key
