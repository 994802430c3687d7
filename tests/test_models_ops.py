"""Building blocks of cast.models checked against naive re-computations."""

import itertools

import numpy as np
import pytest
import torch

from cast.models.fps import farthest_point_sampling, sample_seeds
from cast.models.positions import sincos_2d_table
from cast.models.segment_ops import masked_mean, segment_mean
from cast.models.superpixel_tokens import superpixel_tokens


def test_segment_mean_equals_naive_loop():
    gen = torch.Generator().manual_seed(0)
    values = torch.randn(3, 40, 5, generator=gen)
    ids = torch.randint(0, 9, (3, 40), generator=gen)
    ids[1][ids[1] == 4] = 5  # segment 4 empty in image 1
    weights = torch.rand(3, 40, generator=gen) + 0.1
    for w in (None, weights):
        means, counts = segment_mean(values, ids, 9, w)
        for b, s in itertools.product(range(3), range(9)):
            members = (ids[b] == s).nonzero().flatten().tolist()
            ws = [1.0 if w is None else float(w[b, i]) for i in members]
            expected = sum(ws[j] * values[b, i] for j, i in enumerate(members)) / max(sum(ws), 1e-30)
            if not members:
                expected = torch.zeros(5)
            assert counts[b, s].item() == pytest.approx(sum(ws), rel=1e-5)
            torch.testing.assert_close(means[b, s], expected, rtol=1e-5, atol=1e-6)
    assert counts[1, 4] == 0


def test_masked_mean_skips_padded_rows():
    x = torch.tensor([[[1.0], [3.0], [100.0]]])
    assert masked_mean(x, torch.tensor([[False, False, True]])).item() == 2.0
    assert masked_mean(x, None).item() == pytest.approx(104 / 3)


def brute_force_fps(points: np.ndarray, k: int, start: int) -> list[int]:
    """FPS by definition: next = argmax over points of min distance to the chosen set; lowest index wins."""
    chosen = [start]
    for _ in range(k - 1):
        best, best_dist = None, -1.0
        for j, p in enumerate(points):
            d = min(float(((p - points[c]) ** 2).sum()) for c in chosen)
            if d > best_dist:
                best, best_dist = j, d
        chosen.append(best)
    return chosen


def test_fps_equals_brute_force_including_ties():
    gen = torch.Generator().manual_seed(1)
    continuous = torch.randn(2, 30, 4, generator=gen, dtype=torch.float64)
    lattice = torch.randint(0, 3, (2, 30, 2), generator=gen).double()  # many exact ties and duplicates
    for points in (continuous, lattice, continuous.float(), lattice.float()):
        got = farthest_point_sampling(points, 12, start_index=0)
        for b in range(2):
            assert got[b].tolist() == brute_force_fps(points[b].numpy(), 12, 0)


def test_seeds_start_from_mean_and_skip_padding():
    gen = torch.Generator().manual_seed(2)
    tokens = torch.randn(2, 20, 8, generator=gen)
    padding = torch.zeros(2, 20, dtype=torch.bool)
    padding[0, 15:] = True
    tokens[0, 15:] = 1000.0  # far away, but padded: must never be picked
    seeds = sample_seeds(tokens, padding, 10)
    assert (seeds[0] < 15).all() and seeds.unique(dim=1).shape[1] == 10
    mean = tokens[1].mean(0)
    assert seeds[1, 0] == ((tokens[1] - mean) ** 2).sum(-1).argmax()


def test_sincos_table_matches_moco_layout():
    # The original builds meshgrid(w, h) ('ij'), so the first half of the channels encodes the first
    # index of the flattened 28x28 grid, i.e. the row of the [H, W] view.
    dim, side = 16, 5
    table = sincos_2d_table(side, side, dim).view(side, side, dim)
    omega = 1.0 / 10000 ** (torch.arange(4) / 4)
    r, c = 3, 1
    expected = torch.cat([(r * omega).sin(), (r * omega).cos(), (c * omega).sin(), (c * omega).cos()])
    torch.testing.assert_close(table[r, c], expected)


def test_token_pooling_modes():
    gen = torch.Generator().manual_seed(3)
    feats = torch.randn(1, 2, 2, 3, generator=gen)
    table = torch.zeros(4, 3)
    sp = torch.zeros(1, 16, 16, dtype=torch.long)
    sp[0, 1:9, 1:9] = 1  # owns no cell's top-left pixel: a padded token under nearest snapping
    sp[0, 8:, 8:] = 2
    near, near_count = superpixel_tokens(feats, table, (2, 2), sp, "nearest")
    # top-left pixels (0,0), (0,8), (8,0), (8,8) carry labels 0, 0, 0, 2
    torch.testing.assert_close(near[0, 0], (feats[0, 0, 0] + feats[0, 0, 1] + feats[0, 1, 0]) / 3)
    assert near_count.tolist() == [[3, 0, 1]] and near[0, 1].abs().sum() == 0
    area, area_count = superpixel_tokens(feats, table, (2, 2), sp, "area")
    cells = torch.arange(16) // 8
    expected = torch.zeros(3, 3)
    for label in range(3):
        ys, xs = (sp[0] == label).nonzero(as_tuple=True)
        expected[label] = feats[0, cells[ys], cells[xs]].mean(0)
    torch.testing.assert_close(area[0], expected)
    assert area_count[0].tolist() == [float((sp == k).sum()) for k in range(3)]


def test_area_pooling_is_resolution_independent():
    # a superpixel map at half the image resolution (as SPML computes SEEDS on a 0.5x crop) gives the
    # same area-weighted tokens as the same map upsampled to full resolution
    gen = torch.Generator().manual_seed(4)
    feats = torch.randn(2, 4, 4, 6, generator=gen)
    half = torch.randint(0, 5, (2, 16, 16), generator=gen)
    full = half.repeat_interleave(2, 1).repeat_interleave(2, 2)
    table = torch.randn(16, 6, generator=gen)
    a, count_a = superpixel_tokens(feats, table, (4, 4), half, "area")
    b, count_b = superpixel_tokens(feats, table, (4, 4), full, "area")
    torch.testing.assert_close(a, b)
    torch.testing.assert_close(count_a * 4, count_b)
