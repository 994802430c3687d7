"""Turn an image data set into WebDataset shards on any fsspec URL.

Why the shape: the shard plan (which sample goes into which shard) is a pure function of the
source listing, the seed and the size limit, so a rerun computes the same plan and skips shards
already committed. A shard becomes visible under its final name only when complete: locally it
is written to a hidden temporary name and renamed; on object stores it is uploaded in one PUT
from a local temporary file (S3 objects appear atomically). ``_info.json`` is written last, so
its presence marks a finished data set; its schema is ``cast.data.shards.Manifest``.

Tar members are written by webdataset's ``TarWriter`` (USTAR, fixed mtime and owner: the same
samples give the same bytes). Its ``ShardWriter`` is not used: it cuts shards as it streams, in one
process, straight under their final names, so it can neither plan shards from the listing alone,
nor commit them atomically, nor skip the finished ones of an interrupted run.

Usage: ``python -m data_tools.make_shards --src SRC --dest DEST --layout imagefolder``
"""

from __future__ import annotations

import argparse
import ctypes
import hashlib
import json
import multiprocessing
import os
import posixpath
import random
import shutil
import signal
import sys
import tempfile
import threading
import time
from concurrent.futures import ProcessPoolExecutor, as_completed

import fsspec
from fsspec.implementations.local import LocalFileSystem
from tqdm import tqdm
from webdataset import TarWriter

from cast.data.samples import LABEL_KEY, MASK_KEY
from cast.data.shards import INFO_FILE, Manifest, Shard, read_manifest
from data_tools.layouts import LAYOUTS, SourceSample, check_labels, mask_bytes, scan

TOOL_VERSION = "cast-train-shards/1"


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


def _members(sample: SourceSample) -> dict:
    """One shard sample: original image bytes, ``cls`` when labelled, ``seg.png`` mask, ``json`` metadata."""
    with fsspec.open(sample.image, "rb") as handle:
        image = handle.read()
    ext = posixpath.splitext(sample.image)[1].lower().lstrip(".")
    members = {"__key__": sample.key, "jpg" if ext == "jpeg" else ext: image}
    if sample.label >= 0:
        members[LABEL_KEY] = str(sample.label).encode()
    if sample.mask is not None:
        with fsspec.open(sample.mask, "rb") as handle:
            members[MASK_KEY] = mask_bytes(sample, handle.read())
    members["json"] = json.dumps({"source": sample.image, **sample.meta}, sort_keys=True).encode()
    return members


def _write_tar(samples: list[SourceSample], local_path: str) -> None:
    with open(local_path, "wb") as stream:
        with TarWriter(stream, encoder=False, mtime=0, user="", group="") as tar:
            for sample in samples:
                tar.write(_members(sample))


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


def write_shard(samples: list[SourceSample], dest: str, final_name: str, scratch: str | None = None) -> str:
    """Write one shard (runs in a worker process) via a local file under ``scratch``; returns its name."""
    with tempfile.TemporaryDirectory(prefix="shard-", dir=scratch) as tmp:
        local = os.path.join(tmp, final_name)
        _write_tar(samples, local)
        _commit(local, dest, final_name)
    return final_name


PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


def _worker_init(parent: int) -> None:
    """Pool workers die with the parent however it ends: Ctrl-C is left to the parent (which stops the
    pool), the kernel SIGKILLs the worker when the parent dies (Linux), and a watchdog thread covers
    other systems and a parent that died before this ran. Without this an orphan blocks on the task
    pipe for ever."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    if sys.platform.startswith("linux"):
        try:
            ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
        except (OSError, AttributeError):
            pass
    started_by = os.getppid()  # the parent itself, or a fork server that exits with it

    def gone() -> bool:  # reparented, or (when started by a server) the parent pid no longer exists
        try:
            os.kill(parent, 0)
        except ProcessLookupError:
            return True
        except PermissionError:
            pass
        return os.getppid() != started_by

    if started_by != parent and gone():
        os._exit(1)

    def watch() -> None:
        while not gone():
            time.sleep(0.5)
        os._exit(1)

    threading.Thread(target=watch, name="parent-watchdog", daemon=True).start()


def _stop_pool(pool: ProcessPoolExecutor) -> None:
    """Interrupted (Ctrl-C, SIGTERM, an error): drop queued shards and end the workers now, not after
    the shards in flight (their partial files never get a final name)."""
    processes = list((getattr(pool, "_processes", None) or {}).values())  # Python 3.11: no public API
    pool.shutdown(wait=False, cancel_futures=True)
    for process in processes:
        process.terminate()
    for process in processes:
        process.join(timeout=5)
        if process.is_alive():
            process.kill()


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
) -> Manifest:
    """Build (or finish building) the shards of ``src`` under ``dest``; returns the manifest as read back."""
    if layout not in LAYOUTS:
        raise ValueError(f"layout {layout!r}: expected one of {', '.join(LAYOUTS)}")
    samples, classes = scan(src, layout, split_list)
    return write_shards(
        samples, classes, dest, layout, source=src, name=name, max_count=max_count, max_bytes=max_bytes,
        workers=workers, seed=seed, progress=progress,
    )


def write_shards(
    samples: list[SourceSample],
    classes: list[str],
    dest: str,
    layout: str,
    *,
    source: str,
    name: str = "train",
    max_count: int | None = None,
    max_bytes: int | None = None,
    workers: int = 1,
    seed: int = 0,
    progress: bool = True,
) -> Manifest:
    """Shard a sample listing (from ``scan`` or a caller's own) under ``dest``; labels are checked
    against ``classes`` before anything is written."""
    check_labels(samples, classes)
    if max_count is None and max_bytes is None:
        max_count = 1000
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
    # one scratch folder per run, removed however the run ends short of a SIGKILL: a worker stopped
    # mid-shard cannot clean up its own temporary tar
    scratch = tempfile.mkdtemp(prefix="cast-shards-")
    try:
        if workers > 1 and len(todo) > 1:
            # spawned, not forked: a fork copies the caller's threads and sockets mid-use (a Ray driver's
            # gRPC channels: after a forked pool its next remote call hung), and Python warns about it
            pool = ProcessPoolExecutor(max_workers=workers, mp_context=multiprocessing.get_context("spawn"),
                                       initializer=_worker_init, initargs=(os.getpid(),))
            try:
                futures = [pool.submit(write_shard, plan[i], dest, names[i], scratch) for i in todo]
                for future in as_completed(futures):
                    future.result()
                    bar.update()
            except BaseException:
                _stop_pool(pool)
                raise
            pool.shutdown()
        else:
            for i in todo:
                write_shard(plan[i], dest, names[i], scratch)
                bar.update()
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    bar.close()
    manifest = Manifest(
        name=name,
        shards=[Shard(shard, len(shard_samples)) for shard, shard_samples in zip(names, plan)],
        classes=classes,
        layout=layout,
        source=source,
        tool_version=TOOL_VERSION,
        created=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    )
    fs.pipe_file(posixpath.join(root, INFO_FILE), json.dumps(manifest.to_json(), indent=1).encode())
    return read_manifest(dest)


def _interrupt(signum, frame) -> None:
    raise KeyboardInterrupt(signal.Signals(signum).name)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m data_tools.make_shards", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--src", required=True, help="source folder (any fsspec URL)")
    parser.add_argument(
        "--dest", required=True, help="output folder (any fsspec URL, e.g. s3://bucket/train)"
    )
    parser.add_argument("--layout", required=True, choices=LAYOUTS)
    parser.add_argument("--name", default="train", help="shard name prefix, and the split name timm reads")
    size = parser.add_mutually_exclusive_group()
    size.add_argument("--max-count", type=int, help="samples per shard (default 1000)")
    size.add_argument("--max-bytes", type=int, help="bytes per shard")
    parser.add_argument("--workers", type=int, default=max(1, (os.cpu_count() or 2) // 2))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--split-list", help="voc/pcontext: id list (path relative to --src or a URL); "
                        "ade20k: the split folder (training, validation); partimagenet: the split")
    args = parser.parse_args(argv)
    signal.signal(signal.SIGTERM, _interrupt)  # a SIGTERM stops the pool as Ctrl-C does
    try:
        manifest = build_shards(
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
    except KeyboardInterrupt:
        print("make_shards: interrupted; finished shards are kept, rerun the same command to go on",
              file=sys.stderr)
        return 130
    print(
        f"{manifest.num_samples} samples in {manifest.num_shards} shards, {len(manifest.classes)} classes "
        f"-> {manifest.url}"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
