"""The per-rank streaming loader: exactly-once splitting, equal batch counts, reshuffle, resume,
corrupt-input handling, S3 streaming, superpixels and segmentation batches."""

from __future__ import annotations

import io
import tarfile
import time
from collections import Counter
from pathlib import Path

import fsspec
import numpy as np
import pytest
import torch

from cast.data import DataConfig, build_loader, shards
from cast.data.shards import Counters, iter_shards, list_shards
from data_tools.make_shards import build_shards
from tests.fixtures.datasets import make_imagefolder, make_voc


def _config(shards: str, **overrides) -> DataConfig:
    values = dict(
        shards=shards,
        recipe="eval",
        image_size=32,
        batch_size=5,
        num_workers=2,
        shuffle_buffer=16,
        seed=11,
        superpixels="",
    )
    values.update(overrides)
    return DataConfig(**values)


def _epoch(cfg: DataConfig, world_size: int, epoch: int, **kwargs) -> list[list[dict]]:
    return [
        list(build_loader(cfg, rank=rank, world_size=world_size, epoch=epoch, **kwargs))
        for rank in range(world_size)
    ]


def _keys(batches: list[dict]) -> list[str]:
    return [key for batch in batches for key in batch["key"]]


@pytest.fixture(scope="module")
def local_shards(tmp_path_factory) -> str:
    """80 samples, 4 classes, 8 shards of 10."""
    root = tmp_path_factory.mktemp("stream")
    make_imagefolder(root / "src", num_classes=4, per_class=20, size=32)
    build_shards(str(root / "src"), str(root / "shards"), "imagefolder", max_count=10, seed=5, progress=False)
    return str(root / "shards")


def test_exactly_once_over_s3_across_two_ranks_and_two_workers(tmp_path, s3_env):
    make_imagefolder(tmp_path / "src", num_classes=4, per_class=20, size=32)
    dest = f"s3://{s3_env}/train"
    build_shards(str(tmp_path / "src"), dest, "imagefolder", max_count=10, seed=5, progress=False)
    cfg = _config(dest)
    loaders = [build_loader(cfg, rank=r, world_size=2, epoch=0) for r in range(2)]
    assert [len(loader) for loader in loaders] == [8, 8]  # floor(80 / (2 * 5))
    ranks = [list(loader) for loader in loaders]
    assert [len(batches) for batches in ranks] == [8, 8]
    keys = _keys(ranks[0]) + _keys(ranks[1])
    assert len(keys) == 80 and len(set(keys)) == 80  # every sample exactly once
    assert not set(_keys(ranks[0])) & set(_keys(ranks[1]))
    batch = ranks[0][0]
    assert batch["images"].shape == (5, 1, 3, 32, 32) and batch["images"].dtype == torch.uint8
    assert batch["label"].dtype == torch.int64
    for key, label in zip(batch["key"], batch["label"].tolist()):
        assert key.startswith(f"class_{label}/")  # labels travel with their image
    assert loaders[0].counters == {}


def test_remainder_rule_with_uneven_shards(tmp_path):
    make_imagefolder(tmp_path / "src", num_classes=3, per_class=29, size=32)  # 87 samples: 8 x 10 + 7
    build_shards(str(tmp_path / "src"), str(tmp_path / "s"), "imagefolder", max_count=10, progress=False)
    cfg = _config(str(tmp_path / "s"), batch_size=4)
    ranks = _epoch(cfg, 2, 0)
    assert [len(batches) for batches in ranks] == [10, 10]  # floor(87 / (2 * 4)) on every rank
    keys = _keys(ranks[0]) + _keys(ranks[1])
    assert len(keys) == 80 and len(set(keys)) == 80  # 7 left over this epoch, none repeated
    dropped = {k for k in _all_keys(tmp_path / "src")} - set(keys)
    dropped_next = set(_all_keys(tmp_path / "src")) - set(_keys(sum(_epoch(cfg, 2, 1), [])))
    assert len(dropped) == len(dropped_next) == 7


def test_evaluation_pass_reads_every_sample_once_with_short_batches(tmp_path):
    make_imagefolder(tmp_path / "src", num_classes=3, per_class=29, size=32)  # 87 samples: 8 x 10 + 7
    build_shards(str(tmp_path / "src"), str(tmp_path / "s"), "imagefolder", max_count=10, progress=False)
    cfg = _config(str(tmp_path / "s"), batch_size=4, shuffle=False, drop_remainder=False)
    loaders = [build_loader(cfg, rank=r, world_size=2, epoch=0) for r in range(2)]
    ranks = [list(loader) for loader in loaders]
    keys = _keys(ranks[0]) + _keys(ranks[1])
    assert sorted(keys) == sorted(_all_keys(tmp_path / "src"))  # all 87, none twice, none dropped
    assert [len(batches) for batches in ranks] == [len(loader) for loader in loaders]
    assert any(len(batch["key"]) < 4 for batches in ranks for batch in batches)


def _all_keys(root: Path) -> list[str]:
    return [f"{p.parent.name}/{p.stem}" for p in root.rglob("*.jpg")]


def test_order_changes_per_epoch_and_repeats_for_same_seed(local_shards):
    cfg = _config(local_shards, num_workers=0)
    first = _keys(_epoch(cfg, 1, 0)[0])
    assert first == _keys(_epoch(cfg, 1, 0)[0])
    second = _keys(_epoch(cfg, 1, 1)[0])
    assert second != first and sorted(second) == sorted(first)
    other_seed = _keys(_epoch(_config(local_shards, num_workers=0, seed=12), 1, 0)[0])
    assert other_seed != first


def _take(loaders, batches: int) -> list[str]:
    """``batches`` batches from each rank's loader (in lockstep, as DDP takes them), their keys."""
    iterators = [iter(loader) for loader in loaders]
    return [key for _ in range(batches) for it in iterators for key in next(it)["key"]]


@pytest.mark.parametrize("resized", [1, 3])
def test_resize_mid_epoch_trains_exactly_the_samples_not_yet_seen(local_shards, resized):
    """2 ranks x 2 DataLoader workers take one optimizer step (3 micro-batches of 4 each, global batch
    24), then the epoch goes on at another world size from the checkpointed segments: every sample of
    the epoch once, none twice, none skipped; the 8 left over (80 = 3 x 24 + 8) are the remainder rule's."""
    cfg = _config(local_shards, batch_size=4, recipe="supervised")
    whole = sorted(_keys(_epoch(cfg, 1, 2, global_batch=24)[0]))
    assert len(whole) == 72 and len(set(whole)) == 72
    first = [build_loader(cfg, rank=r, world_size=2, epoch=2, global_batch=24) for r in range(2)]
    assert [len(loader) for loader in first] == [9, 9]  # 72 / (2 x 4)
    seen = _take(first, 3)
    remaining = first[0].remaining()
    assert remaining == first[1].remaining() and sum(e - s for _, s, e in remaining) == 72 - 24
    rest = _epoch(cfg, resized, 2, remaining=remaining, global_batch=24)
    assert {len(batches) for batches in rest} == {48 // (resized * 4)}  # equal batch counts per rank
    keys = seen + [key for batches in rest for key in _keys(batches)]
    assert sorted(keys) == whole  # the multiset of keys of the epoch, exactly
    every = set(_all_keys(Path(local_shards).parent / "src"))
    left_over = every - set(whole)
    assert len(left_over) == 8 and left_over != every - set(
        _keys(_epoch(cfg, 1, 3, global_batch=24)[0])
    )  # a different remainder next epoch


def test_resume_at_the_same_size_continues_the_exact_batch_order(local_shards):
    """Same world size, workers and batch: the resumed loader (remaining + rotation) yields exactly the
    batches the uninterrupted one would have, in order, on every rank."""
    cfg = _config(local_shards, batch_size=4, recipe="supervised")
    full = _epoch(cfg, 2, 3)
    first = [build_loader(cfg, rank=r, world_size=2, epoch=3) for r in range(2)]
    _take(first, 3)
    remaining, rotation = first[0].remaining(), first[0].rotation()
    assert rotation == 1  # 3 batches over 2 DataLoader workers: worker 1 holds the next one
    resumed = _epoch(cfg, 2, 3, remaining=remaining, rotation=rotation)
    assert [[b["key"] for b in batches] for batches in resumed] == [
        [b["key"] for b in batches[3:]] for batches in full]


def test_repeated_augmentation_keeps_the_epoch_length_and_stays_exact_across_a_resize(local_shards):
    """data.repeats=3: 72 images per epoch as without repeats, 24 distinct samples 3 times each, each copy
    augmented anew; stopped after a step at 2 ranks and finished at 3, the same (sample, copy) multiset."""
    cfg = _config(local_shards, batch_size=4, recipe="supervised", repeats=3, num_workers=0)
    whole = _epoch(cfg, 1, 0, global_batch=24)[0]
    counts = Counter(_keys(whole))
    assert len(whole) == 18 and set(counts.values()) == {3} and len(counts) == 24
    copies = [b["images"][i] for b in whole for i, k in enumerate(b["key"]) if k == whole[0]["key"][0]]
    assert len(copies) == 3 and not torch.equal(copies[0], copies[1])  # augmented anew
    first = [build_loader(cfg, rank=r, world_size=2, epoch=0, global_batch=24) for r in range(2)]
    seen = _take(first, 3)
    rest = _epoch(cfg, 3, 0, remaining=first[0].remaining(), global_batch=24)
    assert Counter(seen + [k for batches in rest for k in _keys(batches)]) == counts


def test_a_position_that_is_not_whole_batches_is_refused(local_shards):
    cfg = _config(local_shards, batch_size=4)
    with pytest.raises(ValueError, match="not whole batches of 4 on 3 ranks"):
        build_loader(cfg, rank=0, world_size=3, epoch=0, remaining=[[0, 0, 10]])
    with pytest.raises(ValueError, match="global batch 20 is not a whole number of batches of 4 on 2"):
        build_loader(cfg, rank=0, world_size=2, epoch=0, global_batch=20)


def test_too_few_shards_is_a_clear_error(tmp_path):
    make_imagefolder(tmp_path / "src", num_classes=3, per_class=4, size=32)
    build_shards(str(tmp_path / "src"), str(tmp_path / "s"), "imagefolder", max_count=4, progress=False)
    with pytest.raises(ValueError, match=r"3 shards cannot feed 4 readers"):
        build_loader(_config(str(tmp_path / "s"), batch_size=1, drop_remainder=False), rank=0,
                     world_size=2, epoch=0)
    with pytest.raises(ValueError, match=r"3 shards cannot feed 4 partitions \(data.partitions\)"):
        build_loader(_config(str(tmp_path / "s"), partitions=4), rank=0, world_size=1, epoch=0)
    # training splits partitions between readers: 3 shards feed 2 ranks x 2 workers
    keys = sorted(_keys(sum(_epoch(_config(str(tmp_path / "s"), batch_size=1), 2, 0), [])))
    assert keys == sorted(_all_keys(tmp_path / "src"))
    with pytest.raises(ValueError, match="data.recipe"):
        build_loader(_config(str(tmp_path / "s"), recipe="simclr"), rank=0, world_size=1, epoch=0)


def _rewrite(shard: Path, edit) -> None:
    with tarfile.open(shard) as tar:
        members = [(m, tar.extractfile(m).read()) for m in tar.getmembers()]
    members = edit(members)
    with tarfile.open(shard, "w") as tar:
        for member, data in members:
            member.size = len(data)
            tar.addfile(member, io.BytesIO(data))


def _first_jpg(members) -> str:
    return next(member.name for member, _ in members if member.name.endswith(".jpg"))


def test_corrupt_image_missing_key_and_truncated_tar_are_skipped_and_counted(tmp_path, caplog):
    make_imagefolder(tmp_path / "src", num_classes=4, per_class=10, size=32)
    shards = tmp_path / "s"
    build_shards(str(tmp_path / "src"), str(shards), "imagefolder", max_count=10, progress=False)
    # shard 0: one JPEG replaced by garbage; shard 1: one sample loses its image; shard 2: cut mid-way
    _rewrite(
        shards / "train-000000.tar",
        lambda ms: [(m, b"not a jpeg" if m.name == _first_jpg(ms) else d) for m, d in ms],
    )
    _rewrite(shards / "train-000001.tar", lambda ms: [(m, d) for m, d in ms if m.name != _first_jpg(ms)])
    data = (shards / "train-000002.tar").read_bytes()
    (shards / "train-000002.tar").write_bytes(data[: len(data) // 2])
    cfg = _config(str(shards), batch_size=4, num_workers=2)
    loader = build_loader(cfg, rank=0, world_size=1, epoch=0)
    with caplog.at_level("WARNING"):
        batches = list(loader)
    assert len(batches) == len(loader) == 10  # the epoch goes on at full length
    assert loader.counters["corrupt_image"] == 1
    assert loader.counters["missing_key"] == 1
    assert loader.counters["truncated_shard"] == 1
    assert sum(sum(b["stats"].values()) for b in batches) == 3
    assert "train-000002.tar" in caplog.text and "train-000000.tar" in caplog.text


def test_prefetched_s3_shards_match_streamed_ones_and_count_a_truncated_shard(tmp_path, s3_env, monkeypatch):
    make_imagefolder(tmp_path / "src", num_classes=2, per_class=6, size=32)
    dest = f"s3://{s3_env}/train"
    build_shards(str(tmp_path / "src"), dest, "imagefolder", max_count=4, seed=5, progress=False)
    urls = [shard.url for shard in list_shards(dest).shards]
    with fsspec.open(urls[1], "rb") as handle:
        data = handle.read()
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        cut = tar.getmembers()[3].offset  # after the first sample (jpg, cls, json), before the second
    with fsspec.open(urls[1], "wb") as handle:  # a cut tarfile alone would read as a clean, short end
        handle.write(data[:cut])
    fetched: list[str] = []

    def spy(url: str, *args) -> bytes:
        fetched.append(url)
        return real_fetch(url, *args)

    real_fetch = shards.fetch_shard
    monkeypatch.setattr(shards, "fetch_shard", spy)
    plain, ahead = Counters(), Counters()
    streamed = list(iter_shards(urls, plain, prefetch=0))
    assert fetched == []  # prefetch 0: the earlier path, streamed through fsspec
    prefetched = list(iter_shards(urls, ahead, prefetch=2))
    assert fetched == urls  # each shard fetched whole, once, in order
    assert prefetched == streamed and len(streamed) == 8  # same samples, bytes, order; the cut shard's
    # only sample was still in progress when the damage showed (its completeness unknown), so it is dropped
    for counters in (plain, ahead):
        assert counters == {"truncated_shard": 1} and urls[1] in counters.messages[0]

    fetched.clear()
    samples = iter_shards(urls, Counters(), prefetch=1)
    next(samples)
    deadline = time.monotonic() + 10
    while len(fetched) < 2 and time.monotonic() < deadline:  # shard 1 downloads while shard 0 is read
        time.sleep(0.01)
    assert fetched == urls[:2]
    samples.close()

    loaders = {
        depth: build_loader(
            _config(dest, batch_size=2, num_workers=0, prefetch_shards=depth), rank=0, world_size=1, epoch=0
        )
        for depth in (0, 1)
    }
    epochs = {depth: list(loader) for depth, loader in loaders.items()}
    assert _keys(epochs[0]) == _keys(epochs[1])
    assert all(torch.equal(a["images"], b["images"]) for a, b in zip(epochs[0], epochs[1]))
    assert loaders[0].counters == loaders[1].counters == {"truncated_shard": 1}


def test_local_shards_are_read_in_place(local_shards, monkeypatch):
    monkeypatch.setattr(shards, "fetch_shard", lambda url, *a: pytest.fail(f"{url} fetched whole"))
    urls = [shard.url for shard in list_shards(local_shards).shards]
    assert list(iter_shards(urls, Counters(), prefetch=2)) == list(iter_shards(urls, Counters(), prefetch=0))


def test_moco_batches_with_seeds_fast_superpixels(local_shards):
    from cast.superpixels import get_provider

    cfg = _config(
        local_shards, recipe="moco", batch_size=4, num_workers=1, superpixels="seeds_fast", image_size=64
    )
    loader = build_loader(cfg, rank=0, world_size=1, epoch=0)
    batch = next(iter(loader))
    assert batch["images"].shape == (4, 2, 3, 64, 64)
    labels = batch["superpixels"]
    assert labels.shape == (4, 2, 64, 64) and labels.dtype == torch.int32  # int16 with a token budget
    for view in labels.reshape(8, 64, 64):
        assert torch.equal(torch.unique(view), torch.arange(int(view.max()) + 1))  # 0..K-1, no gaps
    on_device = get_provider("slic_torch")
    batch = next(iter(build_loader(cfg, rank=0, world_size=1, epoch=0, provider=on_device)))
    assert "superpixels" not in batch  # the train step computes them on the device


def test_segmentation_batches_from_voc(tmp_path):
    make_voc(tmp_path / "voc", count=8, size=48)
    build_shards(str(tmp_path / "voc"), str(tmp_path / "s"), "voc", max_count=2, progress=False)
    cfg = _config(str(tmp_path / "s"), recipe="segmentation", batch_size=2)
    batches = list(build_loader(cfg, rank=0, world_size=2, epoch=0))
    assert len(batches) == 2
    mask = batches[0]["mask"]
    assert mask.shape == (2, 32, 32) and mask.dtype == torch.int64
    values = set(np.unique(mask.numpy()).tolist())
    assert values <= set(range(21)) | {255} and values - {255}
    assert batches[0]["label"].tolist() == [-1, -1]
    assert Counter(k for b in batches for k in b["key"]).most_common(1)[0][1] == 1


def _small_tar(path: Path, names: list[str]) -> list[tarfile.TarInfo]:
    with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tar:
        for name in names:
            info = tarfile.TarInfo(name)
            info.size = 700
            tar.addfile(info, io.BytesIO(bytes(700)))
    with tarfile.open(path) as tar:
        return tar.getmembers()


DAMAGE = ["member boundary", "inside a header", "no end-of-archive block", "duplicate"]


@pytest.mark.parametrize("damage", DAMAGE)
def test_damage_webdataset_passes_over_in_silence_is_counted(tmp_path, damage):
    """Why the member iterator is ours: on these tars webdataset's reader yields samples and no error."""
    import webdataset as wds

    shard = tmp_path / "s.tar"
    names = [f"s{i}.{ext}" for i in range(4) for ext in ("cls", "jpg")]
    if damage == "duplicate":
        names.insert(3, "s1.jpg")
    members = _small_tar(shard, names)
    data = shard.read_bytes()
    cut = {
        "member boundary": members[4].offset,  # before sample 2: the tar reads as complete
        "inside a header": members[4].offset + 100,
        "no end-of-archive block": members[-1].offset_data + 1024,  # every member there, the end blocks cut
        "duplicate": len(data),
    }[damage]
    shard.write_bytes(data[:cut])
    counters = Counters()
    ours = [sample["__key__"] for sample in shards.iter_raw_samples(str(shard), counters)]
    assert counters == {"truncated_shard": 1} and str(shard) in counters.messages[0]
    # the sample in progress at the damage is dropped: its completeness is unknown
    assert ours == {"member boundary": ["s0"], "inside a header": ["s0"],
                    "no end-of-archive block": ["s0", "s1", "s2"], "duplicate": ["s0"]}[damage]
    if damage != "duplicate":  # webdataset raises on a duplicate; on the cuts it ends quietly
        theirs = [sample["__key__"] for sample in wds.WebDataset(str(shard), shardshuffle=False)]
        assert theirs == ours + [f"s{len(ours)}"]
