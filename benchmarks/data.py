"""Data-path throughput, side by side in one run.

    python -m benchmarks.data [--seconds 90] [--size 224] [--stream-samples 600] [--bytes-only]

Part 0, bytes per MoCo sample that cross the DataLoader and the host-to-device copy: the lean batch
(uint8 images, int16 maps, normalised on the device) against the float32 / int64 it used to be.

Part 1, samples/s per core for one MoCo two-view sample (JPEG decode, two augmented views,
superpixels, tensor + normalise), one thread, all variants interleaved round by round on the
same encoded photos and timed in process CPU seconds:
  (a) the original's way: full-resolution SEEDS, 15 bins / 20 iterations, per view;
  (b) each provider of ``cast.superpixels`` (``slic_torch`` batched over the chunk's views);
  (c) decode + augment without superpixels (the floor).
Part 2 (alone with --streaming-only), streaming the same shards from local disk and from a loopback
S3 server (moto_server started on a free 127.0.0.1 port and stopped by pid), S3 both streamed in
1 MiB reads (prefetch 0, the earlier path) and fetched whole 1 or 2 shards ahead of the parse:
samples/s through the read path alone (fsspec + tar stream, no decode) and through the whole
loader in one process (+ JPEG decode and the eval transform, as a DataLoader worker runs it).
Part 3 (alone with --reader-only), the raw tar read path on local disk, no decode: ours
(``cast.data.shards.iter_shards``: our member iterator with its damage checks, grouped by
webdataset's ``group_by_keys``) against ``webdataset.WebDataset(urls, shardshuffle=False)``, same
shards, the two alternating round by round; the median of the per-round ratios.
"""

from __future__ import annotations

import argparse
import io
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path

import cv2
import numpy as np
import torch
from PIL import Image

from cast.data import DataConfig, build_loader
from cast.data.samples import decode_image
from cast.data.shards import Counters, iter_shards, list_shards
from cast.data.transforms import MocoRecipe
from data_tools.make_shards import build_shards


def source_jpegs(count: int, seed: int = 0) -> list[bytes]:
    """ImageNet-like JPEGs (~500x375) cut from the scikit-image photos."""
    import skimage.data

    photos = [
        np.asarray(getattr(skimage.data, name)())[..., :3]
        for name in ("astronaut", "coffee", "chelsea", "rocket", "immunohistochemistry", "hubble_deep_field")
    ]
    rng = np.random.default_rng(seed)
    out = []
    for i in range(count):
        photo = photos[i % len(photos)]
        h, w = photo.shape[:2]
        ch, cw = int(h * rng.uniform(0.6, 1.0)), int(w * rng.uniform(0.6, 1.0))
        y, x = rng.integers(0, h - ch + 1), rng.integers(0, w - cw + 1)
        image = Image.fromarray(np.ascontiguousarray(photo[y : y + ch, x : x + cw])).resize((500, 375))
        buffer = io.BytesIO()
        image.save(buffer, format="JPEG", quality=90)
        out.append(buffer.getvalue())
    return out


def photo_folder(root: Path, count: int) -> str:
    """``count`` source JPEGs in a one-class image folder under ``root``."""
    photos = root / "src" / "photos"
    photos.mkdir(parents=True)
    for i, data in enumerate(source_jpegs(count, seed=1)):
        (photos / f"{i:06d}.jpg").write_bytes(data)
    return str(photos.parent)


def build_photo_shards(src: str, dest: str, count: int) -> None:
    """Eight shards of the photo folder."""
    build_shards(src, dest, "imagefolder", max_count=max(1, count // 8), progress=False)


def moco_variant(recipe: MocoRecipe, provider=None, batched=None) -> Callable[[list[bytes]], None]:
    """Process a chunk of encoded samples end to end; superpixels per view, batched, or none."""

    def run(chunk: list[bytes]) -> None:
        all_views = []
        for data in chunk:
            image = decode_image(data, "benchmark sample")
            views, _ = recipe.augment(image)
            if provider is not None:
                for view in views:
                    provider(view)
            torch.stack([recipe.finish(view) for view in views])
            all_views.extend(views)
        if batched is not None:
            images01 = torch.from_numpy(np.stack(all_views)).permute(0, 3, 1, 2).float() / 255
            batched.batch(images01)

    return run


def part_one(seconds: float, size: int) -> dict[str, float]:
    from cast.superpixels import get_provider

    torch.set_num_threads(1)
    cv2.setNumThreads(1)
    recipe = MocoRecipe(size)
    variants = {
        "(a) original: SEEDS 15 bins/20 it, full res": moco_variant(
            recipe, get_provider("seeds", preset="moco")
        ),
        "(b) seeds (deit preset: 5 bins/15 it)": moco_variant(recipe, get_provider("seeds", preset="deit")),
        "(b) seeds_fast": moco_variant(recipe, get_provider("seeds_fast")),
        "(b) slic_torch (batched, CPU)": moco_variant(recipe, batched=get_provider("slic_torch")),
        "(c) decode + augment, no superpixels": moco_variant(recipe),
    }
    samples = source_jpegs(64)
    chunk_size = 16
    rates: dict[str, list[float]] = {name: [] for name in variants}
    for run in variants.values():  # warm-up: SEEDS engines, allocator
        run(samples[:2])
    deadline = time.monotonic() + seconds
    round_index = 0
    while time.monotonic() < deadline or round_index < 3:
        start = (round_index * chunk_size) % len(samples)
        chunk = (samples + samples)[start : start + chunk_size]
        for name, run in variants.items():
            t0 = time.process_time()
            run(chunk)
            rates[name].append(len(chunk) / (time.process_time() - t0))
        round_index += 1
    return {name: statistics.median(values) for name, values in rates.items()}


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_moto() -> tuple[subprocess.Popen, str]:
    port = _free_port()
    endpoint = f"http://127.0.0.1:{port}"
    moto = os.path.join(os.path.dirname(sys.executable), "moto_server")
    proc = subprocess.Popen(
        [moto, "-H", "127.0.0.1", "-p", str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    for _ in range(150):
        try:
            urllib.request.urlopen(f"{endpoint}/moto-api/", timeout=1)
            return proc, endpoint
        except Exception:  # noqa: BLE001 - not up yet
            time.sleep(0.2)
    proc.terminate()
    raise TimeoutError(f"moto_server on {endpoint} did not come up")


def stream_rate(spec: str, prefetch: int) -> float:
    """Samples/s reading every shard of ``spec`` through the loader's read path (tar stream, no decode)."""
    urls = [shard.url for shard in list_shards(spec).shards]
    counters = Counters()
    t0 = time.perf_counter()
    count = sum(1 for _ in iter_shards(urls, counters, prefetch=prefetch))
    elapsed = time.perf_counter() - t0
    if counters:
        raise RuntimeError(f"damaged shards while benchmarking {spec}: {dict(counters)}")
    return count / elapsed


def webdataset_rate(spec: str) -> float:
    """Samples/s of ``webdataset.WebDataset`` on the same shards (its opener and tar iterator, no decode)."""
    import webdataset as wds

    urls = [shard.url for shard in list_shards(spec).shards]
    t0 = time.perf_counter()
    count = sum(1 for _ in wds.WebDataset(urls, shardshuffle=False))
    return count / (time.perf_counter() - t0)


def part_three(num_samples: int, rounds: int = 9) -> dict[str, list[float]]:
    """{reader: samples/s per round} for ours and webdataset's raw read of the same local shards."""
    with tempfile.TemporaryDirectory(prefix="bench-reader-") as tmp:
        local = str(Path(tmp) / "shards")
        build_photo_shards(photo_folder(Path(tmp), num_samples), local, num_samples)
        readers = {
            "ours (iter_shards)": lambda: stream_rate(local, 0),
            "webdataset.WebDataset": lambda: webdataset_rate(local),
        }
        for rate in readers.values():  # warm the page cache and imports
            rate()
        results: dict[str, list[float]] = {name: [] for name in readers}
        for round_index in range(rounds):
            order = list(readers) if round_index % 2 == 0 else list(readers)[::-1]
            for name in order:
                results[name].append(readers[name]())
    return results


def loader_rate(spec: str, prefetch: int, size: int = 224) -> float:
    """Samples/s through the whole loader in this process: read, JPEG decode, eval transform, batches."""
    cfg = DataConfig(
        shards=spec,
        recipe="eval",
        image_size=size,
        batch_size=25,
        num_workers=0,
        shuffle=False,
        superpixels="",
        drop_remainder=False,
        prefetch_shards=prefetch,
    )
    loader = build_loader(cfg, rank=0, world_size=1, epoch=0)
    t0 = time.perf_counter()
    count = sum(len(batch["key"]) for batch in loader)
    elapsed = time.perf_counter() - t0
    if loader.counters:
        raise RuntimeError(f"damaged shards while benchmarking {spec}: {dict(loader.counters)}")
    return count / elapsed


def s3_reader(depth: int) -> str:
    return f"S3 prefetch {depth} shard(s)" if depth else "S3 streamed (prefetch 0)"


def part_two(num_samples: int, rounds: int = 7) -> dict[str, dict[str, list[float]]]:
    """{path: {reader: samples/s per round}} for the read path and the decoding loader; the readers
    run back to back within a round, so per-round ratios cancel slow drifts of a shared machine."""
    import boto3
    import fsspec

    torch.set_num_threads(1)  # as in a DataLoader worker
    proc, endpoint = start_moto()
    try:
        env = {
            "AWS_ENDPOINT_URL": endpoint,
            "AWS_ACCESS_KEY_ID": "bench",
            "AWS_SECRET_ACCESS_KEY": "bench",
            "AWS_DEFAULT_REGION": "us-east-1",
        }
        os.environ.update(env)
        fsspec.filesystem("s3").clear_instance_cache()
        boto3.client("s3", endpoint_url=endpoint).create_bucket(Bucket="bench")
        with tempfile.TemporaryDirectory(prefix="bench-data-") as tmp:
            src = photo_folder(Path(tmp), num_samples)
            local = str(Path(tmp) / "shards")
            for dest in (local, "s3://bench/shards"):
                build_photo_shards(src, dest, num_samples)
            readers = {"local disk": (local, DataConfig.prefetch_shards)}
            readers.update({s3_reader(depth): ("s3://bench/shards", depth) for depth in (0, 1, 2)})
            paths = {  # path: (rate function, rounds); decoding is slow and steadier
                "read (tar stream, no decode)": (stream_rate, rounds),
                "loader (+ decode, eval transform)": (loader_rate, max(1, rounds // 2)),
            }
            results = {path: {name: [] for name in readers} for path in paths}
            for round_index in range(rounds):
                for path, (rate, path_rounds) in paths.items():
                    if round_index < path_rounds:
                        for name, (spec, prefetch) in readers.items():
                            results[path][name].append(rate(spec, prefetch))
        return results
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.data", description=__doc__.split("\n")[0])
    parser.add_argument("--seconds", type=float, default=90.0, help="time budget of part 1")
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--stream-samples", type=int, default=600)
    parser.add_argument("--streaming-only", action="store_true", help="run parts 2 and 3 only")
    parser.add_argument("--reader-only", action="store_true", help="run part 3 only")
    parser.add_argument("--bytes-only", action="store_true", help="run part 0 only")
    args = parser.parse_args(argv)

    if not (args.streaming_only or args.reader_only):
        report_batch_bytes(args.size)
        if args.bytes_only:
            return 0
        report_part_one(args.seconds, args.size)
    if not args.reader_only:
        report_part_two(args.stream_samples)
    report_part_three(args.stream_samples)
    return 0


def batch_bytes(size: int, count: int = 16) -> dict[str, float]:
    """Bytes per MoCo sample (two views + seeds_fast maps, token budget 196) as the loader ships it
    now (uint8 images, int16 maps) and as it used to (normalised float32, int64: what ``to_device``
    widens them to on the device), measured on a real batch of the photo shards."""
    from cast.data.batches import to_device

    with tempfile.TemporaryDirectory() as tmp:
        src = photo_folder(Path(tmp), count)
        build_photo_shards(src, f"{tmp}/shards", count)
        cfg = DataConfig(shards=f"{tmp}/shards", recipe="moco", image_size=size, batch_size=count // 2,
                         num_workers=0, superpixels="seeds_fast", max_superpixels=196)
        batch = next(iter(build_loader(cfg, rank=0, world_size=1, epoch=0)))
    wide = to_device(batch, "cpu")
    samples = batch["images"].shape[0]
    return {
        "before": sum(wide[k].nbytes for k in ("images", "superpixels")) / samples,
        "after": sum(batch[k].nbytes for k in ("images", "superpixels")) / samples,
    }


def report_batch_bytes(size: int, rate: float = 1000.0) -> None:
    sizes = batch_bytes(size)
    print(f"host->device bytes per MoCo sample at {size} px (images + superpixel maps, two views)")
    for name, value in sizes.items():
        label = "float32 images, int64 maps" if name == "before" else "uint8 images, int16 maps"
        print(f"  {name:7s} {label:28s} {value / 2**20:6.2f} MiB  {value * rate / 1e9:5.2f} GB/s at "
              f"{rate:.0f} samples/s")
    print(f"  after / before: {sizes['after'] / sizes['before']:.3f}\n")


def report_part_one(seconds: float, size: int) -> None:
    rates = part_one(seconds, size)
    original = rates["(a) original: SEEDS 15 bins/20 it, full res"]
    floor = rates["(c) decode + augment, no superpixels"]
    print(f"MoCo two-view sample at {size} px, one thread (samples/s per core, median over rounds)")
    print(f"{'variant':48s} {'samples/s':>10s} {'x (a)':>7s} {'(c)/x':>7s}")
    for name, rate in rates.items():
        print(f"{name:48s} {rate:10.1f} {rate / original:7.2f} {floor / rate:7.2f}")
    fast = rates["(b) seeds_fast"]
    print(
        f"classification default seeds_fast: {fast / original:.2f}x (a) (goal >= 3.5), "
        f"(c) is {floor / fast:.2f}x faster (goal <= 1.3)"
    )


def report_part_two(num_samples: int) -> None:
    results = part_two(num_samples)
    print(f"\nstreaming {num_samples} samples (~500x375 JPEG) in 8 shards: disk vs loopback S3 (moto_server)")
    for path, rates in results.items():
        disk = rates["local disk"]
        print(
            f"{path:34s} {'best/s':>8s} {'/ disk median':>14s} {'min':>5s} {'max':>5s} ({len(disk)} rounds)"
        )
        for name, values in rates.items():
            ratios = [value / base for value, base in zip(values, disk)]
            print(
                f"  {name:32s} {max(values):8.1f} {statistics.median(ratios):14.2f} "
                f"{min(ratios):5.2f} {max(ratios):5.2f}"
            )
        default = statistics.median(v / d for v, d in zip(rates[s3_reader(DataConfig.prefetch_shards)], disk))
        print(f"  S3 / disk with the default data.prefetch_shards: {default:.2f} (goal >= 0.8)")


def report_part_three(num_samples: int) -> None:
    results = part_three(num_samples)
    ours, theirs = results["ours (iter_shards)"], results["webdataset.WebDataset"]
    ratios = [a / b for a, b in zip(ours, theirs)]
    print(f"\nraw tar read, local disk, {num_samples} samples in 8 shards, no decode ({len(ratios)} rounds)")
    for name, values in results.items():
        print(f"  {name:24s} median {statistics.median(values):9.1f} samples/s  best {max(values):9.1f}")
    print(
        f"  ours / webdataset: median {statistics.median(ratios):.2f} "
        f"(min {min(ratios):.2f}, max {max(ratios):.2f})"
    )


if __name__ == "__main__":
    raise SystemExit(main())
