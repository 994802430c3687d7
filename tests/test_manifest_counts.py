"""The manifest checked against the tars: a reader that finds another count than ``_info.json``
claims warns and counts it, ``verify_shards`` fails on it, and ``--write-verified`` counts fix the
epoch length."""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path

import fsspec
import pytest

from cast.data import DataConfig, build_loader
from cast.data.shards import INFO_FILE, MISMATCH, VERIFIED_FILE, Shard, read_manifest
from data_tools.make_shards import build_shards
from data_tools.verify_shards import main as verify_main
from tests.fixtures.datasets import make_imagefolder


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> Path:
    """8 samples in 2 shards of 4."""
    root = tmp_path_factory.mktemp("counts")
    make_imagefolder(root / "src", num_classes=2, per_class=4, size=16)
    build_shards(str(root / "src"), str(root / "shards"), "imagefolder", max_count=4, seed=3, progress=False)
    return root / "shards"


def _claiming(built: Path, tmp_path: Path, claims: list[int]) -> Path:
    """A copy of the 8-sample set whose _info.json claims ``claims`` samples per shard."""
    dest = tmp_path / "claimed"
    dest.mkdir(parents=True)
    for tar in built.glob("*.tar"):
        (dest / tar.name).write_bytes(tar.read_bytes())
    (dest / INFO_FILE).write_bytes((built / INFO_FILE).read_bytes())
    manifest = read_manifest(str(dest))
    shards = [Shard(Path(s.url).name, claim) for s, claim in zip(manifest.shards, claims, strict=True)]
    record = dataclasses.replace(manifest, shards=shards).to_json()
    (dest / INFO_FILE).write_text(json.dumps(record))
    return dest


def _config(dest: Path, **overrides) -> DataConfig:
    values = dict(shards=str(dest), recipe="eval", image_size=16, batch_size=2, num_workers=0,
                  shuffle_buffer=16, seed=1, superpixels="")
    return DataConfig(**{**values, **overrides})


def _keys(loader) -> list[str]:
    return [key for batch in loader for key in batch["key"]]


@pytest.mark.parametrize(("claims", "shuffle_buffer"), [([40, 40], 16), ([1, 1], 16), ([1, 1], 0)],
                         ids=["80-over-8", "2-of-8", "2-of-8-unshuffled"])
def test_a_wrong_manifest_is_reported_failed_and_fixed_by_verified_counts(
    built, tmp_path, caplog, capsys, claims, shuffle_buffer
):
    dest = _claiming(built, tmp_path, claims)
    cfg = _config(dest, shuffle_buffer=shuffle_buffer)
    caplog.set_level(logging.INFO)

    loader = build_loader(cfg, rank=0, world_size=1, epoch=0)
    assert len(loader) == sum(claims) // 2  # the claim sets the epoch: 40 batches over 8 samples, or 1
    keys = _keys(loader)
    assert len(keys) == sum(claims)
    assert loader.counters[MISMATCH] == 2  # both shards, by the one reader that checks them
    records = [r for r in caplog.records if MISMATCH in r.getMessage()]
    assert len(records) == 2 and {r.levelno for r in records} == {logging.WARNING}
    warnings = [r.getMessage() for r in records]
    for tar, claim in zip(sorted(dest.glob("*.tar")), claims):
        assert any(str(tar) in w and f"holds 4 samples, its manifest says {claim}" in w for w in warnings)

    caplog.clear()
    again = build_loader(cfg, rank=0, world_size=1, epoch=1)
    _keys(again)
    assert again.counters[MISMATCH] == 2  # counted every epoch, logged once per shard
    assert not [r for r in caplog.records if MISMATCH in r.getMessage()]

    evaluation = build_loader(_config(dest, drop_remainder=False), rank=0, world_size=1, epoch=0)
    assert len(_keys(evaluation)) == 8 and evaluation.counters[MISMATCH] == 2

    capsys.readouterr()
    assert verify_main([str(dest)]) == 1
    err = capsys.readouterr().err
    assert f"train-000000.tar: 4 samples, {INFO_FILE} says {claims[0]}" in err
    assert verify_main([str(dest), "--write-verified"]) == 1  # the manifest is still wrong
    assert f"written to {dest}/{VERIFIED_FILE}" in capsys.readouterr().out
    caplog.clear()
    assert verify_main([str(dest)]) == 0
    assert any(f"using verified counts from {dest}/{VERIFIED_FILE}" in r.getMessage() for r in caplog.records)

    fixed = build_loader(cfg, rank=0, world_size=1, epoch=2)
    assert len(fixed) == 4
    keys = _keys(fixed)
    assert len(keys) == 8 and len(set(keys)) == 8  # every sample once
    assert MISMATCH not in fixed.counters


def test_verified_counts_of_another_manifest_are_ignored(built, tmp_path, caplog):
    dest = _claiming(built, tmp_path, [40, 40])
    assert verify_main([str(dest), "--write-verified"]) == 1
    assert read_manifest(str(dest)).num_samples == 8
    record = json.loads((dest / INFO_FILE).read_text())
    record["name"] = "rebuilt"
    (dest / INFO_FILE).write_text(json.dumps(record))
    manifest = read_manifest(str(dest))
    assert manifest.num_samples == 80 and not manifest.verified_from
    assert any(f"{VERIFIED_FILE}: ignored" in r.getMessage() for r in caplog.records)


def test_one_reader_of_all_ranks_checks_a_partition_shared_by_several(built, tmp_path):
    """One partition of both shards, split between two ranks: only the reader reading furthest counts
    them, so the counters summed over ranks say 2, not 4."""
    dest = _claiming(built, tmp_path, [1, 1])
    cfg = _config(dest, partitions=1, batch_size=1)
    loaders = [build_loader(cfg, rank=rank, world_size=2, epoch=0) for rank in range(2)]
    assert [len(_keys(loader)) for loader in loaders] == [1, 1]
    assert [loader.counters[MISMATCH] for loader in loaders] == [0, 2]

    # claimed 80: the second rank's half of the partition lies past the 8 real samples
    over = _claiming(built, tmp_path / "over", [40, 40])
    with pytest.raises(RuntimeError, match="no usable sample.*verify_shards"):
        _keys(build_loader(_config(over, partitions=1), rank=1, world_size=2, epoch=0))


def test_verified_counts_on_s3(built, tmp_path, s3_env):
    dest = f"s3://{s3_env}/claimed-counts"
    fs = fsspec.filesystem("s3")
    fs.put(str(_claiming(built, tmp_path, [40, 40])), dest.removeprefix("s3://"), recursive=True)
    assert read_manifest(dest).num_samples == 80
    assert verify_main([dest, "--write-verified"]) == 1
    manifest = read_manifest(dest)
    assert manifest.num_samples == 8 and manifest.verified_from == f"{dest}/{VERIFIED_FILE}"
    assert [shard.num_samples for shard in manifest.shards] == [4, 4]
