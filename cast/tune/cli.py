"""What ``jobs/sweep.py`` does: parse, validate (before Ray), connect, sweep, exit code."""

from __future__ import annotations

import logging
import sys
from collections.abc import Sequence

from cast.config import ConfigError, load_config, parse_job_args
from cast.tune.sweep import SweepConfig, run_sweep


def load_sweep_config(argv: Sequence[str] | None) -> SweepConfig:
    path, overrides = parse_job_args(argv)
    sweep = load_config(SweepConfig, path, overrides)
    sweep.validate()
    return sweep


def run_sweep_job(argv: Sequence[str] | None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    try:
        sweep = load_sweep_config(argv)
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2
    import ray

    ray.init()
    results, best = run_sweep(sweep)
    failed = [r for r in results if r.error is not None]
    print(f"sweep {sweep.name}: {len(results)} trials, {len(failed)} failed; best config: {best}")
    return 1 if len(failed) == len(results) else 0
