"""Config as data: nested dataclasses loaded from YAML, overridden by ``key.sub=value`` arguments.

Strict on purpose: an unknown key or a value of the wrong type raises ``ConfigError`` naming the
dotted key and the expected type, so a typo stops a job before any cluster resource is claimed.

    cfg = load_config(TrainConfig, "jobs/configs/moco_cast_tiny.yaml", ["optim.base_lr=3e-4"])
    text = dump_config(cfg)                      # YAML that load_config reads back to an equal config
"""

from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from typing import Any

import fsspec
import yaml


class ConfigError(ValueError):
    """A config file or override that does not fit the config dataclasses."""


def load_config(cls: type, yaml_path: str | None = None, overrides: typing.Iterable[str] = ()) -> Any:
    """Build ``cls`` from a YAML file (any fsspec path; None = defaults) plus dotted overrides."""
    raw: dict = {}
    if yaml_path:
        try:
            with fsspec.open(yaml_path, "r") as f:
                raw = yaml.safe_load(f) or {}
        except FileNotFoundError as e:
            raise ConfigError(f"config file not found: {yaml_path}") from e
        except yaml.YAMLError as e:
            raise ConfigError(f"{yaml_path}: not valid YAML: {e}") from e
        if not isinstance(raw, dict):
            raise ConfigError(f"{yaml_path}: top level must be a mapping, got {type(raw).__name__}")
    apply_overrides(raw, overrides)
    return from_dict(cls, raw)


def apply_overrides(raw: dict, overrides: typing.Iterable[str]) -> dict:
    """Set ``a.b.c=value`` items into the nested dict ``raw``; values are parsed as YAML scalars/lists."""
    for item in overrides:
        key, sep, text = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"override {item!r}: expected key.sub=value")
        try:
            value = yaml.safe_load(text) if text.strip() else ""
        except yaml.YAMLError as e:
            raise ConfigError(f"override {key}: value {text!r} is not valid YAML: {e}") from e
        set_dotted(raw, key.strip(), value)
    return raw


def set_dotted(raw: dict, key: str, value: Any) -> None:
    """Set ``raw[a][b][c] = value`` for ``key = "a.b.c"``, creating mappings on the way."""
    node = raw
    parts = key.split(".")
    for depth, part in enumerate(parts[:-1]):
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        if not isinstance(child, dict):
            raise ConfigError(f"override {key}: {'.'.join(parts[: depth + 1])} is not a section")
        node = child
    node[parts[-1]] = value


def from_dict(cls: type, raw: dict, prefix: str = "") -> Any:
    """Build dataclass ``cls`` from a plain mapping, checking every key and type."""
    if not isinstance(raw, dict):
        raise ConfigError(f"{prefix or '<root>'}: expected a mapping for {cls.__name__}, got {raw!r}")
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(raw) - known)
    if unknown:
        raise ConfigError(
            f"unknown key {_join(prefix, unknown[0])!r} in {cls.__name__}; "
            f"valid keys: {', '.join(sorted(known))}"
        )
    kwargs = {name: _coerce(value, hints[name], _join(prefix, name)) for name, value in raw.items()}
    try:
        return cls(**kwargs)
    except (ValueError, TypeError) as e:
        if isinstance(e, ConfigError):
            raise
        raise ConfigError(f"{prefix or cls.__name__}: {e}") from e


def to_dict(cfg: Any) -> dict:
    """A plain dict (lists, not tuples) of a config dataclass, for YAML and Tune."""
    return _plain(dataclasses.asdict(cfg))


def dump_config(cfg: Any) -> str:
    """YAML text of a config; ``load_config(type(cfg), <that file>)`` gives back an equal config."""
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)


def parse_job_args(argv: typing.Sequence[str] | None = None, description: str = "") -> tuple[str, list[str]]:
    """``--config X.yaml key=value ...`` -> (config path, overrides)."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--config", required=True, help="YAML config file (local path or URL)")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. optim.base_lr=3e-4")
    args = parser.parse_args(argv)
    return args.config, list(args.overrides)


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def _plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check ``value`` against annotation ``tp`` (ints widen to float; lists to tuples)."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        for option in (a for a in args if a is not type(None)):
            try:
                return _coerce(value, option, key)
            except ConfigError:
                continue
        raise ConfigError(f"{key}: expected {_type_name(tp)}, got {value!r}")
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, value if value is not None else {}, key)
    if tp is Any:
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected bool, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected int, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads "3e-4" (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{key}: expected float, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{key}: expected str, got {value!r}")
    if tp is dict or origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        if args:
            return {k: _coerce(v, args[1], f"{key}.{k}") for k, v in value.items()}
        return dict(value)
    if tp in (list, tuple) or origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        item_tp = args[0] if args else Any
        items = [_coerce(v, item_tp, f"{key}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if (tp is tuple or origin is tuple) else items
    raise ConfigError(f"{key}: unsupported config type {_type_name(tp)}")
