"""What exact, world-size independent epochs cost the loader: samples/s of a training epoch, ours
against another revision of the repository, alternating round by round on the same local shards.

    python -m benchmarks.epoch_position [--before /path/to/older/checkout] [--samples 1536] [--rounds 5]

Each round runs one whole epoch of the training loader (``drop_remainder``: every rank of a 2-rank
world in turn, 2 DataLoader workers each, JPEG decode and the eval transform, no superpixels, so the
bookkeeping is not hidden behind SEEDS) in a fresh process of each revision, and, for ours, the rest of
an epoch resumed at 3 ranks from a position taken after 5 steps at 2 ranks (readers that start inside a
partition read and drop its first samples). Reported: median samples/s of each and the median ratio.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

_EPOCH = """
import json, sys, time
from cast.data import DataConfig, build_loader
shards, resumed = sys.argv[1], sys.argv[2] == "resumed"
cfg = DataConfig(shards=shards, recipe="eval", image_size=64, batch_size=16, num_workers=2,
                 shuffle_buffer=256, superpixels="")
start, count = time.perf_counter(), 0
if resumed:
    first = [build_loader(cfg, rank=r, world_size=2, epoch=0, global_batch=96) for r in range(2)]
    its = [iter(loader) for loader in first]
    for _ in range(5 * 3):
        for it in its:
            count += len(next(it)["key"])
    remaining = first[0].remaining()
    del its
    for rank in range(3):
        loader = build_loader(cfg, rank=rank, world_size=3, epoch=0, remaining=remaining, global_batch=96)
        count += sum(len(b["key"]) for b in loader)
else:
    for rank in range(2):
        count += sum(len(b["key"]) for b in build_loader(cfg, rank=rank, world_size=2, epoch=0))
print(json.dumps({"samples": count, "seconds": time.perf_counter() - start}))
"""


def make_shards(root: Path, samples: int) -> str:
    import numpy as np
    from PIL import Image

    from data_tools.make_shards import build_shards

    rng = np.random.default_rng(0)
    for i in range(samples):
        folder = root / "src" / f"class_{i % 4}"
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(folder / f"{i:05d}.jpg")
    build_shards(str(root / "src"), str(root / "shards"), "imagefolder", max_count=128, progress=False)
    return str(root / "shards")


def run_epoch(checkout: str, shards: str, mode: str) -> float:
    env = {**os.environ, "PYTHONPATH": checkout}
    out = subprocess.run([sys.executable, "-c", _EPOCH, shards, mode], env=env, cwd=checkout,
                         capture_output=True, text=True, check=True)
    result = json.loads(out.stdout.strip().splitlines()[-1])
    return result["samples"] / result["seconds"]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--before", default="", help="an older checkout to compare against (default: none)")
    parser.add_argument("--samples", type=int, default=1536)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        shards = make_shards(Path(tmp), args.samples)
        rows: dict[str, list[float]] = {"ours": [], "ours, resumed 2 -> 3 ranks": []}
        if args.before:
            rows["before"] = []
        start = time.perf_counter()
        for _ in range(args.rounds):
            if args.before:
                rows["before"].append(run_epoch(args.before, shards, "whole"))
            rows["ours"].append(run_epoch(str(REPO), shards, "whole"))
            rows["ours, resumed 2 -> 3 ranks"].append(run_epoch(str(REPO), shards, "resumed"))
    print(f"{args.samples} samples of 64 px in shards of 128, 2 ranks x 2 DataLoader workers, batch 16, "
          f"{args.rounds} rounds ({time.perf_counter() - start:.0f} s)")
    for name, values in rows.items():
        print(f"  {name:28s} {statistics.median(values):8.1f} samples/s  (rounds: "
              f"{', '.join(f'{v:.0f}' for v in values)})")
    if args.before:
        ratios = [ours / before for ours, before in zip(rows["ours"], rows["before"], strict=True)]
        print(f"  ours / before: median {statistics.median(ratios):.3f}")


if __name__ == "__main__":
    main()
