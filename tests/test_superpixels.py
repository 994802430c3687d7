"""Superpixel providers on real photos bundled with scikit-image: contract, quality, pickling, shards."""

from __future__ import annotations

import pickle

import cv2
import numpy as np
import pytest
import torch

from cast.superpixels import (
    SAMPLE_KEY,
    decode_labels,
    encode_labels,
    get_provider,
    relabel_contiguous,
    relabel_contiguous_batch,
)
from cast.superpixels import quality as q
from cast.superpixels.slic_torch import rgb_to_lab

# (provider name, params, expected label count range at 224x224)
PROVIDERS = {
    "seeds_moco": ("seeds", {}, (196, 196)),
    "seeds_deit": ("seeds", {"preset": "deit"}, (196, 196)),
    "seeds_fast": ("seeds_fast", {}, (196, 196)),
    "slic_torch": ("slic_torch", {}, (170, 196)),
}


@pytest.fixture(scope="module")
def photos() -> dict[str, np.ndarray]:
    """The calibration photos, area-resized to 224x224."""
    return {name: cv2.resize(photo, (224, 224), interpolation=cv2.INTER_AREA)
            for name, photo in q.calibration_photos().items()}


@pytest.fixture(scope="module")
def labels(photos) -> dict[str, dict[str, np.ndarray]]:
    """Each provider's maps of the photos, computed once for the module."""
    return {key: {name: get_provider(provider, **params)(photo) for name, photo in photos.items()}
            for key, (provider, params, _) in PROVIDERS.items()}


def to_images01(images: list[np.ndarray]) -> torch.Tensor:
    return torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float() / 255


@pytest.mark.parametrize("key", PROVIDERS)
def test_maps_are_int64_contiguous_with_expected_count(key, photos, labels):
    low, high = PROVIDERS[key][2]
    for name, label_map in labels[key].items():
        assert label_map.dtype == np.int64 and label_map.shape == (224, 224), name
        count = label_map.max() + 1
        assert np.array_equal(np.unique(label_map), np.arange(count)), f"{key} {name}: labels have gaps"
        assert low <= count <= high, f"{key} {name}: {count} labels"


@pytest.mark.parametrize("key", PROVIDERS)
def test_superpixels_follow_image_edges_better_than_a_grid(key, photos, labels):
    grid = q.block_grid_labels(224, 224, 196)
    recall = [q.boundary_recall(q.image_edges(photo), labels[key][name]) for name, photo in photos.items()]
    grid_recall = [q.boundary_recall(q.image_edges(photo), grid) for photo in photos.values()]
    assert np.mean(recall) >= np.mean(grid_recall) + 0.15, (key, np.mean(recall), np.mean(grid_recall))


@pytest.mark.parametrize("key, min_connected_labels, min_main_piece_pixels", [
    ("seeds_moco", 0.9, 0.98),
    ("seeds_fast", 0.9, 0.98),
    # SLIC without a sequential connectivity pass leaves stray pixels (skimage's slic does the
    # same with enforce_connectivity=False); most pixels still sit in their label's main piece.
    ("slic_torch", 0.1, 0.8),
])
def test_labels_are_spatially_connected(key, min_connected_labels, min_main_piece_pixels, labels):
    shares = np.array([q.connectivity(label_map) for label_map in labels[key].values()])
    assert np.median(shares[:, 0]) >= min_connected_labels, shares[:, 0]
    assert np.median(shares[:, 1]) >= min_main_piece_pixels, shares[:, 1]


def test_seeds_matches_reference_opencv_call(photos, labels):
    for name, photo in photos.items():
        engine = cv2.ximgproc.createSuperpixelSEEDS(224, 224, 3, 196, 1, 2, 15, False)
        engine.iterate(cv2.cvtColor(photo, cv2.COLOR_RGB2LAB), 20)
        assert np.array_equal(labels["seeds_moco"][name], relabel_contiguous(engine.getLabels())), name


def test_seeds_object_reuse_and_pickling_keep_labels_identical(photos, labels):
    provider = get_provider("seeds_fast")
    for photo in photos.values():  # warm the per-thread SEEDS cache on other images first
        provider(photo)
    clone = pickle.loads(pickle.dumps(provider))
    for name, photo in photos.items():
        assert np.array_equal(provider(photo), labels["seeds_fast"][name]), name
        assert np.array_equal(clone(photo), labels["seeds_fast"][name]), name


def test_seeds_fast_upsamples_a_half_resolution_map(photos, labels):
    label_map = labels["seeds_fast"]["astronaut"]
    assert np.array_equal(label_map[0::2, 0::2], label_map[1::2, 1::2])  # constant on 2x2 blocks
    small = cv2.resize(photos["astronaut"], (112, 112), interpolation=cv2.INTER_AREA)
    engine = cv2.ximgproc.createSuperpixelSEEDS(112, 112, 3, 196, 1, 2, 5, False)
    engine.iterate(cv2.cvtColor(small, cv2.COLOR_RGB2LAB), 5)
    assert np.array_equal(label_map[::2, ::2], relabel_contiguous(engine.getLabels()))


def test_seeds_presets_and_odd_sizes():
    photo = cv2.resize(q.calibration_photos()["coffee"], (256, 256), interpolation=cv2.INTER_AREA)
    assert get_provider("seeds", preset="segmentation")(photo).max() + 1 == 256  # one per 16x16 pixels
    for height, width in ((8, 8), (16, 24), (32, 32), (48, 48), (61, 97)):  # tiny views crashed OpenCV
        view = cv2.resize(photo, (width, height))
        for name in ("seeds", "seeds_fast"):
            label_map = get_provider(name)(view)
            assert label_map.shape == (height, width)
            assert np.array_equal(np.unique(label_map), np.arange(label_map.max() + 1))
    with pytest.raises(ValueError, match="view 4x64 is below SEEDS' minimum of 8 pixels"):
        get_provider("seeds_fast")(photo[:4, :64])


def test_seeds_fast_meets_quality_gates_on_augmented_views():
    """The benchmark's gates (python -m benchmarks.superpixels, exact thresholds on 128 views) on
    16 views: a 16-view median of ARI moves by about +-0.015 with the view seed, so the ARI bound
    here is 0.36 and must also clear the free block grid."""
    views = q.moco_views(list(q.calibration_photos().values()), views_per_photo=2, seed=0)
    baseline, fast = get_provider("seeds"), get_provider("seeds_fast")
    reference_maps = [baseline(view) for view in views]
    scores = [q.grid_quality(view, fast(view), ref) for view, ref in zip(views, reference_maps)]
    median = {metric: np.median([s[metric] for s in scores]) for metric in scores[0]}
    reference_r2 = np.median([q.token_colour_r2(view, ref) for view, ref in zip(views, reference_maps)])
    grid = q.block_grid_labels(224, 224, 196)
    grid_ari = np.median([q.grid_quality(view, grid, ref)["ari"] for view, ref in zip(views, reference_maps)])
    assert median["labels_on_grid"] >= 190, median
    assert median["ari"] >= 0.36 and median["ari"] >= grid_ari + 0.03, (median, grid_ari)
    assert median["token_r2"] >= reference_r2 - q.TOKEN_R2_MARGIN, (median, reference_r2)


def test_cpu_provider_batch_matches_per_view_calls(photos, labels):
    names = ["astronaut", "coffee", "rocket"]
    batch = get_provider("seeds_fast").batch(to_images01([photos[n] for n in names]))
    assert batch.dtype == torch.int64 and batch.shape == (3, 224, 224)
    for index, name in enumerate(names):
        assert np.array_equal(batch[index].numpy(), labels["seeds_fast"][name])


def test_slic_torch_batch_is_independent_of_companions(photos, labels):
    provider = get_provider("slic_torch")
    names = ["chelsea", "retina", "motorcycle"]
    batch = provider.batch(to_images01([photos[n] for n in names]))
    reordered = provider.batch(to_images01([photos[n] for n in reversed(names)]))
    for index, name in enumerate(names):
        assert torch.equal(batch[index], torch.from_numpy(labels["slic_torch"][name])), name
        assert torch.equal(reordered[len(names) - 1 - index], batch[index]), name


def test_slic_torch_queues_without_host_reads():
    """On the meta device any .item(), unique() or data-dependent shape would fail: so on CUDA
    the provider never synchronises with the host."""
    out = get_provider("slic_torch").batch(torch.empty(4, 3, 224, 224, device="meta"))
    assert out.device.type == "meta" and out.shape == (4, 224, 224) and out.dtype == torch.int64


def test_slic_torch_odd_sizes_and_lab(photos):
    provider = get_provider("slic_torch", num_segments=64, iterations=3)
    images = to_images01([cv2.resize(photos["rocket"], (75, 50))] * 2)
    out = provider.batch(images)
    assert out.shape == (2, 50, 75) and torch.equal(out[0], out[1])
    assert torch.equal(torch.unique(out[0]), torch.arange(int(out[0].max()) + 1))
    lab = rgb_to_lab(to_images01([photos["astronaut"]]))[0].permute(1, 2, 0).numpy()
    expected = cv2.cvtColor(photos["astronaut"].astype(np.float32) / 255, cv2.COLOR_RGB2LAB)
    assert np.abs(lab - expected).max() < 0.5


@pytest.mark.parametrize("name", ["seeds", "seeds_fast", "slic_torch", "precomputed"])
def test_providers_pickle(name, photos):
    provider = get_provider(name)
    if name != "precomputed":
        provider(photos["chelsea"])  # populate any per-process cache before pickling
    clone = pickle.loads(pickle.dumps(provider))
    assert clone == provider and clone.on_device == (name == "slic_torch")


def test_precomputed_round_trip_and_relabel(labels):
    stored = labels["seeds_moco"]["astronaut"]
    encoded = encode_labels(stored)
    assert np.array_equal(decode_labels(encoded), stored)
    provider = get_provider("precomputed")
    sample = {"__key__": "img_001", "__url__": "shard-000000.tar", "jpg": b"", SAMPLE_KEY: encoded}
    decoded = provider.from_sample(sample)
    crop = decoded[50:130, 20:110]  # a crop drops labels: the provider closes the gaps
    relabelled = provider(crop)
    assert relabelled.dtype == np.int64 and relabelled.max() + 1 == len(np.unique(crop))
    assert q.adjusted_rand_index(relabelled, crop) == 1.0
    batch = provider.batch(torch.from_numpy(np.stack([crop, crop])))
    assert torch.equal(batch[1], torch.from_numpy(relabelled))
    with pytest.raises(KeyError, match="img_001.*spx.png"):
        provider.from_sample({"__key__": "img_001", "jpg": b""})
    with pytest.raises(ValueError, match="not an image"):
        provider(np.zeros((8, 8, 3), np.uint8))
    with pytest.raises(ValueError, match="0..65535"):
        encode_labels(np.full((4, 4), 70000))
    with pytest.raises(ValueError, match="spx.png"):
        decode_labels(b"not a png")


def test_relabelling_closes_gaps():
    gappy = np.array([[7, 7, 2], [9, 2, 2]])
    assert np.array_equal(relabel_contiguous(gappy), [[1, 1, 0], [2, 0, 0]])
    batch = torch.tensor([[[5, 5], [1, 3]], [[0, 0], [0, 4]]])
    assert torch.equal(relabel_contiguous_batch(batch, 6), torch.tensor([[[2, 2], [0, 1]], [[0, 0], [0, 1]]]))


def test_get_provider_rejects_bad_names_and_parameters():
    with pytest.raises(ValueError, match="seeds_fast"):
        get_provider("felzenszwalb")
    with pytest.raises(ValueError, match="num_superpixel"):
        get_provider("seeds_fast", num_superpixel=196)
    with pytest.raises(ValueError, match="preset"):
        get_provider("seeds", preset="imagenet")
    with pytest.raises(ValueError, match="histogram_bins"):
        get_provider("seeds", histogram_bins=0)
    with pytest.raises(ValueError, match="downscale"):
        get_provider("seeds_fast", downscale=0.5)
    with pytest.raises(ValueError, match="uint8 RGB"):
        get_provider("seeds")(np.zeros((8, 8), np.float32))
    with pytest.raises(ValueError, match=r"\[B, 3, H, W\]"):
        get_provider("slic_torch").batch(torch.zeros(3, 8, 8))


def test_quality_measures_on_known_cases():
    a = np.array([0, 0, 1, 1, 2, 2])
    assert q.adjusted_rand_index(a, a + 5) == 1.0
    assert q.adjusted_rand_index(np.array([0, 0, 1, 1]), np.array([0, 0, 1, 2])) == pytest.approx(4 / 7)
    assert q.adjusted_rand_index(np.zeros(4, int), np.arange(4)) == 0.0
    grid = q.block_grid_labels(224, 224, 196)
    assert grid.max() + 1 == 196 and len(np.unique(q.token_grid(grid))) == 196
    assert q.boundary_recall(q.label_boundaries(grid), grid, tolerance=0) == 1.0
    # Two colours split down the middle: grouping by colour explains everything, mixing explains nothing.
    image = np.zeros((224, 224, 3), np.uint8)
    image[:, 112:] = 255
    halves = (np.arange(224)[None, :] >= 112).repeat(224, 0).astype(np.int64)
    assert q.token_colour_r2(image, halves) == pytest.approx(1.0)
    assert q.token_colour_r2(image, np.zeros((224, 224), np.int64)) == pytest.approx(0.0)
    split = np.zeros((4, 6), np.int64)
    split[:, 2:4] = 1  # label 0 in two pieces of 8 pixels, label 1 in one piece
    assert q.connectivity(split) == (0.5, pytest.approx(16 / 24))
