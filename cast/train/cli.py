"""What every ``jobs/*.py`` entry point does: parse, validate and preflight (before Ray), connect, run."""

from __future__ import annotations

import logging
import sys
from collections.abc import Sequence

from cast.config import ConfigError, load_config, parse_job_args
from cast.train.config import TrainConfig


def load_job_config(argv: Sequence[str] | None, objective: str) -> TrainConfig:
    """The validated config of a job; raises ConfigError (nothing of Ray has started yet)."""
    path, overrides = parse_job_args(argv)
    cfg = load_config(TrainConfig, path, overrides)
    if cfg.objective != objective:
        raise ConfigError(f"objective: this job runs {objective!r}, the config says {cfg.objective!r}")
    from cast.train.driver import resolve

    return resolve(cfg)


SKIP_PREFLIGHT = "--no-preflight"


def run_training_job(argv: Sequence[str] | None, objective: str) -> int:
    """``python -m jobs.pretrain|train|linear_probe --config X.yaml [--no-preflight] key=value ...``.

    Exit 2 on a config error, found by validation or by the preflight (``cast.train.preflight``: model,
    shards, batch size, classes, storage), before any Ray process starts; ``--no-preflight`` skips the
    latter (validation always runs).
    """
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    argv = list(sys.argv[1:] if argv is None else argv)
    preflight = SKIP_PREFLIGHT not in argv
    argv = [arg for arg in argv if arg != SKIP_PREFLIGHT]
    try:
        cfg = load_job_config(argv, objective)
        if preflight:
            from cast.train.preflight import run_preflight

            for line in run_preflight(cfg):
                print(f"preflight ok: {line}", flush=True)
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2
    import ray
    import ray.train

    from cast.train.driver import fit

    ray.init()  # joins RAY_ADDRESS / the cluster of `ray job submit`, else starts a local one
    try:
        result = fit(cfg)
    except ray.train.TrainingFailedError as e:
        print(f"run {cfg.ray.name} failed: {e}", file=sys.stderr)
        return 1
    print(f"run {cfg.ray.name} finished: {result.metrics}")
    print(f"run folder: {cfg.run_folder()}")
    if result.checkpoint is not None:
        print(f"last checkpoint: {result.checkpoint.path}")
    return 0
