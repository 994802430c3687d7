"""Where files live: local paths and fsspec URLs (``s3://``, ``gs://``, ``file://``, ``memory://``) alike.

The few operations every layer needs, in one place so that every part of the system treats a URL the
same way: absolute locations (Ray wants an absolute path or a URL), joining, text files written so
that a reader never sees half of one, and the one **storage policy** (``retry``) every remote read and
write goes through (shard fetches, manifests, checkpoint uploads, TensorBoard sync, result files).

The policy sorts an error into one of two kinds (``classify``). *Transient* (the store may come back:
connection errors and timeouts of botocore, aiohttp, s3fs and pyarrow, HTTP 5xx, throttling) is
retried with exponential backoff and full jitter until ``RetryPolicy.deadline_s`` has passed, then
raises ``StorageUnreachable``. *Permanent* (404, 403, no such bucket, bad credentials) is not retried:
``PermanentStorageError`` at once. Both name the URL and, when the caller knows it, the config key
the URL came from. Botocore's connection errors are not ``OSError`` (and 404/403 are, through s3fs),
so the sort looks at types, error codes and status codes, not at ``OSError`` alone.
"""

from __future__ import annotations

import errno
import logging
import os
import posixpath
import random
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

import fsspec
import pyarrow.fs

log = logging.getLogger(__name__)
T = TypeVar("T")

TRANSIENT, PERMANENT = "transient", "permanent"
# S3 error codes that mean "try again later" (the rest of the 4xx codes are permanent)
_TRANSIENT_CODES = {
    "SlowDown", "Throttling", "ThrottlingException", "RequestTimeout", "RequestTimeTooSkewed",
    "InternalError", "ServiceUnavailable", "RequestLimitExceeded", "TooManyRequests", "503", "500",
}
# pyarrow's S3 filesystem (Ray's checkpoint upload) raises bare OSErrors: sorted by their message
_PERMANENT_TEXT = ("NoSuchBucket", "NO_SUCH_BUCKET", "NoSuchKey", "ACCESS_DENIED", "AccessDenied",
                   "Forbidden", "InvalidAccessKeyId", "SignatureDoesNotMatch", "does not exist")
_PERMANENT_ERRNOS = {errno.ENOENT, errno.EACCES, errno.EPERM, errno.EINVAL, errno.ENOTDIR, errno.EISDIR}


@dataclass
class RetryPolicy:
    """How long transient storage errors are retried (config: ``data.retry``, ``checkpoint.retry``)."""

    deadline_s: float = 300.0  # give up (StorageUnreachable) once a call has failed for this long
    first_delay_s: float = 0.5  # first backoff; doubled per attempt, with full jitter
    max_delay_s: float = 10.0  # backoff ceiling

    def validate(self, key: str) -> None:
        for name in ("deadline_s", "first_delay_s", "max_delay_s"):
            if getattr(self, name) < 0:
                raise ValueError(f"{key}.{name}: must be >= 0, got {getattr(self, name)}")


class StorageError(Exception):
    """A remote read or write that failed for good; the message names the URL (and config key)."""

    def __init__(self, message: str, url: str):
        super().__init__(message)
        self.url = url


class PermanentStorageError(StorageError):
    """Not found, forbidden, no such bucket: retrying would not help."""


class StorageUnreachable(StorageError):
    """Transient errors for longer than the policy's deadline (or the caller stopped waiting)."""


def classify(error: BaseException) -> str | None:
    """``TRANSIENT``, ``PERMANENT``, or None when ``error`` is not a storage error (then it is re-raised).

    The cause chain is followed: s3fs and Ray wrap the botocore/pyarrow error they met.
    """
    seen = 0
    while error is not None and seen < 8:
        kind = _classify_one(error)
        if kind is not None:
            return kind
        error = error.__cause__ or error.__context__
        seen += 1
    return None


def _classify_one(error: BaseException) -> str | None:
    if isinstance(error, (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError)):
        return PERMANENT
    response = getattr(error, "response", None)  # botocore ClientError
    if isinstance(response, dict) and "Error" in response:
        code = str(response["Error"].get("Code", ""))
        status = int(response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0)
        return TRANSIENT if status >= 500 or status == 429 or code in _TRANSIENT_CODES else PERMANENT
    if isinstance(error, (TimeoutError, ConnectionError)):  # builtin ones, asyncio's and fsspec's timeouts
        return TRANSIENT
    module = type(error).__module__ or ""
    if module.startswith("botocore"):
        from botocore import exceptions as boto
        from botocore.parsers import ResponseParserError  # throttling replies with broken XML (s3fs#484)

        if isinstance(error, (boto.ConnectionError, boto.HTTPClientError, ResponseParserError)):
            return TRANSIENT
        if isinstance(error, (boto.NoCredentialsError, boto.PartialCredentialsError)):
            return PERMANENT
        return None
    if module.startswith("aiohttp"):
        import aiohttp

        return TRANSIENT if isinstance(error, aiohttp.ClientError) else None
    if isinstance(error, OSError):
        text = str(error)
        if any(marker in text for marker in _PERMANENT_TEXT) or error.errno in _PERMANENT_ERRNOS:
            return PERMANENT
        return TRANSIENT  # pyarrow network errors, EIO/EREMOTEIO (s3fs's InternalError), resets
    return None


def retry(
    operation: Callable[[], T],
    url: str,
    policy: RetryPolicy | None = None,
    *,
    key: str = "",
    what: str = "access",
    stop: threading.Event | None = None,
    sleep: Callable[[float], object] | None = None,
    clock: Callable[[], float] = time.monotonic,
) -> T:
    """``operation()``, with transient storage errors retried under ``policy`` (see the module docstring).

    ``stop`` (set by the caller) ends the wait early with ``StorageUnreachable``: a prefetch thread
    must not outlive the reader that asked for it by a whole deadline.
    """
    policy = policy or RetryPolicy()
    where = f"{url} ({key})" if key else url
    started, attempt = clock(), 0
    while True:
        try:
            return operation()
        except Exception as error:  # noqa: BLE001 - sorted below, anything else re-raised as it is
            kind = classify(error)
            if kind is None:
                raise
            cause = f"{type(error).__name__}: {error}"
            if kind == PERMANENT:
                raise PermanentStorageError(f"{where}: {what} failed, not retried ({cause})", url) from error
            elapsed = clock() - started
            attempt += 1
            if elapsed >= policy.deadline_s or (stop is not None and stop.is_set()):
                raise StorageUnreachable(
                    f"{where}: {what} still failing after {elapsed:.0f}s and {attempt} attempts "
                    f"(retry deadline {policy.deadline_s:g}s; {cause})",
                    url,
                ) from error
            delay = random.uniform(0, min(policy.max_delay_s, policy.first_delay_s * 2 ** (attempt - 1)))
            delay = max(0.0, min(delay, policy.deadline_s - elapsed))
            log.warning("%s: %s failed (attempt %d, %s); retrying in %.1fs", where, what, attempt, cause,
                        delay)
            if sleep is not None:
                sleep(delay)
            elif stop is not None:
                stop.wait(delay)
            else:
                time.sleep(delay)


def is_url(location: str) -> bool:
    return "://" in location


def absolute(location: str) -> str:
    """A URL unchanged; a local path made absolute (``~`` expanded)."""
    return location if is_url(location) else os.path.abspath(os.path.expanduser(location))


def join(location: str, *parts: str) -> str:
    """``location/part/...`` with exactly one slash between the pieces."""
    return "/".join([location.rstrip("/"), *(part.strip("/") for part in parts)])


def exists(location: str, policy: RetryPolicy | None = None) -> bool:
    fs, path = fsspec.core.url_to_fs(location)
    return retry(lambda: fs.exists(path), location, policy, what="lookup")


def write_text(location: str, text: str, policy: RetryPolicy | None = None) -> str:
    """Write ``text`` under a temporary name, then move it into place; returns ``location``.

    The parent folder is created; a crash mid-write leaves at most ``<location>.partial`` behind.
    """
    return write_bytes(location, text.encode(), policy)


def write_bytes(location: str, data: bytes, policy: RetryPolicy | None = None) -> str:
    """``write_text`` for bytes (feature shards, tensors): never half a file under ``location``."""
    fs, path = fsspec.core.url_to_fs(location)

    def write() -> None:
        parent = posixpath.dirname(path)
        # object stores have no folders; there makedirs would create a missing *bucket* (s3fs does)
        if parent and (not is_url(location) or location.startswith("file://")):
            fs.makedirs(parent, exist_ok=True)
        temporary = f"{path}.partial"
        with fs.open(temporary, "wb") as handle:
            handle.write(data)
        fs.mv(temporary, path)

    retry(write, location, policy, what="write")
    return location


def read_bytes(location: str, policy: RetryPolicy | None = None, *, key: str = "") -> bytes:
    """The whole object in one request (s3fs: a single GET); ``PermanentStorageError`` when absent."""
    fs, path = fsspec.core.url_to_fs(location)
    return retry(lambda: fs.cat_file(path), location, policy, key=key, what="read")


def read_text(location: str, policy: RetryPolicy | None = None) -> str | None:
    """The text at ``location``, or None when there is no file there."""
    try:
        return read_bytes(location, policy).decode()
    except PermanentStorageError as error:
        if isinstance(error.__cause__, FileNotFoundError):
            return None
        raise


# pyarrow's AWS default retry strategy waits 25 ms x 2^k before retry k (no cap)
_AWS_SCALE_S = 0.025


def ray_storage(storage_path: str, policy: RetryPolicy | None = None):
    """``(storage_path, storage_filesystem)`` for Ray's ``RunConfig``: on ``s3://``, Ray's own writes
    (the controller's ``checkpoint_manager_snapshot.json``, checkpoint uploads, deletions of old
    checkpoints) go through a pyarrow S3 filesystem that retries transient errors for at least the
    policy's deadline (pyarrow's AWS default strategy, doubling from 25 ms: up to 2x the deadline).
    Ray's default filesystem gives up after 3 attempts, a fraction of a second of outage, and a failed
    snapshot write of the controller ends the run. Other schemes and local paths are left to Ray."""
    if not storage_path.startswith("s3://"):
        return storage_path, None
    policy = policy or RetryPolicy()
    default, path = pyarrow.fs.FileSystem.from_uri(storage_path)
    attempts = 1
    while _AWS_SCALE_S * (2**attempts - 2) < policy.deadline_s:  # the sum of the waits (measured)
        attempts += 1
    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    return path, pyarrow.fs.PyFileSystem(_RetryingS3(default.region, endpoint, attempts))


class _RetryingS3(pyarrow.fs.FileSystemHandler):
    """pyarrow's ``S3FileSystem`` with a retry strategy that survives pickling (Ray ships the
    filesystem to its controller and workers; ``S3FileSystem`` drops ``retry_strategy`` there)."""

    def __init__(self, region: str, endpoint: str | None, attempts: int):
        self.state = (region, endpoint, attempts)
        self._fs = None

    def __getstate__(self):
        return self.state

    def __setstate__(self, state):
        self.state, self._fs = state, None

    @property
    def fs(self):
        if self._fs is None:
            region, endpoint, attempts = self.state
            self._fs = pyarrow.fs.S3FileSystem(
                region=region, endpoint_override=endpoint,
                retry_strategy=pyarrow.fs.AwsDefaultS3RetryStrategy(max_attempts=attempts),
            )
        return self._fs

    def get_type_name(self):
        return "cast-retrying-s3"

    def equals(self, other):
        return isinstance(other, _RetryingS3) and other.state == self.state

    def normalize_path(self, path):
        return self.fs.normalize_path(path)

    def get_file_info(self, paths):
        return self.fs.get_file_info(paths)

    def get_file_info_selector(self, selector):
        return self.fs.get_file_info(selector)

    def create_dir(self, path, recursive):
        self.fs.create_dir(path, recursive=recursive)

    def delete_dir(self, path):
        self.fs.delete_dir(path)

    def delete_dir_contents(self, path, missing_dir_ok=False):
        self.fs.delete_dir_contents(path, missing_dir_ok=missing_dir_ok)

    def delete_root_dir_contents(self):
        self.fs.delete_dir_contents("/", accept_root_dir=True)

    def delete_file(self, path):
        self.fs.delete_file(path)

    def move(self, src, dest):
        self.fs.move(src, dest)

    def copy_file(self, src, dest):
        self.fs.copy_file(src, dest)

    def open_input_stream(self, path):
        return self.fs.open_input_stream(path)

    def open_input_file(self, path):
        return self.fs.open_input_file(path)

    def open_output_stream(self, path, metadata):
        return self.fs.open_output_stream(path, metadata=metadata)

    def open_append_stream(self, path, metadata):
        return self.fs.open_append_stream(path, metadata=metadata)
