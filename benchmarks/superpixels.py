"""Superpixel providers side by side: CPU cost per view and token-grid quality against the reference.

    python -m benchmarks.superpixels [--views-per-photo 16] [--rounds 8]

Reproduces the method of reference/superpixel_calibration.md on the photos bundled with
scikit-image: MoCo-v3 augmented 224 views, one thread, all methods timed interleaved on the
same chunk of views in each round (median over rounds of process CPU ms per view), quality
on the 28x28 token grid against the reference setting (SEEDS, 15 bins, 20 iterations).
Exits non-zero when ``seeds_fast`` misses a quality or speed gate.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass

import cv2
import numpy as np
import torch

from cast.superpixels import get_provider
from cast.superpixels import quality as q


@dataclass
class Method:
    """A labelled way to compute maps for a list of views (timed as a whole)."""

    label: str
    run: Callable[[list[np.ndarray]], list[np.ndarray]]
    timed: bool = True


def per_view(name: str, **params) -> Callable[[list[np.ndarray]], list[np.ndarray]]:
    provider = get_provider(name, **params)
    return lambda views: [provider(view) for view in views]


def per_batch(name: str, **params) -> Callable[[list[np.ndarray]], list[np.ndarray]]:
    provider = get_provider(name, **params)

    def run(views: list[np.ndarray]) -> list[np.ndarray]:
        images01 = torch.from_numpy(np.stack(views)).permute(0, 3, 1, 2).float() / 255
        return list(provider.batch(images01).numpy())
    return run


def with_grey_level_noise(views: list[np.ndarray]) -> list[np.ndarray]:
    """The reference setting on views with +-1 grey level of noise: SEEDS' own noise floor."""
    rng = np.random.default_rng(0)
    baseline = get_provider("seeds")
    noisy = [np.clip(v + rng.integers(-1, 2, v.shape), 0, 255).astype(np.uint8) for v in views]
    return [baseline(view) for view in noisy]


def methods() -> list[Method]:
    grid = q.block_grid_labels(224, 224, 196)
    rows = [
        Method("seeds, reference (224, 15 bins, 20 it)", per_view("seeds")),
        Method("seeds, DeiT preset (224, 5 bins, 15 it)", per_view("seeds", preset="deit")),
        Method("seeds_fast (112, 5 bins, 5 it)", per_view("seeds_fast")),
        Method("slic_torch eager (224, 10 it, batch)", per_batch("slic_torch")),
        Method("ref: 14x14 block grid", lambda views: [grid] * len(views), timed=False),
        Method("ref: reference on +-1 grey level noise", with_grey_level_noise, timed=False),
    ]
    return rows


def time_methods(rows: list[Method], views: list[np.ndarray], rounds: int, chunk: int) -> dict[str, float]:
    """Median over rounds of CPU ms per view; every round runs each method on the same chunk."""
    timed = [m for m in rows if m.timed]
    for method in timed:  # warm-up: SEEDS objects, torch kernels
        method.run(views[:chunk])
    samples: dict[str, list[float]] = {m.label: [] for m in timed}
    for round_index in range(rounds):
        start = (round_index * chunk) % max(1, len(views) - chunk + 1)
        part = views[start:start + chunk]
        for method in timed:
            began = time.process_time()
            method.run(part)
            samples[method.label].append((time.process_time() - began) * 1000 / len(part))
    return {label: float(np.median(values)) for label, values in samples.items()}


def measure_quality(rows: list[Method], views: list[np.ndarray]) -> dict[str, dict[str, float]]:
    reference = rows[0].run(views)
    edges = [q.image_edges(view) for view in views]
    table = {}
    for method in rows:
        maps = reference if method is rows[0] else method.run(views)
        grid_scores = [q.grid_quality(v, m, r) for v, m, r in zip(views, maps, reference)]
        connected = [q.connectivity(m)[0] for m in maps]
        table[method.label] = {
            "ari": float(np.median([s["ari"] for s in grid_scores])),
            "ari_p10": float(np.percentile([s["ari"] for s in grid_scores], 10)),
            "labels_on_grid": float(np.median([s["labels_on_grid"] for s in grid_scores])),
            "labels_p10": float(np.percentile([s["labels_on_grid"] for s in grid_scores], 10)),
            "token_r2": float(np.median([s["token_r2"] for s in grid_scores])),
            "boundary_recall": float(np.median([q.boundary_recall(e, m) for e, m in zip(edges, maps)])),
            "connected": float(np.median(connected)),
        }
    return table


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--views-per-photo", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--chunk", type=int, default=32, help="views per method per round")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    cv2.setNumThreads(1)

    photos = q.calibration_photos()
    views = q.moco_views(list(photos.values()), args.views_per_photo, seed=0)
    rows = methods()
    began = time.perf_counter()
    cost = time_methods(rows, views, args.rounds, min(args.chunk, len(views)))
    quality = measure_quality(rows, views)
    baseline_ms = cost[rows[0].label]

    print(f"\n{len(views)} MoCo-style 224 views of {len(photos)} scikit-image photos; one thread; "
          f"CPU ms/view = median of {args.rounds} interleaved rounds of {args.chunk} views")
    print("ARI, labels, R2: 28x28 token grid vs the reference map (median, p10 in brackets); "
          "boundary recall of Canny edges (tolerance 2 px) and share of 4-connected labels: full-res map\n")
    header = (f"| {'method':<42} | ms/view | speed-up | ARI (p10)     | labels on grid | token R2 "
              f"| bnd recall | connected |")
    print(header)
    print("|" + "|".join("-" * (len(cell)) for cell in header.split("|")[1:-1]) + "|")
    for method in rows:
        ms = cost.get(method.label)
        m = quality[method.label]
        timing = (f"{ms:7.2f} | {baseline_ms / ms:7.1f}x" if ms else f"{'-':>7} | {'-':>8}")
        print(f"| {method.label:<42} | {timing} | {m['ari']:.3f} ({m['ari_p10']:.3f}) "
              f"| {m['labels_on_grid']:5.0f} ({m['labels_p10']:3.0f})    | {m['token_r2']:.3f}    "
              f"| {m['boundary_recall']:.3f}      | {m['connected']:.3f}     |")

    fast_label = "seeds_fast (112, 5 bins, 5 it)"
    reference_r2 = quality[rows[0].label]["token_r2"]
    gates = [  # (measure, value, threshold)
        ("labels on grid", quality[fast_label]["labels_on_grid"], 190),
        ("ARI median", quality[fast_label]["ari"], 0.38),
        ("token R2 vs reference - margin", quality[fast_label]["token_r2"], reference_r2 - q.TOKEN_R2_MARGIN),
        ("speed-up vs reference", baseline_ms / cost[fast_label], 10.0),
    ]
    print("\nseeds_fast gates:")
    failed = False
    for measure, value, threshold in gates:
        failed |= value < threshold
        print(f"  {measure:<32} {value:8.3f} >= {threshold:6.3f}  {'PASS' if value >= threshold else 'FAIL'}")
    absolute = quality[fast_label]["token_r2"]
    print(f"  (calibration's absolute token R2 gate, 0.89 on its 10 photos: {absolute:.3f}; "
          f"the reference itself scores {reference_r2:.3f} on these 8)")
    print(f"\n(measured in {time.perf_counter() - began:.0f} s)")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
