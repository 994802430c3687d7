"""Where files live: local paths and fsspec URLs (``s3://``, ``gs://``, ``file://``, ``memory://``) alike.

The few operations every layer needs, in one place so that every part of the system treats a URL the
same way: absolute locations (Ray wants an absolute path or a URL), joining, and text files written so
that a reader never sees half of one.
"""

from __future__ import annotations

import os
import posixpath

import fsspec


def is_url(location: str) -> bool:
    return "://" in location


def absolute(location: str) -> str:
    """A URL unchanged; a local path made absolute (``~`` expanded)."""
    return location if is_url(location) else os.path.abspath(os.path.expanduser(location))


def join(location: str, *parts: str) -> str:
    """``location/part/...`` with exactly one slash between the pieces."""
    return "/".join([location.rstrip("/"), *(part.strip("/") for part in parts)])


def exists(location: str) -> bool:
    fs, path = fsspec.core.url_to_fs(location)
    return fs.exists(path)


def write_text(location: str, text: str) -> str:
    """Write ``text`` under a temporary name, then move it into place; returns ``location``.

    The parent folder is created; a crash mid-write leaves at most ``<location>.partial`` behind.
    """
    return write_bytes(location, text.encode())


def write_bytes(location: str, data: bytes) -> str:
    """``write_text`` for bytes (feature shards, tensors): never half a file under ``location``."""
    fs, path = fsspec.core.url_to_fs(location)
    parent = posixpath.dirname(path)
    if parent:
        fs.makedirs(parent, exist_ok=True)
    temporary = f"{path}.partial"
    with fs.open(temporary, "wb") as handle:
        handle.write(data)
    fs.mv(temporary, path)
    return location


def read_text(location: str) -> str | None:
    """The text at ``location``, or None when there is no file there."""
    fs, path = fsspec.core.url_to_fs(location)
    if not fs.exists(path):
        return None
    with fs.open(path, "r") as handle:
        return handle.read()
