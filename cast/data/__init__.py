"""Streaming data: WebDataset shards on any fsspec URL -> per-rank batches (see ``reader`` for the rules)."""

from cast.data.config import DataConfig
from cast.data.reader import build_loader
from cast.data.shards import Counters, Manifest, ShardSetError, list_shards, read_manifest
from cast.data.transforms import build_recipe

__all__ = [
    "Counters",
    "DataConfig",
    "Manifest",
    "ShardSetError",
    "build_loader",
    "build_recipe",
    "list_shards",
    "read_manifest",
]
