"""Shard listing and streaming: every URL is opened through fsspec (local, file://, s3://, ...).

WebDataset has no ``s3://`` opener of its own, so shards are read here with ``tarfile`` in
stream mode over an fsspec file object. Samples are grouped by key (the member name up to the
first dot of its basename), exactly as WebDataset does; damaged input is reported to a
``Counters`` object and skipped, never raised.

Remote shards (any non-local fsspec URL) are fetched whole, one GET each, by a background thread
``prefetch`` shards ahead of the one being parsed (MosaicML ``predownload`` / webdataset#300): the
next download overlaps the current parse instead of paying per-read round trips. Memory per reader
is bounded by ``prefetch + 1`` shards. Local files are read in place, as before.
"""

from __future__ import annotations

import io
import json
import posixpath
import tarfile
from collections import Counter, deque
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import fsspec

INFO_FILE = "_info.json"
READ_BUFFER = 1 << 20  # tar stream reads of 1 MiB: per-call overhead of remote files dominates at 16 KiB
IMAGE_KEYS = ("jpg", "jpeg", "png", "webp", "bmp", "tif", "tiff", "gif")


@dataclass(frozen=True)
class Shard:
    url: str
    num_samples: int


@dataclass
class ShardList:
    shards: list[Shard]
    classes: list[str]
    info: dict

    @property
    def num_samples(self) -> int:
        return sum(shard.num_samples for shard in self.shards)


class Counters(Counter):
    """Skip/corruption counts by reason (``corrupt_image``, ``missing_key``, ``truncated_shard``) plus
    the messages naming the shard and sample, kept so DataLoader workers can hand them to the main
    process, which logs them (a worker's own log records never reach the training loop's handlers)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.messages: list[str] = []

    def record(self, reason: str, message: str | None = None) -> None:
        self[reason] += 1
        if message:
            self.messages.append(message)

    def clear(self) -> None:
        super().clear()
        self.messages = []


def _expand(pattern: str) -> list[str]:
    import braceexpand

    return list(braceexpand.braceexpand(pattern))


def read_info(url: str) -> tuple[dict, str]:
    """``_info.json`` of a shard folder (or the file itself); returns it and its URL."""
    info_url = url if url.endswith(".json") else url.rstrip("/") + "/" + INFO_FILE
    try:
        with fsspec.open(info_url, "rb") as handle:
            return json.loads(handle.read()), info_url
    except FileNotFoundError as error:
        raise FileNotFoundError(
            f"{info_url}: no shard info; build shards with `python -m data_tools.make_shards` "
            "or give a brace pattern such as s3://bucket/train-{000000..000099}.tar"
        ) from error


def list_shards(spec: str) -> ShardList:
    """Shards of a folder/URL with ``_info.json``, or of a brace pattern (counts from a sibling
    ``_info.json`` when there is one, else by reading the tar headers)."""
    if spec.endswith(".tar") or "{" in spec:
        urls = _expand(spec)
        folder = posixpath.dirname(urls[0])
        try:
            info, _ = read_info(folder)
            known = {
                posixpath.basename(entry.get("url") or entry["name"]): entry["num_samples"]
                for entry in info["shards"]
            }
        except FileNotFoundError:
            info, known = {}, {}
        shards = [
            Shard(
                url,
                known[posixpath.basename(url)] if posixpath.basename(url) in known else count_samples(url),
            )
            for url in urls
        ]
        return ShardList(shards, list(info.get("classes") or []), info)
    info, info_url = read_info(spec)
    base = posixpath.dirname(info_url) if "://" not in info_url else info_url.rsplit("/", 1)[0]
    for field in ("shards", "num_samples"):
        if field not in info:
            raise ValueError(f"{info_url}: field {field!r} missing")
    shards = []
    for entry in info["shards"]:
        name = entry.get("url") or entry.get("name")
        if name is None or "num_samples" not in entry:
            raise ValueError(
                f"{info_url}: each shard entry needs 'url' (or 'name') and 'num_samples', got {entry}"
            )
        url = name if "://" in name or name.startswith("/") else f"{base}/{name}"
        shards.append(Shard(url, int(entry["num_samples"])))
    return ShardList(shards, list(info.get("classes") or []), info)


def count_samples(url: str) -> int:
    keys = set()
    with (
        fsspec.open(url, "rb") as handle,
        tarfile.open(fileobj=handle, mode="r|", bufsize=READ_BUFFER) as tar,
    ):
        for member in tar:
            if member.isfile():
                keys.add(split_name(member.name)[0])
    return len(keys)


def split_name(name: str) -> tuple[str, str]:
    """``dir/abc.seg.png`` -> (``dir/abc``, ``seg.png``)."""
    folder, base = posixpath.split(name)
    stem, _, ext = base.partition(".")
    return (posixpath.join(folder, stem) if folder else stem), ext.lower()


def iter_raw_samples(
    url: str, counters: Counters, report: bool = True, fetched: Future | None = None
) -> Iterator[dict]:
    """Raw samples ``{"__key__", "__url__", ext: bytes}`` of one shard, in tar order; read from
    ``fetched`` (a future of the whole shard's bytes) when given, else streamed from ``url``.

    A truncated or unreadable tar ends the shard early (counted as ``truncated_shard``); samples
    read before the damage are kept, the one in progress is dropped. A failed fetch counts the same,
    and so does a tar without its end-of-archive block (cut at a member boundary).
    """
    current: dict | None = None
    try:
        whole = fetched.result() if fetched is not None else None
        with (
            io.BytesIO(whole) if whole is not None else fsspec.open(url, "rb") as handle,
            tarfile.open(fileobj=handle, mode="r|", bufsize=READ_BUFFER) as tar,
        ):
            for member in tar:
                if not member.isfile():
                    continue
                key, ext = split_name(member.name)
                data = tar.extractfile(member).read()
                if len(data) != member.size:
                    raise tarfile.ReadError(f"member {member.name} short by {member.size - len(data)} bytes")
                if current is not None and current["__key__"] != key:
                    yield current
                    current = None
                if current is None:
                    current = {"__key__": key, "__url__": url}
                current[ext] = data
            # tarfile ends quietly when the cut falls between or inside headers: a complete archive
            # has its end-of-archive block after the last member
            size = len(whole) if whole is not None else getattr(handle, "size", None)
            if size is not None and size - tar.offset < tarfile.BLOCKSIZE:
                raise tarfile.ReadError(f"no end-of-archive block after byte {tar.offset} of {size}")
    except (tarfile.TarError, EOFError, OSError) as error:
        message = f"{url}: damaged tar ({type(error).__name__}: {error}); rest of the shard skipped"
        counters.record("truncated_shard", message if report else None)
        return
    if current is not None:
        yield current


def is_local(url: str) -> bool:
    return "://" not in url or url.startswith("file://")


def fetch_shard(url: str) -> bytes:
    """The whole object in one request (s3fs: a single GET, not block-sized range reads)."""
    fs, path = fsspec.core.url_to_fs(url)
    return fs.cat_file(path)


def iter_shards(
    urls: Sequence[str], counters: Counters, report: bool = True, *, prefetch: int
) -> Iterator[dict]:
    """Raw samples of ``urls`` in order; remote shards are fetched ``prefetch`` ahead (0 = streamed)."""
    remote = prefetch > 0 and not all(is_local(url) for url in urls)
    pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="cast-shard-prefetch") if remote else None
    pending: deque[tuple[str, Future | None]] = deque()
    upcoming = iter(urls)

    def refill() -> None:
        while len(pending) < max(1, prefetch):
            url = next(upcoming, None)
            if url is None:
                return
            fetched = None if pool is None or is_local(url) else pool.submit(fetch_shard, url)
            pending.append((url, fetched))

    try:
        refill()
        while pending:
            url, fetched = pending.popleft()
            refill()  # the next download starts before this shard is parsed
            yield from iter_raw_samples(url, counters, report, fetched)
    finally:  # consumer stopped early: drop queued downloads, do not wait for the running one
        if pool is not None:
            pool.shutdown(wait=False, cancel_futures=True)


def image_key(sample: dict) -> str | None:
    return next((key for key in IMAGE_KEYS if key in sample), None)
