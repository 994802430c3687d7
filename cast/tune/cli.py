"""What ``jobs/sweep.py`` does: parse, validate (before Ray), connect, sweep, exit code."""

from __future__ import annotations

import logging
import sys
from collections.abc import Sequence

from cast.config import ConfigError, load_config, parse_job_args
from cast.train.cli import SKIP_PREFLIGHT
from cast.tune.sweep import SweepConfig, run_sweep


def load_sweep_config(argv: Sequence[str] | None) -> SweepConfig:
    path, overrides = parse_job_args(argv)
    sweep = load_config(SweepConfig, path, overrides)
    sweep.validate()
    return sweep


def preflight_sweep(sweep: SweepConfig) -> list[str]:
    """The training preflight (``cast.train.preflight``) of the base config and of every listed value or
    range end: a value no trial could train with (a batch larger than the data, an unknown model option)
    fails here, named, not in the trial that samples it. Lines for the base; a count for the rest."""
    from cast.train.preflight import run_preflight

    lines, values = [], 0
    for label, cfg in sweep.edge_configs():
        try:
            checked = run_preflight(cfg)
        except ConfigError as e:
            raise ConfigError(f"{label}: {e}") from e
        if label == "base":
            lines = checked
        else:
            values += 1
    return [*lines, f"search: {values} listed values and range ends pass too"]


def run_sweep_job(argv: Sequence[str] | None) -> int:
    """``python -m jobs.sweep --config S.yaml [--no-preflight] key=value ...``: exit 2 on a config error
    (validation, then the preflight unless ``--no-preflight``), before any Ray process starts."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    argv = list(sys.argv[1:] if argv is None else argv)
    preflight = SKIP_PREFLIGHT not in argv
    try:
        sweep = load_sweep_config([arg for arg in argv if arg != SKIP_PREFLIGHT])
        for line in preflight_sweep(sweep) if preflight else []:
            print(f"preflight ok: {line}", flush=True)
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2
    import ray

    ray.init()
    results, best = run_sweep(sweep)
    failed = [r for r in results if r.error is not None]
    print(f"sweep {sweep.name}: {len(results)} trials, {len(failed)} failed; best config: {best}")
    return 1 if len(failed) == len(results) else 0
