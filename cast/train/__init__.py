"""Training on Ray: job configs, objectives, schedules, the per-worker loop, checkpoints, the driver.

from cast.config import load_config
from cast.train import TrainConfig, fit
cfg = load_config(TrainConfig, "jobs/configs/moco_cast_tiny.yaml", ["data.shards=/data/shards"])
result = fit(cfg)          # inside ray.init(): one TorchTrainer; checkpoints under ray.storage_path/ray.name
"""

from cast.train.config import TrainConfig
from cast.train.driver import build_trainer, fit, resolve

__all__ = ["TrainConfig", "build_trainer", "fit", "resolve"]
