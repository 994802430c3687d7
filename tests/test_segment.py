"""jobs.segment on real photos, and its pieces: image sources (files, URLs, shards) and checkpoint loading."""

import io
import json
import subprocess
import sys
import tarfile

import fsspec
import numpy as np
import pytest
import torch
from PIL import Image
from skimage import data as skdata

from cast.eval.images import centre_view, iter_images
from cast.eval.model_loading import load_model
from cast.models import cast_config

PHOTOS = ("astronaut", "coffee", "chelsea")
SIZE = 64


@pytest.fixture(scope="module")
def photo_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("photos")
    for name in PHOTOS:
        Image.fromarray(getattr(skdata, name)()).save(folder / f"{name}.jpg", quality=90)
    return folder


def test_segment_job_writes_k_segments_per_level(photo_dir, tmp_path):
    out = tmp_path / "seg"
    command = [sys.executable, "-m", "jobs.segment", "--random-init", "--model", "cast_tiny",
               "--size", str(SIZE), "--images", str(photo_dir), "--out", str(out), "--batch-size", "2",
               "--device", "cpu", "--no-progress"]
    finished = subprocess.run(command, capture_output=True, text=True, timeout=240)
    assert finished.returncode == 0, finished.stderr[-3000:]
    clusters = cast_config("cast_tiny").num_clusters
    manifest = json.loads((out / "segments.json").read_text())
    assert sorted(entry["name"] for entry in manifest["images"]) == sorted(PHOTOS)
    for name in PHOTOS:
        levels = np.load(out / "labels" / f"{name}_levels.npy")
        assert levels.shape == (len(clusters), SIZE, SIZE)
        for level, k in enumerate(clusters, start=1):
            picture = Image.open(out / "labels" / f"{name}_level{level}.png")
            labels = np.asarray(picture)
            np.testing.assert_array_equal(labels, levels[level - 1])
            assert len(np.unique(labels)) == k, f"{name} level {level}"
        overlay = Image.open(out / "overlays" / f"{name}.png")
        overlay.verify()
        scale = -(-192 // SIZE)  # panels upscaled to at least 192 px
        assert overlay.size[0] > (len(clusters) + 1) * SIZE * scale and overlay.size[1] >= SIZE * scale
    # the hierarchy nests: each level-l segment lies inside one level-(l+1) segment
    levels = np.load(out / "labels" / "coffee_levels.npy")
    for fine, coarse in zip(levels[:-1], levels[1:]):
        pairs = set(zip(fine.ravel().tolist(), coarse.ravel().tolist()))
        assert len(pairs) == len(np.unique(fine))


def _tar_bytes(members: dict[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        for name, payload in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))
    return buffer.getvalue()


def _png(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def test_image_sources_urls_shards_and_unique_names(photo_dir, tmp_path):
    photo = skdata.coffee()[:40, :60]
    mask = np.zeros((40, 60), np.uint8)
    shard = _tar_bytes({"s0.png": _png(photo), "s0.seg.png": _png(mask), "s0.cls": b"3",
                        "s1.seg.png": _png(mask), "s1.jpg": (photo_dir / "chelsea.jpg").read_bytes()})
    with fsspec.open("memory://bucket/shards/demo-000000.tar", "wb") as handle:
        handle.write(shard)
    with fsspec.open("memory://bucket/shards/_info.json", "w") as handle:
        shards = [{"name": "demo-000000.tar", "num_samples": 2}]
        json.dump({"name": "demo", "num_samples": 2, "shards": shards}, handle)
    sources = ["memory://bucket/shards", f"file://{photo_dir}/chelsea.jpg", str(photo_dir / "chelsea.jpg")]
    items = list(iter_images(sources))
    assert [item.name for item in items] == ["s0", "s1", "chelsea", "chelsea_1"]
    np.testing.assert_array_equal(items[0].image, photo)  # the image, not its mask
    assert items[1].image.shape == skdata.chelsea().shape
    with pytest.raises(ValueError, match="expected an image file/URL, a folder of images, or shards"):
        list(iter_images([str(tmp_path / "notes.txt")]))
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"not a jpeg")
    with pytest.raises(ValueError, match="broken.jpg: not a readable image"):
        list(iter_images([str(broken)]))


def test_centre_view_is_square_crop_of_shorter_side():
    image = np.zeros((100, 200, 3), np.uint8)
    image[:, 100:] = 255  # right half white: the centre crop straddles the middle
    view = centre_view(image, 32)
    assert view.shape == (32, 32, 3)
    assert view[:, :14].max() == 0 and view[:, 18:].min() == 255


def test_segment_images_levels_subset_and_bad_level(tmp_path):
    from cast.eval.images import NamedImage
    from cast.eval.segment_images import segment_images
    from cast.superpixels import get_provider

    model = load_model("cast_tiny", None)
    provider = get_provider("seeds", preset="moco")
    with pytest.raises(ValueError, match=r"level\(s\) \[5\] outside 1..4"):
        segment_images(model, [], str(tmp_path), provider, size=SIZE, levels=[5])
    written = segment_images(model, [NamedImage("rocket", skdata.rocket())], str(tmp_path), provider,
                             size=SIZE, levels=[2, 4], progress=False)
    assert written[0].segments_per_level == [8, 2]
    assert np.load(tmp_path / "labels" / "rocket_levels.npy").shape == (2, SIZE, SIZE)
    assert len(np.unique(np.asarray(Image.open(tmp_path / "labels" / "rocket_level4.png")))) == 2


def test_load_model_from_state_dict_and_mismatch(tmp_path):
    source = load_model("cast_tiny", None)
    path = tmp_path / "tiny.pth"
    torch.save(source.state_dict(), path)
    loaded = load_model("cast_tiny", str(path))
    for key, value in source.state_dict().items():
        torch.testing.assert_close(loaded.state_dict()[key], value, msg=key)
    assert not loaded.training
    with pytest.raises(ValueError, match="tiny.pth: does not fit cast_tiny"):
        load_model("cast_tiny", str(path), embed_dim=96)


def test_load_model_from_a_moco_training_run(tmp_path):
    from cast.artifacts import COMPLETE_MARKER, write_checkpoint
    from cast.models import create_model
    from cast.train.checkpoint import Position, checkpoint_name
    from cast.train.config import MocoConfig
    from cast.train.objectives import MoCo

    moco = MoCo(create_model("cast_tiny", num_classes=0), MocoConfig(dim=16, mlp_dim=32))
    run = tmp_path / "run"
    for step, scale in ((1, 0.0), (2, 1.0)):  # the newer complete checkpoint is the one loaded
        folder = run / checkpoint_name(Position(step=step))
        folder.mkdir(parents=True)
        state = {k: v * scale for k, v in moco.state_dict().items()} if scale == 0.0 else moco.state_dict()
        write_checkpoint(str(folder), {"model": state}, "model: {}\n")
        (folder / COMPLETE_MARKER).write_text("ok\n")
    (run / checkpoint_name(Position(step=3))).mkdir()  # an interrupted upload: no marker, ignored
    loaded = load_model("cast_tiny", str(run)).state_dict()
    for key, value in moco.base_encoder.state_dict().items():
        if not key.startswith("head."):
            torch.testing.assert_close(loaded[key], value, msg=key)
