"""The one shard layer: list a shard set, read its manifest, iterate the samples of its tars.

Every consumer goes through here: the training reader, evaluation, the segment job,
``data_tools.verify_shards`` and the benchmarks. Every URL is opened through fsspec (local,
``file://``, ``s3://``, ...), which webdataset's own openers do not cover.

A shard set is a folder/URL holding ``_info.json`` (or that file itself), a brace pattern of tar
URLs, or one ``.tar``. ``_info.json`` follows one schema, ``Manifest``: our fields plus timm's
``splits`` section, so timm's ``ReaderWds`` trains on our shards unchanged; a manifest that only has
timm's ``splits`` reads too. Anything missing or malformed raises ``ShardSetError``, naming the URL.

Reading a tar: our member iterator (``tarfile`` in stream mode) feeds webdataset's
``group_by_keys``, which groups members into samples by key (member name up to the first dot of
its basename). The member iterator is ours because it must see damage that ``tarfile`` and
webdataset's ``tar_file_iterator`` pass over in silence: a member shorter than its header says, and
a tar cut at a member boundary (no end-of-archive block). It raises at the damage point; the error
passes through ``group_by_keys``, which drops the sample in progress (its completeness is unknown);
``iter_raw_samples`` counts the damage in ``Counters`` and ends the shard, never raises.

Remote shards (any non-local fsspec URL) are fetched whole, one GET each, by a background thread
``prefetch`` shards ahead of the one being parsed (MosaicML ``predownload`` / webdataset#300): the
next download overlaps the current parse instead of paying per-read round trips. Memory per reader
is bounded by ``prefetch + 1`` shards. Local files are read in place.

Every fetch and manifest read goes through ``cast.storage.retry``: a transient error is retried up to
the policy's deadline. A shard that fails for good is skipped and counted by why: ``missing_shard``
(404/403: listed but not there), ``unreachable_shard`` (still failing at the deadline), distinct
from ``truncated_shard`` (the bytes came, the tar is damaged).
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import logging
import posixpath
import tarfile
import threading
from collections import Counter, deque
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field

import braceexpand
import fsspec
from webdataset.tariterators import group_by_keys

from cast.storage import (
    TRANSIENT,
    PermanentStorageError,
    RetryPolicy,
    StorageUnreachable,
    classify,
    read_bytes,
    retry,
    write_text,
)

log = logging.getLogger(__name__)

INFO_FILE = "_info.json"
VERIFIED_FILE = "_verified.json"  # real per-shard counts written by ``verify_shards --write-verified``
MISMATCH = "manifest_count_mismatch"
# streamed files are read 1 MiB at a time (per-call overhead of remote files dominates at 16 KiB) through
# a BufferedReader: tarfile's own stream buffer must stay small, it re-slices itself on every read
READ_BUFFER = 1 << 20
BRACE_EXAMPLE = "s3://bucket/train-{000000..000099}.tar"


class ShardSetError(ValueError):
    """A shard set that is missing or malformed; the message names its URL and what was expected."""


@dataclass(frozen=True)
class Shard:
    url: str  # absolute once read from a manifest; relative to the manifest's folder when written
    num_samples: int


@dataclass(frozen=True)
class Split:
    """timm's view of a shard set (``ReaderWds`` reads ``splits.<name>``), names relative to the folder."""

    name: str
    num_samples: int
    filenames: tuple[str, ...]
    shard_lengths: tuple[int, ...]


@dataclass
class Manifest:
    """What ``_info.json`` holds: one schema, a superset of timm's ``_info.json``.

    Serialised fields: ``name``, ``num_samples``, ``shards: [{url, num_samples}]``, ``classes``,
    ``layout``, ``source``, ``tool_version``, ``created`` and ``splits: {name: {name, num_samples,
    filenames, shard_lengths}}`` (derived from ``shards`` when written). ``url`` is where the
    manifest was read from or written to; it is not serialised.
    """

    name: str = ""
    shards: list[Shard] = field(default_factory=list)
    classes: list[str] = field(default_factory=list)
    layout: str = ""
    source: str = ""
    tool_version: str = ""
    created: str = ""
    splits: dict[str, Split] = field(default_factory=dict)
    url: str = ""
    verified_from: str = ""  # the _verified.json whose counts replaced the claimed ones (not serialised)

    @property
    def num_samples(self) -> int:
        return sum(shard.num_samples for shard in self.shards)

    @property
    def num_shards(self) -> int:
        return len(self.shards)

    def to_json(self) -> dict:
        """The JSON record; this set's own split (named ``name``) is written from ``shards``."""
        own = Split(
            self.name,
            self.num_samples,
            tuple(shard.url for shard in self.shards),
            tuple(shard.num_samples for shard in self.shards),
        )
        splits = {**self.splits, self.name: own} if self.shards else dict(self.splits)
        return {
            "name": self.name,
            "num_samples": self.num_samples,
            "shards": [{"url": shard.url, "num_samples": shard.num_samples} for shard in self.shards],
            "classes": list(self.classes),
            "layout": self.layout,
            "source": self.source,
            "tool_version": self.tool_version,
            "created": self.created,
            "splits": {
                key: {
                    "name": split.name,
                    "num_samples": split.num_samples,
                    "filenames": list(split.filenames),
                    "shard_lengths": list(split.shard_lengths),
                }
                for key, split in splits.items()
            },
        }

    @classmethod
    def from_json(cls, record: object, url: str) -> Manifest:
        """Parse and check a record read from ``url``; shard names are resolved against its folder.

        Takes ours (``shards``) or timm's (``splits`` only: a single split gives the shards; with
        several, ``shards`` stays empty and a brace pattern picks one).
        """
        if not isinstance(record, dict):
            raise ShardSetError(f"{url}: expected a JSON object, got {type(record).__name__}")
        splits = {
            str(key): _parse_split(value, f"{url}: splits.{key}")
            for key, value in _typed(record, "splits", dict, url, {}).items()
        }
        if "shards" in record:
            entries = _typed(record, "shards", list, url, [])
            shards = [_parse_shard(entry, url) for entry in entries]
        elif len(splits) == 1:
            (only,) = splits.values()
            shards = [Shard(name, length) for name, length in zip(only.filenames, only.shard_lengths)]
        elif splits:
            shards = []  # several timm splits: a brace pattern picks one
        else:
            raise ShardSetError(f"{url}: expected 'shards' (cast-train) or 'splits' (timm), found neither")
        folder = url.rsplit("/", 1)[0] if "/" in url else "."
        manifest = cls(
            name=str(record.get("name") or ""),
            shards=[Shard(_resolve(shard.url, folder), shard.num_samples) for shard in shards],
            classes=[str(name) for name in _typed(record, "classes", list, url, [])],
            layout=str(record.get("layout") or ""),
            source=str(record.get("source") or ""),
            tool_version=str(record.get("tool_version") or ""),
            created=str(record.get("created") or ""),
            splits=splits,
            url=url,
        )
        stated = record.get("num_samples")
        if "shards" in record and stated is not None and stated != manifest.num_samples:
            raise ShardSetError(
                f"{url}: 'num_samples' is {stated} but its shards hold {manifest.num_samples} samples"
            )
        return manifest


def _typed(record: dict, key: str, kind: type, url: str, default):
    value = record.get(key, default)
    if value is None:
        return default
    if not isinstance(value, kind):
        raise ShardSetError(f"{url}: {key!r} must be a {kind.__name__}, got {type(value).__name__}")
    return value


def _count(value: object, where: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ShardSetError(f"{where}: expected a sample count (integer >= 0), got {value!r}")
    return value


def _parse_shard(entry: object, url: str) -> Shard:
    name = (entry.get("url") or entry.get("name")) if isinstance(entry, dict) else None
    if not isinstance(name, str) or "num_samples" not in entry:
        raise ShardSetError(f"{url}: each shard entry needs 'url' (or 'name') and 'num_samples', got {entry}")
    return Shard(name, _count(entry["num_samples"], f"{url}: shard {name}"))


def _parse_split(value: object, where: str) -> Split:
    if not isinstance(value, dict) or not {"filenames", "shard_lengths"} <= set(value):
        raise ShardSetError(f"{where}: expected {{name, num_samples, filenames, shard_lengths}}, got {value}")
    filenames, lengths = value["filenames"], value["shard_lengths"]
    if not isinstance(filenames, list) or not isinstance(lengths, list) or len(filenames) != len(lengths):
        raise ShardSetError(f"{where}: 'filenames' and 'shard_lengths' must be lists of the same length")
    lengths = [_count(length, where) for length in lengths]
    stated = value.get("num_samples")
    num_samples = sum(lengths) if stated is None else _count(stated, where)
    names = tuple(str(name) for name in filenames)
    return Split(str(value.get("name") or ""), num_samples, names, tuple(lengths))


def _resolve(name: str, folder: str) -> str:
    return name if "://" in name or name.startswith("/") else f"{folder}/{name}"


def manifest_url(spec: str) -> str:
    """The ``_info.json`` URL of a shard folder (or the ``.json`` file itself)."""
    return spec if spec.endswith(".json") else spec.rstrip("/") + "/" + INFO_FILE


def _load_manifest(info_url: str, policy: RetryPolicy | None = None) -> Manifest | None:
    """The manifest at ``info_url``, ``None`` when there is no such file (or bucket): the only
    ``_info.json`` parser. Shard counts come from a ``_verified.json`` beside it when that one was
    written for these very bytes. Other storage failures raise ``StorageError``."""
    raw = _read_optional(info_url, policy)
    if raw is None:
        return None
    manifest = Manifest.from_json(_parse_json(raw, info_url), info_url)
    folder = info_url.rsplit("/", 1)[0] if "/" in info_url else "."
    verified_url = f"{folder}/{VERIFIED_FILE}"
    verified = _read_optional(verified_url, policy)
    if verified is None:
        return manifest
    record = _parse_json(verified, verified_url)
    if not isinstance(record, dict) or not isinstance(record.get("shards"), list):
        raise ShardSetError(f"{verified_url}: expected {{info_sha256, shards: [{{url, num_samples}}]}}")
    if record.get("info_sha256") != hashlib.sha256(raw).hexdigest():
        log.warning("%s: ignored, written for another %s (re-run `python -m data_tools.verify_shards "
                    "--write-verified`)", verified_url, INFO_FILE)
        return manifest
    counts = {_resolve(shard.url, folder): shard.num_samples
              for shard in (_parse_shard(entry, verified_url) for entry in record["shards"])}
    shards = [Shard(shard.url, counts.get(shard.url, shard.num_samples)) for shard in manifest.shards]
    differ = sum(new.num_samples != old.num_samples for new, old in zip(shards, manifest.shards))
    log.info("using verified counts from %s (%d of %d shards differ from %s: %d samples, it claims %d)",
             verified_url, differ, len(shards), INFO_FILE, sum(s.num_samples for s in shards),
             manifest.num_samples)
    splits = {key: _verified_split(split, counts, folder) for key, split in manifest.splits.items()}
    return dataclasses.replace(manifest, shards=shards, splits=splits, verified_from=verified_url)


def _verified_split(split: Split, counts: dict[str, int], folder: str) -> Split:
    lengths = tuple(counts.get(_resolve(name, folder), length)
                    for name, length in zip(split.filenames, split.shard_lengths))
    return dataclasses.replace(split, shard_lengths=lengths, num_samples=sum(lengths))


def _read_optional(url: str, policy: RetryPolicy | None) -> bytes | None:
    """The bytes at ``url``, ``None`` when there is no such file (or bucket)."""
    try:
        return read_bytes(url, policy)
    except PermanentStorageError as error:
        if isinstance(error.__cause__, FileNotFoundError):
            return None
        raise


def _parse_json(raw: bytes, url: str) -> object:
    try:
        return json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ShardSetError(f"{url}: not valid JSON ({error})") from error


def write_verified(info_url: str, counts: dict[str, int], policy: RetryPolicy | None = None) -> str:
    """Record ``counts`` (absolute shard URL -> samples really read) in ``_verified.json`` beside
    ``info_url``, tied to that ``_info.json``'s bytes; returns its URL."""
    raw = read_bytes(info_url, policy)
    folder = info_url.rsplit("/", 1)[0] if "/" in info_url else "."
    prefix = folder + "/"
    record = {
        "info_sha256": hashlib.sha256(raw).hexdigest(),
        "num_samples": sum(counts.values()),
        "shards": [{"url": url[len(prefix):] if url.startswith(prefix) else url, "num_samples": count}
                   for url, count in counts.items()],
    }
    return write_text(prefix + VERIFIED_FILE, json.dumps(record, indent=1) + "\n", policy)


def read_manifest(spec: str, policy: RetryPolicy | None = None) -> Manifest:
    """The manifest of a shard folder/URL (or of its ``_info.json``)."""
    info_url = manifest_url(spec)
    manifest = _load_manifest(info_url, policy)
    if manifest is None:
        raise ShardSetError(
            f"{spec}: no {INFO_FILE} at {info_url} (expected a shard folder holding {INFO_FILE}, the file "
            f"itself, or a brace pattern such as {BRACE_EXAMPLE}; build shards with "
            "`python -m data_tools.make_shards`)"
        )
    return manifest


def is_pattern(spec: str) -> bool:
    """A brace pattern of tar URLs or a single ``.tar`` (as opposed to a folder with a manifest)."""
    return spec.endswith(".tar") or "{" in spec


def is_shard_set(spec: str) -> bool:
    """Whether ``spec`` names shards: a ``.tar``, a brace pattern, ``_info.json`` or a folder holding it."""
    if is_pattern(spec) or spec.endswith(INFO_FILE):
        return True
    fs, path = fsspec.core.url_to_fs(spec)
    return fs.isdir(path) and fs.exists(posixpath.join(path, INFO_FILE))


def list_shards(spec: str, policy: RetryPolicy | None = None) -> Manifest:
    """The shards of a shard set with their sample counts.

    For a brace pattern or a single ``.tar`` the counts come from a sibling ``_info.json`` when
    there is one (ours or timm's), else from reading the tar headers; classes come from it too.
    """
    if not is_pattern(spec):
        manifest = read_manifest(spec, policy)
        if not manifest.shards:
            found = f"splits {sorted(manifest.splits)}" if manifest.splits else "no shards"
            raise ShardSetError(
                f"{manifest.url}: lists {found}; expected at least one shard (for one split of several, give "
                f"its shards as a brace pattern such as {BRACE_EXAMPLE})"
            )
        return manifest
    urls = list(braceexpand.braceexpand(spec))
    sibling = _load_manifest(manifest_url(posixpath.dirname(urls[0])), policy) or Manifest()
    known = {posixpath.basename(shard.url): shard.num_samples for shard in sibling.shards}
    for split in sibling.splits.values():
        known.update(zip((posixpath.basename(name) for name in split.filenames), split.shard_lengths))
    shards = [
        Shard(url, known[posixpath.basename(url)] if posixpath.basename(url) in known else count_samples(url))
        for url in urls
    ]
    return dataclasses.replace(sibling, shards=shards, splits={})


class Counters(Counter):
    """Skip/corruption counts by reason (``corrupt_image``, ``missing_key``, ``truncated_shard``,
    ``missing_shard``, ``unreachable_shard``, ``manifest_count_mismatch``, ...) plus
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


def _tar_members(handle, url: str, size: int | None) -> Iterator[dict]:
    """``{fname, data, __url__}`` of every file member, in tar order; ``tarfile.ReadError`` at damage.

    The only place a tar is opened for reading. ``size`` (the object's length, when known) lets us
    see a cut at a member boundary, which ``tarfile`` ends on quietly.
    """
    with tarfile.open(fileobj=handle, mode="r|") as tar:
        for member in tar:
            if member.isfile():
                data = tar.extractfile(member).read()
                if len(data) != member.size:
                    raise tarfile.ReadError(f"member {member.name} short by {member.size - len(data)} bytes")
                yield {"fname": member.name, "data": data, "__url__": url}
            tar.members = []  # stream mode keeps every header it has read otherwise
        # a complete archive has its end-of-archive block after the last member
        if size is not None and size - tar.offset < tarfile.BLOCKSIZE:
            raise tarfile.ReadError(f"no end-of-archive block after byte {tar.offset} of {size}")


def _duplicate_member(error: Exception) -> bool:
    """``group_by_keys`` handler: two members with the same key and extension make a damaged tar."""
    raise tarfile.ReadError(str(error.args[0]) if error.args else repr(error)) from error


def iter_tar_samples(
    url: str, fetched: Future | None = None, policy: RetryPolicy | None = None
) -> Iterator[dict]:
    """Raw samples ``{"__key__", "__url__", ext: bytes}`` of one tar, in tar order; read from
    ``fetched`` (a future of the whole object's bytes) when given, else streamed from ``url`` (the
    open retried under ``policy``). Damage raises (``tarfile.TarError``, ``OSError``, ``EOFError``)
    after the samples before it; a failed fetch or open raises ``StorageError``."""
    whole = fetched.result() if fetched is not None else None
    if whole is not None:
        yield from group_by_keys(_tar_members(io.BytesIO(whole), url, len(whole)), handler=_duplicate_member)
        return
    with retry(fsspec.open(url, "rb").open, url, policy, what="open") as handle:
        members = _tar_members(io.BufferedReader(handle, READ_BUFFER), url, getattr(handle, "size", None))
        yield from group_by_keys(members, handler=_duplicate_member)


def count_samples(url: str) -> int:
    return sum(1 for _ in iter_tar_samples(url))


def iter_raw_samples(
    url: str,
    counters: Counters,
    report: bool = True,
    fetched: Future | None = None,
    policy: RetryPolicy | None = None,
    expected: int | None = None,
) -> Iterator[dict]:
    """``iter_tar_samples`` that never raises on damage or storage failure: the shard ends early and
    the reason is counted. ``truncated_shard``: a truncated or unreadable tar, or one without its
    end-of-archive block (samples read before the damage are kept, the one in progress dropped);
    ``missing_shard``: not found or forbidden; ``unreachable_shard``: transient errors past the
    deadline (fetching, or a streamed read cut off mid-shard).

    With ``expected`` (the manifest's count) the samples are counted: a shard that ends cleanly with
    another count, or that has more than ``expected`` (seen when the consumer stops at or past the
    claim: the rest is then counted, raw), records ``manifest_count_mismatch`` with both counts."""
    count = 0
    samples = iter_tar_samples(url, fetched, policy)
    try:
        for sample in samples:
            count += 1
            yield sample
    except GeneratorExit:  # the consumer stopped: a shard read to its claim is checked for more
        if expected is not None and count >= expected:
            rest, whole = _count_rest(samples)
            if rest:
                _count_mismatch(url, expected, f"{count + rest}{'' if whole else '+'}", counters, report)
        raise
    except Exception as error:  # noqa: BLE001 - sorted by _shard_failure, anything else re-raised
        reason = _shard_failure(error)
        if reason is None:
            raise
        counters.record(reason, f"{url}: {reason} ({type(error).__name__}: {error}); shard skipped from here"
                        if report else None)
        return
    finally:
        samples.close()
    if expected is not None and count != expected:
        _count_mismatch(url, expected, count, counters, report)


def _count_rest(samples: Iterator[dict]) -> tuple[int, bool]:
    """How many samples are left in ``samples``, and whether they ended cleanly (a damaged rest is
    counted by the reader that reads it, not here)."""
    rest = 0
    try:
        for _ in samples:
            rest += 1
    except Exception:  # noqa: BLE001 - see above
        return rest, False
    return rest, True


def _count_mismatch(url: str, expected: int, found: int | str, counters: Counters, report: bool) -> None:
    counters.record(MISMATCH, f"{url}: {MISMATCH}: the shard holds {found} samples, its manifest says "
                    f"{expected} (check with `python -m data_tools.verify_shards`, then record the real "
                    "counts with --write-verified)" if report else None)


def _shard_failure(error: Exception) -> str | None:
    """The skip reason of an error that ended a shard, None when it is no data or storage error."""
    if isinstance(error, PermanentStorageError):
        return "missing_shard"
    if isinstance(error, StorageUnreachable):
        return "unreachable_shard"
    if isinstance(error, (tarfile.TarError, EOFError)):
        return "truncated_shard"
    kind = classify(error)  # a streamed read cut off mid-shard (botocore's errors are no OSError)
    if kind == TRANSIENT:
        return "unreachable_shard"
    return "truncated_shard" if isinstance(error, OSError) else None


def is_local(url: str) -> bool:
    return "://" not in url or url.startswith("file://")


def fetch_shard(url: str, policy: RetryPolicy | None = None, stop: threading.Event | None = None) -> bytes:
    """The whole object in one request (s3fs: a single GET, not block-sized range reads), retried
    under ``policy`` until it arrives, fails for good, or ``stop`` is set."""
    fs, path = fsspec.core.url_to_fs(url)
    return retry(lambda: fs.cat_file(path), url, policy, what="fetch", stop=stop)


def iter_shards(
    urls: Sequence[str],
    counters: Counters,
    report: bool = True,
    *,
    prefetch: int,
    policy: RetryPolicy | None = None,
    expected: Sequence[int] | None = None,
) -> Iterator[dict]:
    """Raw samples of ``urls`` in order; remote shards are fetched ``prefetch`` ahead (0 = streamed).
    ``expected``: the manifest's count of each shard, checked as it is read (``iter_raw_samples``)."""
    claims = dict(zip(urls, expected, strict=True)) if expected is not None else {}
    remote = prefetch > 0 and not all(is_local(url) for url in urls)
    pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="cast-shard-prefetch") if remote else None
    stop = threading.Event()
    pending: deque[tuple[str, Future | None]] = deque()
    upcoming = iter(urls)

    def refill() -> None:
        while len(pending) < max(1, prefetch):
            url = next(upcoming, None)
            if url is None:
                return
            fetched = None if pool is None or is_local(url) else pool.submit(fetch_shard, url, policy, stop)
            pending.append((url, fetched))

    try:
        refill()
        while pending:
            url, fetched = pending.popleft()
            refill()  # the next download starts before this shard is parsed
            yield from iter_raw_samples(url, counters, report, fetched, policy, claims.get(url))
    finally:  # consumer stopped early: drop queued downloads, end a retrying one, do not wait for it
        stop.set()
        if pool is not None:
            pool.shutdown(wait=False, cancel_futures=True)
