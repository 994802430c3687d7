"""Evaluation results: JSON next to the checkpoint (any fsspec URL) and a plain-text table.

A checkpoint ``runs/x/checkpoint_000009`` (file or directory) gets ``runs/x/checkpoint_000009.eval.json``;
the file is written under a temporary name and moved into place, so a crash never leaves half a report.
"""

from __future__ import annotations

import json
import math
import posixpath

import fsspec


def report_url(checkpoint: str, name: str = "eval") -> str:
    """``<checkpoint>.<name>.json``, beside the checkpoint file or directory."""
    return f"{checkpoint.rstrip('/')}.{name}.json"


def write_report(results: dict, url: str) -> str:
    """Write ``results`` as indented JSON to ``url`` (NaN becomes null); returns ``url``."""
    fs, path = fsspec.core.url_to_fs(url)
    parent = posixpath.dirname(path)
    if parent:
        fs.makedirs(parent, exist_ok=True)
    temporary = f"{path}.partial"
    with fs.open(temporary, "w") as handle:
        json.dump(_finite(results), handle, indent=2, sort_keys=False)
        handle.write("\n")
    fs.mv(temporary, path)
    return url


def read_report(url: str) -> dict | None:
    """A JSON result (e.g. a linear-probe result) or None when there is none at ``url``."""
    fs, path = fsspec.core.url_to_fs(url)
    if not fs.exists(path):
        return None
    with fs.open(path, "r") as handle:
        try:
            return json.load(handle)
        except json.JSONDecodeError as error:
            raise ValueError(f"{url}: not valid JSON ({error})") from error


def _finite(value):
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {str(k): _finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_finite(v) for v in value]
    return value


def _rows(results: dict, prefix: str = "") -> list[tuple[str, str]]:
    rows = []
    for key, value in results.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            rows.extend(_rows(value, f"{name}."))
        elif isinstance(value, float):
            rows.append((name, "-" if not math.isfinite(value) else f"{value:.4g}"))
        elif isinstance(value, list):
            rows.append((name, f"[{len(value)} values]"))
        else:
            rows.append((name, "-" if value is None else str(value)))
    return rows


def format_table(results: dict, title: str = "") -> str:
    """Two aligned columns, one row per scalar (nested keys joined by dots)."""
    rows = _rows(results)
    width = max((len(name) for name, _ in rows), default=6)
    lines = [title] if title else []
    lines.append(f"{'metric':<{width}}  value")
    lines.append(f"{'-' * width}  {'-' * 12}")
    lines.extend(f"{name:<{width}}  {value}" for name, value in rows)
    return "\n".join(lines)
