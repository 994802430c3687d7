"""The one manifest schema (ours + timm's ``splits``) and the one error type for bad shard sets."""

from __future__ import annotations

import json

import pytest

from cast.data import Manifest, ShardSetError, list_shards, read_manifest
from cast.data.shards import Shard, Split


def _write(folder, record) -> str:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "_info.json").write_text(record if isinstance(record, str) else json.dumps(record))
    return str(folder)


def test_round_trip_writes_our_fields_and_timms_split(tmp_path):
    written = Manifest(
        name="val",
        shards=[Shard("val-000000.tar", 3), Shard("val-000001.tar", 2)],
        classes=["cat", "dog"],
        layout="imagefolder",
        source="/data/val",
        tool_version="cast-train-shards/1",
        created="2026-12-01T00:00:00Z",
    )
    record = written.to_json()
    assert list(record) == ["name", "num_samples", "shards", "classes", "layout", "source", "tool_version",
                            "created", "splits"]
    assert record["num_samples"] == 5
    assert record["shards"] == [
        {"url": "val-000000.tar", "num_samples": 3},
        {"url": "val-000001.tar", "num_samples": 2},
    ]
    assert record["splits"] == {
        "val": {"name": "val", "num_samples": 5, "filenames": ["val-000000.tar", "val-000001.tar"],
                "shard_lengths": [3, 2]}
    }
    folder = _write(tmp_path / "val", record)
    read = read_manifest(folder)
    assert read.url == f"{folder}/_info.json"
    assert read.shards == [Shard(f"{folder}/val-000000.tar", 3), Shard(f"{folder}/val-000001.tar", 2)]
    assert read.splits == {"val": Split("val", 5, ("val-000000.tar", "val-000001.tar"), (3, 2))}
    for name in ("name", "classes", "layout", "source", "tool_version", "created"):
        assert getattr(read, name) == getattr(written, name)
    assert (read.num_samples, read.num_shards) == (5, 2)


def test_a_timm_manifest_with_only_splits_reads(tmp_path):
    split = {"name": "train", "num_samples": 7, "filenames": ["a-0.tar", "a-1.tar"], "shard_lengths": [4, 3]}
    folder = _write(tmp_path / "one", {"name": "timm-set", "splits": {"train": split}})
    listed = list_shards(folder)
    assert listed.shards == [Shard(f"{folder}/a-0.tar", 4), Shard(f"{folder}/a-1.tar", 3)]
    assert listed.num_samples == 7 and listed.classes == []

    other = {"name": "validation", "num_samples": 2, "filenames": ["b-0.tar"], "shard_lengths": [2]}
    folder = _write(tmp_path / "two", {"name": "timm-set", "splits": {"train": split, "validation": other}})
    with pytest.raises(ShardSetError, match=r"_info.json: lists splits \['train', 'validation'\]"):
        list_shards(folder)
    picked = list_shards(f"{folder}/b-{{0..0}}.tar")  # a brace pattern picks a split, counted by the manifest
    assert picked.shards == [Shard(f"{folder}/b-0.tar", 2)]


@pytest.mark.parametrize(
    ("record", "expected"),
    [
        ("{not json", "not valid JSON"),
        ([1, 2], "expected a JSON object"),
        ({"name": "x"}, "expected 'shards' \\(cast-train\\) or 'splits' \\(timm\\)"),
        ({"shards": [{"url": "a.tar"}]}, "each shard entry needs 'url' \\(or 'name'\\) and 'num_samples'"),
        ({"shards": [{"url": "a.tar", "num_samples": -1}]}, "shard a.tar: expected a sample count"),
        ({"num_samples": 9, "shards": [{"url": "a.tar", "num_samples": 4}]},
         "'num_samples' is 9 but its shards hold 4 samples"),
        ({"classes": "cat", "shards": []}, "'classes' must be a list"),
        ({"splits": {"train": {"filenames": ["a.tar"], "shard_lengths": [1, 2]}}},
         "splits.train: 'filenames' and 'shard_lengths' must be lists of the same length"),
        ({"name": "x", "num_samples": 0, "shards": []}, "lists no shards; expected at least one shard"),
    ],
)
def test_malformed_manifests_raise_one_error_naming_the_url(tmp_path, record, expected):
    folder = _write(tmp_path / "set", record)
    with pytest.raises(ShardSetError, match=expected) as caught:
        list_shards(folder)
    assert f"{folder}/_info.json" in str(caught.value)
    assert isinstance(caught.value, ValueError)


def test_a_missing_shard_set_names_the_url_and_what_was_expected(tmp_path):
    missing = str(tmp_path / "nowhere")
    with pytest.raises(ShardSetError, match="no _info.json") as caught:
        list_shards(missing)
    message = str(caught.value)
    assert missing in message and "brace pattern" in message and "data_tools.make_shards" in message
