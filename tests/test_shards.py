"""Shard creation: layouts, original bytes, seeded mixing, sizing, S3, resumability, verify CLI."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import fsspec
import pytest

from data_tools import make_shards
from data_tools.layouts import scan
from data_tools.make_shards import build_shards, plan_shards
from data_tools.verify_shards import main as verify_main
from data_tools.verify_shards import verify
from tests.fixtures.datasets import make_ade20k, make_flat, make_imagefolder, make_voc


def _members(url: str) -> dict[str, bytes]:
    with fsspec.open(url, "rb") as handle, tarfile.open(fileobj=handle, mode="r|") as tar:
        return {m.name: tar.extractfile(m).read() for m in tar if m.isfile()}


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    return make_imagefolder(tmp_path_factory.mktemp("src"), num_classes=4, per_class=12, size=32)


def test_s3_shards_keep_original_bytes_and_mix_classes(folder, s3_env):
    dest = f"s3://{s3_env}/fmnist"
    info = build_shards(str(folder), dest, "imagefolder", max_count=8, workers=2, seed=3, progress=False)
    assert (info.num_samples, info.num_shards) == (48, 6)
    record = json.loads(fsspec.open(f"{dest}/_info.json", "rb").open().read())
    assert record["classes"] == ["class_0", "class_1", "class_2", "class_3"]
    assert record["layout"] == "imagefolder" and record["num_samples"] == 48
    assert [s["num_samples"] for s in record["shards"]] == [8] * 6
    for shard in record["shards"]:
        members = _members(f"{dest}/{shard['url']}")
        labels = {int(data) for name, data in members.items() if name.endswith(".cls")}
        assert len(labels) >= 2, f"{shard['url']} holds one class only: seeded spread failed"
        for name, data in members.items():
            if name.endswith(".jpg"):
                meta = json.loads(members[name[: -len("jpg")] + "json"])
                assert Path(meta["source"]).read_bytes() == data  # no re-encode
                assert int(members[name[: -len("jpg")] + "cls"]) == int(meta["class"].split("_")[1])
    report = verify(dest)
    assert report.ok and report.found == 48


def test_plan_is_deterministic_and_sized_by_bytes(folder):
    samples, _ = scan(str(folder), "imagefolder")
    a = plan_shards(samples, 7, None, 4000)
    assert a == plan_shards(samples, 7, None, 4000)
    assert a != plan_shards(samples, 8, None, 4000)
    for shard in a:
        assert sum(s.size + 1536 for s in shard) <= 4000 or len(shard) == 1
    with pytest.raises(ValueError, match="exactly one"):
        plan_shards(samples, 0, 5, 4000)


def test_interrupted_build_resumes_without_rewriting(folder, tmp_path, monkeypatch):
    dest = tmp_path / "out"
    real_tar = make_shards._write_tar
    written: list[str] = []

    def crash_on_third(samples, local_path):
        if len(written) == 2:
            Path(local_path).write_bytes(b"half a tar")  # a partial file exists while the crash happens
            raise KeyboardInterrupt("simulated kill")
        real_tar(samples, local_path)
        written.append(local_path)

    monkeypatch.setattr(make_shards, "_write_tar", crash_on_third)
    with pytest.raises(KeyboardInterrupt):
        build_shards(str(folder), str(dest), "imagefolder", max_count=10, progress=False)
    visible = sorted(p.name for p in dest.iterdir() if p.suffix == ".tar")
    assert visible == ["train-000000.tar", "train-000001.tar"]  # no partial shard under a final name
    assert not (dest / "_info.json").exists()
    assert not [p for p in dest.iterdir() if "partial" in p.name]
    stamps = {name: (dest / name).stat().st_mtime_ns for name in visible}

    monkeypatch.setattr(make_shards, "_write_tar", lambda s, p: (written.append(p), real_tar(s, p)))
    written.clear()
    info = build_shards(str(folder), str(dest), "imagefolder", max_count=10, progress=False)
    assert len(written) == info.num_shards - 2  # only the missing shards were built
    assert {name: (dest / name).stat().st_mtime_ns for name in visible} == stamps
    assert verify(str(dest)).ok
    with pytest.raises(ValueError, match="different plan"):
        build_shards(str(folder), str(dest), "imagefolder", max_count=10, seed=1, progress=False)


def test_voc_and_ade20k_layouts(tmp_path):
    voc = make_voc(tmp_path / "voc", count=6)
    (voc / "ImageSets/Segmentation/train.txt").write_text("2007_000001\n2007_000003\n2007_000004\n")
    info = build_shards(
        str(voc),
        str(tmp_path / "voc_out"),
        "voc",
        max_count=2,
        split_list="ImageSets/Segmentation/train.txt",
        progress=False,
    )
    assert info.num_samples == 3 and len(info.classes) == 21
    assert info.classes[:2] == ["background", "aeroplane"]
    members = _members(str(tmp_path / "voc_out" / "train-000000.tar"))
    assert {name.split(".", 1)[1] for name in members} == {"jpg", "seg.png", "json"}
    assert verify(str(tmp_path / "voc_out")).ok

    ade = make_ade20k(tmp_path / "ade", count=5)
    info = build_shards(str(ade), str(tmp_path / "ade_out"), "ade20k", max_count=2, progress=False)
    assert (info.num_samples, info.num_shards) == (5, 3)
    keys = {
        name.split(".", 1)[0]
        for s in range(3)
        for name in _members(str(tmp_path / f"ade_out/train-{s:06d}.tar"))
    }
    assert "training/ADE_train_00000003" in keys
    (ade / "annotations/training/ADE_train_00000001.png").unlink()
    with pytest.raises(FileNotFoundError, match="ADE_train_00000001"):
        build_shards(str(ade), str(tmp_path / "ade_bad"), "ade20k", progress=False)


def test_cli_and_verify_reports_damage(tmp_path, capsys):
    src = make_flat(tmp_path / "flat", count=9)
    dest = tmp_path / "out"
    assert (
        make_shards.main(
            [
                "--src",
                str(src),
                "--dest",
                f"file://{dest}",
                "--layout",
                "flat",
                "--max-count",
                "3",
                "--workers",
                "1",
            ]
        )
        == 0
    )
    assert verify_main([str(dest)]) == 0
    assert "9/9 samples" in capsys.readouterr().out
    shard = dest / "train-000001.tar"
    data = bytearray(shard.read_bytes())
    first_jpg = data.find(b"\xff\xd8")
    data[first_jpg + 2 : first_jpg + 200] = b"\0" * 198  # corrupt one JPEG body in place
    shard.write_bytes(bytes(data))
    (dest / "train-000002.tar").write_bytes((dest / "train-000002.tar").read_bytes()[:1500])  # truncate
    assert verify_main([str(dest)]) == 1
    err = capsys.readouterr().err
    assert "train-000001.tar: sample" in err and "undecodable" in err
    assert "train-000002.tar: truncated" in err


def test_bad_arguments_name_the_problem(tmp_path):
    with pytest.raises(ValueError, match="layout 'coco'"):
        build_shards(str(tmp_path), str(tmp_path / "o"), "coco")
    with pytest.raises(FileNotFoundError, match="not a directory"):
        build_shards(str(tmp_path / "missing"), str(tmp_path / "o"), "flat")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no images"):
        build_shards(str(tmp_path / "empty"), str(tmp_path / "o"), "flat")


def test_tar_members_are_webdataset_compatible(folder, tmp_path):
    import webdataset as wds

    build_shards(str(folder), str(tmp_path / "o"), "imagefolder", max_count=48, progress=False)
    samples = list(wds.WebDataset(str(tmp_path / "o/train-000000.tar"), shardshuffle=False))
    assert len(samples) == 48
    assert all({"jpg", "cls", "json"} <= set(s) for s in samples)
    assert io.BytesIO(samples[0]["jpg"]).read(2) == b"\xff\xd8"


def test_shards_are_deterministic_ustar_tars(folder, tmp_path):
    """TarWriter with a fixed mtime and owner: the same plan gives byte-identical USTAR shards."""
    first = build_shards(str(folder), str(tmp_path / "a"), "imagefolder", max_count=20, progress=False)
    build_shards(str(folder), str(tmp_path / "b"), "imagefolder", max_count=20, progress=False)
    for shard in first.shards:
        name = Path(shard.url).name
        data = (tmp_path / "a" / name).read_bytes()
        assert data == (tmp_path / "b" / name).read_bytes()
        assert data[257:265] == b"ustar\x0000"  # POSIX USTAR header magic
        with tarfile.open(fileobj=io.BytesIO(data)) as tar:
            assert {(m.mtime, m.mode, m.uname) for m in tar.getmembers()} == {(0, 0o444, "")}


def test_timm_and_webdataset_read_our_shards(folder, tmp_path):
    """timm's ReaderWds finds our split in _info.json and yields every sample; webdataset reads them all."""
    import webdataset as wds
    from timm.data import create_dataset

    from cast.data import list_shards

    dest = tmp_path / "o"
    ours = build_shards(str(folder), str(dest), "imagefolder", max_count=10, progress=False)  # 10+10+10+10+8
    dataset = create_dataset("wds/cast", root=str(dest), split="train")
    split = dataset.reader.split_info
    assert split.name == "train" and split.num_samples == ours.num_samples == 48
    assert list(split.filenames) == [Path(shard.url).name for shard in list_shards(str(dest)).shards]
    assert list(split.shard_lengths) == [shard.num_samples for shard in ours.shards] == [10, 10, 10, 10, 8]

    labels = {}  # key -> label, from the cls members as written
    for shard in ours.shards:
        for name, data in _members(shard.url).items():
            if name.endswith(".cls"):
                labels[name[: -len(".cls")]] = int(data)
    seen = [(image.size, target) for image, target in dataset]
    assert len(seen) == 48 and {size for size, _ in seen} == {(32, 32)}
    assert sorted(target for _, target in seen) == sorted(labels.values())

    samples = list(wds.WebDataset([shard.url for shard in ours.shards], shardshuffle=False))
    assert {s["__key__"]: int(s["cls"]) for s in samples} == labels

    # the README's timm command: validation shards in a sibling folder, named relative to --data-dir
    val = build_shards(str(folder), str(tmp_path / "val"), "imagefolder", name="val", max_count=12,
                       progress=False)
    split = f"../val/val-{{000000..{val.num_shards - 1:06d}}}.tar|{val.num_samples}"
    evaluation = create_dataset("wds/cast", root=str(dest), split=split)
    assert len(evaluation) == 48 and sum(1 for _ in evaluation) == 48


def test_verify_names_an_out_of_range_label_and_a_missing_shard(tmp_path, capsys):
    make_imagefolder(tmp_path / "src", num_classes=2, per_class=4, size=16)
    dest = tmp_path / "s"
    build_shards(str(tmp_path / "src"), str(dest), "imagefolder", max_count=4, progress=False)
    shard = dest / "train-000000.tar"
    with tarfile.open(shard) as tar:
        members = [(m, tar.extractfile(m).read()) for m in tar.getmembers()]
    bad = next(m.name for m, _ in members if m.name.endswith(".cls"))
    with tarfile.open(shard, "w") as tar:
        for member, data in members:
            data = b"7" if member.name == bad else data  # 2 classes in _info.json: labels 0..1
            member.size = len(data)
            tar.addfile(member, io.BytesIO(data))
    (dest / "train-000001.tar").unlink()  # listed in _info.json, gone
    assert verify_main([str(dest)]) == 1
    err = capsys.readouterr().err
    key = bad.rsplit(".", 1)[0]
    assert f"train-000000.tar: sample {key}: label 7 outside 0..1" in err
    assert "train-000001.tar: missing_shard" in err and "train-000001.tar: 0 samples" in err
