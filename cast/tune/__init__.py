"""Ray Tune sweeps over any dotted key of a job config (see ``sweep``)."""

from cast.tune.sweep import AshaConfig, SweepConfig, param_space, run_sweep, trial_config, write_best_config

__all__ = ["AshaConfig", "SweepConfig", "param_space", "run_sweep", "trial_config", "write_best_config"]
