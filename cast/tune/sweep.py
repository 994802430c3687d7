"""Hyperparameter sweeps: a Ray Tune ``Tuner`` over a driver that builds one ``TorchTrainer`` per trial.

The sweep YAML names a base job config, the search space over any dotted key of it, and ASHA's
settings. Everything (keys, types, value ranges) is checked before Ray starts. The best trial's
config is written as the base config plus the swept values only: the sweep's ``overrides`` (short
runs, fewer workers, the kNN sets) shape the trials and are left out, so the file is a full run of the
base recipe (``jobs/pretrain.py --config <it> data.shards=...``). Pretraining sweeps rank trials by
``knn_top1`` (``knn.*``: kNN top-1 of the trial's encoder on held-out shards, on the workers), which
compares trials whatever their temperature; the contrastive loss, scaled by 2 x tau, does not.

    base: jobs/configs/moco_cast_tiny.yaml
    search:
      optim.base_lr: {loguniform: [1.0e-4, 1.0e-2]}
      moco.temperature: {choice: [0.1, 0.2]}
      schedule.warmup_epochs: {grid: [0, 1]}
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from dataclasses import dataclass, field

import yaml

from cast.config import ConfigError, dump_config, from_dict, load_config, set_dotted
from cast.storage import absolute, join, write_text
from cast.train.config import TrainConfig

SAMPLERS = ("loguniform", "uniform", "choice", "grid")


@dataclass
class AshaConfig:
    max_t: int = 20  # reports per trial at most (time_attr = training_iteration)
    grace_period: int = 2
    reduction_factor: int = 2


@dataclass
class SweepConfig:
    base: str = ""  # the job config every trial starts from
    overrides: list[str] = field(default_factory=list)  # every trial's, left out of the best config
    search: dict = field(default_factory=dict)  # dotted key -> {sampler: args}
    num_samples: int = 4  # samples per grid point
    metric: str = "loss"
    mode: str = "min"
    max_concurrent_trials: int = 0  # 0 = as many as the cluster fits
    asha: AshaConfig = field(default_factory=AshaConfig)
    trial_driver_cpus: float = 0.05  # the trial's own driver process (> 0; its workers ask for theirs)
    storage_path: str = "outputs/sweeps"
    name: str = "sweep"
    best_config: str = ""  # where to write the best trial's config ("" = <sweep folder>/best_config.yaml)

    def validate(self) -> None:
        if not self.base:
            raise ConfigError("base: expected the path of a job config")
        if not self.search:
            raise ConfigError("search: expected at least one dotted key with a sampler")
        if self.mode not in ("min", "max"):
            raise ConfigError(f"mode: expected 'min' or 'max', got {self.mode!r}")
        if not self.trial_driver_cpus > 0:
            raise ConfigError(
                f"trial_driver_cpus: expected > 0 (Ray needs a resource), got {self.trial_driver_cpus}"
            )
        if self.num_samples < 1:
            raise ConfigError(f"num_samples: expected >= 1, got {self.num_samples}")
        list(self.edge_configs())

    def edge_configs(self) -> Iterator[tuple[str, TrainConfig]]:
        """The base config, then one trial config per listed value or range end (each validated, stored
        where trials store), labelled ``base`` or ``search.<key>=<value>``."""
        base = base_config(self)
        base.ray.storage_path = self.trials_folder()
        yield "base", base
        for key, spec in self.search.items():
            sampler, args = _sampler(key, spec)
            for value in args:
                yield f"search.{key}={value}", trial_config(base, {key: value})

    def resolved_storage_path(self) -> str:
        """Ray needs an absolute local path or a URL."""
        return absolute(self.storage_path)

    def trials_folder(self) -> str:
        """Where each trial's own run folder (checkpoints, config) goes."""
        return join(self.resolved_storage_path(), self.name, "trials")


def base_config(sweep: SweepConfig) -> TrainConfig:
    cfg = load_config(TrainConfig, sweep.base, sweep.overrides)
    cfg.validate()
    return cfg


def param_space(sweep: SweepConfig) -> dict:
    """Tune's search space: one flat entry per dotted key."""
    from ray import tune

    space = {}
    for key, spec in sweep.search.items():
        sampler, args = _sampler(key, spec)
        if sampler == "loguniform":
            space[key] = tune.loguniform(*args)
        elif sampler == "uniform":
            space[key] = tune.uniform(*args)
        elif sampler == "choice":
            space[key] = tune.choice(list(args))
        else:
            space[key] = tune.grid_search(list(args))
    return space


def trial_config(base: TrainConfig, params: dict) -> TrainConfig:
    """``base`` with one trial's sampled values set at their dotted keys (validated)."""
    raw = yaml.safe_load(dump_config(base))
    for key, value in params.items():
        set_dotted(raw, key, value)
    cfg = from_dict(TrainConfig, raw)
    cfg.validate()
    return cfg


def run_sweep(sweep: SweepConfig):
    """Run the sweep; returns (ResultGrid, path of the best config YAML)."""
    from ray import tune
    from ray.tune.integration.ray_train import TuneReportCallback
    from ray.tune.schedulers import ASHAScheduler

    from cast.train.driver import build_trainer

    sweep.validate()
    base = base_config(sweep)
    folder = join(sweep.resolved_storage_path(), sweep.name)

    def trial_driver(params: dict) -> None:
        cfg = trial_config(base, params)
        cfg.ray.storage_path = sweep.trials_folder()
        cfg.ray.name = tune.get_context().get_trial_name()
        build_trainer(cfg, callbacks=[TuneReportCallback()]).fit()

    trainable = tune.with_resources(trial_driver, {"CPU": sweep.trial_driver_cpus})
    if tune.Tuner.can_restore(folder):  # a sweep whose driver died: finished trials stay, the rest go on
        print(f"[cast-sweep] restoring {folder}", flush=True)
        tuner = tune.Tuner.restore(folder, trainable, param_space=param_space(sweep),
                                   resume_unfinished=True, resume_errored=True)
    else:
        tuner = tune.Tuner(
            trainable,
            param_space=param_space(sweep),
            tune_config=tune.TuneConfig(
                metric=sweep.metric,
                mode=sweep.mode,
                num_samples=sweep.num_samples,
                max_concurrent_trials=sweep.max_concurrent_trials or None,
                scheduler=ASHAScheduler(
                    time_attr="training_iteration",
                    max_t=sweep.asha.max_t,
                    grace_period=sweep.asha.grace_period,
                    reduction_factor=sweep.asha.reduction_factor,
                ),
            ),
            run_config=tune.RunConfig(storage_path=sweep.resolved_storage_path(), name=sweep.name),
        )
    results = tuner.fit()
    best = results.get_best_result(metric=sweep.metric, mode=sweep.mode, scope="last")
    params = {k: v for k, v in best.config.items() if k in sweep.search}
    return results, write_best_config(sweep, base, params, folder)


def write_best_config(sweep: SweepConfig, base: TrainConfig, params: dict, folder: str) -> str:
    """The base config plus the best trial's swept values (validated as a trial with the sweep's
    overrides), with a fresh run name, as a YAML for jobs/pretrain.py."""
    trial_config(copy.deepcopy(base), params)
    raw = yaml.safe_load(dump_config(load_config(TrainConfig, sweep.base)))
    for key, value in params.items():
        set_dotted(raw, key, value)
    cfg = from_dict(TrainConfig, raw)
    cfg.ray.name = ""
    url = sweep.best_config or join(folder, "best_config.yaml")
    header = "".join(
        f"# sweep {sweep.name} best ({sweep.metric}, {sweep.mode}): {k} = {v}\n" for k, v in params.items()
    )
    return write_text(url, header + dump_config(cfg))


def _sampler(key: str, spec) -> tuple[str, list]:
    if not isinstance(spec, dict) or len(spec) != 1:
        raise ConfigError(
            f"search.{key}: expected one sampler mapping like {{loguniform: [low, high]}}, got {spec!r}"
        )
    sampler, args = next(iter(spec.items()))
    if sampler not in SAMPLERS:
        raise ConfigError(f"search.{key}: unknown sampler {sampler!r}; expected one of {SAMPLERS}")
    if not isinstance(args, list) or not args:
        raise ConfigError(f"search.{key}.{sampler}: expected a non-empty list, got {args!r}")
    if sampler in ("loguniform", "uniform"):
        if len(args) != 2 or not all(isinstance(a, (int, float)) for a in args) or not args[0] < args[1]:
            raise ConfigError(
                f"search.{key}.{sampler}: expected [low, high] numbers with low < high, got {args!r}"
            )
        if sampler == "loguniform" and args[0] <= 0:
            raise ConfigError(f"search.{key}.loguniform: low must be > 0, got {args[0]!r}")
    return sampler, args
