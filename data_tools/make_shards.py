"""Turn an image data set into WebDataset shards on any fsspec URL.

Why the shape: the shard plan (which sample goes into which shard) is a pure function of the
source listing, the seed and the size limit, so a rerun computes the same plan and skips shards
already committed. A shard becomes visible under its final name only when complete: locally it
is written to a hidden temporary name and renamed; on object stores it is uploaded in one PUT
from a local temporary file (S3 objects appear atomically). ``_info.json`` is written last, so
its presence marks a finished data set.

Usage: ``python -m data_tools.make_shards --src SRC --dest DEST --layout imagefolder``
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
import posixpath
import random
import sys
import tarfile
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import asdict, dataclass

import fsspec
from fsspec.implementations.local import LocalFileSystem
from tqdm import tqdm

from data_tools.layouts import LAYOUTS, SourceSample, scan

TOOL_VERSION = "cast-train-shards/1"
INFO_FILE = "_info.json"


@dataclass
class ShardInfo:
    """What ``_info.json`` holds; ``url`` is where it was written."""

    name: str
    num_samples: int
    shards: list[dict]
    classes: list[str]
    layout: str
    source: str
    tool_version: str
    url: str = ""

    @property
    def num_shards(self) -> int:
        return len(self.shards)


def plan_shards(
    samples: list[SourceSample], seed: int, max_count: int | None, max_bytes: int | None
) -> list[list[SourceSample]]:
    """Seeded shuffle, then cut into consecutive shards by count or by bytes (at least one sample each)."""
    if (max_count is None) == (max_bytes is None):
        raise ValueError("give exactly one of --max-count and --max-bytes")
    if (max_count is not None and max_count < 1) or (max_bytes is not None and max_bytes < 1):
        raise ValueError("--max-count/--max-bytes must be positive")
    order = list(samples)
    random.Random(seed).shuffle(order)
    shards: list[list[SourceSample]] = [[]]
    used = 0
    for sample in order:
        cost = 1 if max_count is not None else sample.size + 1536  # tar headers + small members
        limit = max_count if max_count is not None else max_bytes
        if shards[-1] and used + cost > limit:
            shards.append([])
            used = 0
        shards[-1].append(sample)
        used += cost
    return shards


def _plan_digest(plan: list[list[SourceSample]], layout: str, name: str) -> str:
    digest = hashlib.sha256(f"{layout}|{name}".encode())
    for i, shard in enumerate(plan):
        digest.update(f"#{i}:".encode() + "|".join(sample.key for sample in shard).encode())
    return digest.hexdigest()


def shard_name(name: str, index: int) -> str:
    return f"{name}-{index:06d}.tar"


def _add_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    member = tarfile.TarInfo(name)
    member.size = len(data)
    member.mtime = 0
    member.mode = 0o444
    tar.addfile(member, io.BytesIO(data))


def _write_tar(samples: list[SourceSample], local_path: str) -> None:
    with tarfile.open(local_path, "w", format=tarfile.USTAR_FORMAT) as tar:
        for sample in samples:
            with fsspec.open(sample.image, "rb") as handle:
                image = handle.read()
            ext = posixpath.splitext(sample.image)[1].lower().lstrip(".")
            ext = "jpg" if ext == "jpeg" else ext
            _add_member(tar, f"{sample.key}.{ext}", image)
            if sample.label >= 0:
                _add_member(tar, f"{sample.key}.cls", str(sample.label).encode())
            if sample.mask is not None:
                with fsspec.open(sample.mask, "rb") as handle:
                    _add_member(tar, f"{sample.key}.seg.png", handle.read())
            meta = {"source": sample.image, **sample.meta}
            _add_member(tar, f"{sample.key}.json", json.dumps(meta, sort_keys=True).encode())


def _commit(local_path: str, dest: str, final_name: str) -> None:
    """Make a finished local tar visible under its final name in one step."""
    fs, root = fsspec.core.url_to_fs(dest)
    final = posixpath.join(root.rstrip("/"), final_name)
    if isinstance(fs, LocalFileSystem):
        staged = posixpath.join(posixpath.dirname(final), f".{final_name}.partial-{os.getpid()}")
        fs.put_file(local_path, staged)
        os.replace(staged, final)
    else:
        fs.put_file(local_path, final)


def write_shard(samples: list[SourceSample], dest: str, final_name: str) -> str:
    """Write one shard (runs in a worker process); returns its name."""
    with tempfile.TemporaryDirectory(prefix="shard-") as tmp:
        local = os.path.join(tmp, final_name)
        _write_tar(samples, local)
        _commit(local, dest, final_name)
    return final_name


def build_shards(
    src: str,
    dest: str,
    layout: str,
    *,
    name: str = "train",
    max_count: int | None = None,
    max_bytes: int | None = None,
    workers: int = 1,
    seed: int = 0,
    split_list: str | None = None,
    progress: bool = True,
) -> ShardInfo:
    """Build (or finish building) the shards of ``src`` under ``dest``; returns the written info."""
    if layout not in LAYOUTS:
        raise ValueError(f"layout {layout!r}: expected one of {', '.join(LAYOUTS)}")
    if max_count is None and max_bytes is None:
        max_count = 1000
    samples, classes = scan(src, layout, split_list)
    plan = plan_shards(samples, seed, max_count, max_bytes)
    digest = _plan_digest(plan, layout, name)
    fs, root = fsspec.core.url_to_fs(dest)
    root = root.rstrip("/")
    fs.makedirs(root, exist_ok=True)
    plan_path = posixpath.join(root, f"_plan-{name}.json")
    if fs.exists(plan_path):
        previous = json.loads(fs.cat_file(plan_path))
        if previous.get("digest") != digest:
            raise ValueError(
                f"{dest}: holds shards of a different plan ({plan_path}: seed {previous.get('seed')}, "
                f"{previous.get('num_shards')} shards); use an empty --dest or the same arguments"
            )
    else:
        fs.pipe_file(
            plan_path, json.dumps({"digest": digest, "seed": seed, "num_shards": len(plan)}).encode()
        )
    names = [shard_name(name, i) for i in range(len(plan))]
    fs.invalidate_cache(root)
    existing = {posixpath.basename(path) for path in fs.ls(root, detail=False)}
    todo = [i for i, shard in enumerate(names) if shard not in existing]
    bar = tqdm(
        total=len(plan),
        initial=len(plan) - len(todo),
        desc=f"shards -> {dest}",
        unit="shard",
        disable=not progress,
        file=sys.stderr,
    )
    if workers > 1 and len(todo) > 1:
        with ProcessPoolExecutor(max_workers=workers) as pool:
            futures = [pool.submit(write_shard, plan[i], dest, names[i]) for i in todo]
            for future in as_completed(futures):
                future.result()
                bar.update()
    else:
        for i in todo:
            write_shard(plan[i], dest, names[i])
            bar.update()
    bar.close()
    info = ShardInfo(
        name=name,
        num_samples=len(samples),
        shards=[
            {"url": shard, "num_samples": len(shard_samples)} for shard, shard_samples in zip(names, plan)
        ],
        classes=classes,
        layout=layout,
        source=src,
        tool_version=TOOL_VERSION,
    )
    record = {k: v for k, v in asdict(info).items() if k != "url"}
    record["created"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    info_path = posixpath.join(root, INFO_FILE)
    fs.pipe_file(info_path, json.dumps(record, indent=1).encode())
    info.url = dest.rstrip("/") + "/" + INFO_FILE
    return info


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m data_tools.make_shards", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--src", required=True, help="source folder (any fsspec URL)")
    parser.add_argument(
        "--dest", required=True, help="output folder (any fsspec URL, e.g. s3://bucket/train)"
    )
    parser.add_argument("--layout", required=True, choices=LAYOUTS)
    parser.add_argument("--name", default="train", help="shard name prefix")
    size = parser.add_mutually_exclusive_group()
    size.add_argument("--max-count", type=int, help="samples per shard (default 1000)")
    size.add_argument("--max-bytes", type=int, help="bytes per shard")
    parser.add_argument("--workers", type=int, default=max(1, (os.cpu_count() or 2) // 2))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--split-list", help="VOC: id list (path relative to --src or a URL)")
    args = parser.parse_args(argv)
    info = build_shards(
        args.src,
        args.dest,
        args.layout,
        name=args.name,
        max_count=args.max_count,
        max_bytes=args.max_bytes,
        workers=args.workers,
        seed=args.seed,
        split_list=args.split_list,
    )
    print(
        f"{info.num_samples} samples in {info.num_shards} shards, {len(info.classes)} classes -> {info.url}"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
