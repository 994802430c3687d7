"""Data-path throughput, side by side in one run.

    python -m benchmarks.data [--seconds 90] [--size 224] [--stream-samples 600]

Part 1, samples/s per core for one MoCo two-view sample (JPEG decode, two augmented views,
superpixels, tensor + normalise), one thread, all variants interleaved round by round on the
same encoded photos and timed in process CPU seconds:
  (a) the original's way: full-resolution SEEDS, 15 bins / 20 iterations, per view;
  (b) each provider of ``cast.superpixels`` (``slic_torch`` batched over the chunk's views);
  (c) decode + augment without superpixels (the floor).
Part 2, streaming the same shards from local disk and from a loopback S3 server (moto_server
started on a free 127.0.0.1 port and stopped by pid): raw samples/s and MB/s through the
loader's read path (fsspec + tar stream, no decode).
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

from cast.data.shards import Counters, iter_raw_samples, list_shards
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


def moco_variant(recipe: MocoRecipe, provider=None, batched=None) -> Callable[[list[bytes]], None]:
    """Process a chunk of encoded samples end to end; superpixels per view, batched, or none."""

    def run(chunk: list[bytes]) -> None:
        all_views = []
        for data in chunk:
            image = Image.open(io.BytesIO(data)).convert("RGB")
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


def stream_rate(spec: str) -> tuple[float, float]:
    """(samples/s, MB/s) reading every shard of ``spec`` through the loader's read path."""
    shards = list_shards(spec).shards
    counters = Counters()
    t0 = time.perf_counter()
    count, size = 0, 0
    for shard in shards:
        for sample in iter_raw_samples(shard.url, counters):
            count += 1
            size += sum(len(v) for k, v in sample.items() if not k.startswith("__"))
    elapsed = time.perf_counter() - t0
    if counters:
        raise RuntimeError(f"damaged shards while benchmarking {spec}: {dict(counters)}")
    return count / elapsed, size / elapsed / 1e6


def part_two(num_samples: int, repeats: int = 3) -> dict[str, tuple[float, float]]:
    import boto3
    import fsspec

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
            src = Path(tmp) / "src" / "photos"
            src.mkdir(parents=True)
            for i, data in enumerate(source_jpegs(num_samples, seed=1)):
                (src / f"{i:06d}.jpg").write_bytes(data)
            local = str(Path(tmp) / "shards")
            for dest in (local, "s3://bench/shards"):
                build_shards(
                    str(src.parent), dest, "imagefolder", max_count=max(1, num_samples // 8), progress=False
                )
            results: dict[str, list[tuple[float, float]]] = {"local disk": [], "loopback S3": []}
            for _ in range(repeats):
                results["local disk"].append(stream_rate(local))
                results["loopback S3"].append(stream_rate("s3://bench/shards"))
        return {name: max(values) for name, values in results.items()}
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.data", description=__doc__.split("\n")[0])
    parser.add_argument("--seconds", type=float, default=90.0, help="time budget of part 1")
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--stream-samples", type=int, default=600)
    args = parser.parse_args(argv)

    rates = part_one(args.seconds, args.size)
    original = rates["(a) original: SEEDS 15 bins/20 it, full res"]
    floor = rates["(c) decode + augment, no superpixels"]
    print(f"MoCo two-view sample at {args.size} px, one thread (samples/s per core, median over rounds)")
    print(f"{'variant':48s} {'samples/s':>10s} {'x (a)':>7s} {'(c)/x':>7s}")
    for name, rate in rates.items():
        print(f"{name:48s} {rate:10.1f} {rate / original:7.2f} {floor / rate:7.2f}")
    fast = rates["(b) seeds_fast"]
    print(
        f"classification default seeds_fast: {fast / original:.2f}x (a) (goal >= 3.5), "
        f"(c) is {floor / fast:.2f}x faster (goal <= 1.3)"
    )

    streams = part_two(args.stream_samples)
    print(f"\nstreaming {args.stream_samples} samples (~500x375 JPEG), best of 3")
    for name, (samples_s, mb_s) in streams.items():
        print(f"{name:16s} {samples_s:9.1f} samples/s {mb_s:8.1f} MB/s")
    ratio = streams["loopback S3"][0] / streams["local disk"][0]
    print(f"S3 / disk: {ratio:.2f} (goal >= 0.8)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
