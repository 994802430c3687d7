"""Evaluation results as a plain-text table (the JSON files themselves are ``cast.artifacts`` reports)."""

from __future__ import annotations

import math


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
