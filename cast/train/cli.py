"""What every ``jobs/*.py`` entry point does: parse, validate (before Ray), connect, run, exit code."""

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


def run_training_job(argv: Sequence[str] | None, objective: str) -> int:
    """``python -m jobs.pretrain|train|linear_probe --config X.yaml key=value ...``."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    try:
        cfg = load_job_config(argv, objective)
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
