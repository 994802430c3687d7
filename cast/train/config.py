"""Job configuration: one dataclass tree for pretraining, supervised training and the linear probe.

Every section is validated by ``TrainConfig.validate`` before Ray is touched; errors name the
dotted key. ``objective`` picks the recipe (``moco`` | ``supervised`` | ``linear``).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from cast.config import ConfigError
from cast.data.config import DataConfig
from cast.precision import PRECISIONS
from cast.storage import RetryPolicy, absolute, join

OBJECTIVES = ("moco", "supervised", "linear", "segmentation")
OPTIMIZERS = ("adamw", "sgd")
SCHEDULES = ("cosine", "poly")


@dataclass
class ModelConfig:
    name: str = "cast_tiny"  # a timm-registered model (cast_* registers on import)
    kwargs: dict = field(default_factory=dict)  # passed to timm.create_model (e.g. img_size, drop_path_rate)
    sync_bn: bool = False  # convert BatchNorm to SyncBatchNorm (the MoCo reference does)
    freeze_bn: bool = False  # keep every BatchNorm in eval mode (running stats, no batch stats)
    # torch.compile the CAST encoders in place (state_dict keys unchanged); pays off with a token
    # budget (data.max_superpixels), which makes every shape static: one graph, no recompiles
    compile: bool = False
    # autocast of the training step: auto = bf16 on CUDA GPUs with it, fp16 + GradScaler on those without
    # (V100, T4), fp32 on CPU; bf16 | fp16 | fp32 force one (stated in the metrics: precision_*)
    precision: str = "auto"


@dataclass
class OptimConfig:
    name: str = "adamw"  # adamw | sgd
    base_lr: float = 1.5e-4  # lr = base_lr * global batch / base_batch
    base_batch: int = 256
    weight_decay: float = 0.1
    exclude_bias_norm_from_wd: bool = False  # DeiT/timm: no wd on 1-D params and model.no_weight_decay()
    betas: tuple[float, float] = (0.9, 0.999)
    momentum: float = 0.9  # SGD only
    # images per optimizer step over all workers, fixed by the recipe whatever the world size
    # (0 = data.batch_size x ray.num_workers (the largest) x grad_accum_steps)
    global_batch: int = 0
    grad_accum_steps: int = 1  # micro-batches per step at the largest world size (see batch_split)
    clip_grad_norm: float = 0.0  # 0 = off


@dataclass
class ScheduleConfig:
    epochs: int = 100
    warmup_epochs: float = 10.0  # linear warmup, per iteration
    warmup_steps: int = 0  # > 0: warmup length in optimizer steps instead (SPML: 100 iterations)
    warmup_start_lr: float = 0.0  # DeiT: 1e-6
    min_lr: float = 0.0  # floor of the decay (DeiT: 1e-5)
    kind: str = "cosine"  # cosine (half-cosine) | poly ((1 - progress) ** poly_power, mmseg/SPML)
    poly_power: float = 0.9
    cooldown_epochs: int = 0  # trained after `epochs` at min_lr (DeiT/timm: 10, so 300 + 10 epochs)


@dataclass
class MocoConfig:
    dim: int = 256  # projector / predictor output
    mlp_dim: int = 4096  # projector / predictor hidden width
    temperature: float = 0.2
    momentum: float = 0.99  # base momentum of the key encoder
    momentum_cosine: bool = True  # m -> 1 on a half-cosine over training (--moco-m-cos)


@dataclass
class SupervisedConfig:
    num_classes: int = 1000
    label_smoothing: float = 0.1
    mixup_alpha: float = 0.8  # 0 and cutmix_alpha 0 = no mixing
    cutmix_alpha: float = 1.0
    mix_prob: float = 1.0
    switch_prob: float = 0.5
    ema_decay: float = 0.0  # model EMA (DeiT: 0.99996); 0 = off
    val_shards: str = ""  # labelled shards: val top-1 (and of the EMA) at epoch ends ("" = none)
    val_every_epochs: int = 1  # and always after the last epoch


@dataclass
class LinearConfig:
    num_classes: int = 1000
    pretrained: str = ""  # a MoCo checkpoint dir (or run folder: its newest) to take the backbone from
    val_shards: str = ""  # labelled shards to report val_top1 on at every epoch end ("" = none)


@dataclass
class SegmentationConfig:
    """Dense fine-tuning (Segmenter on ADE20K / Pascal Context, SPML on VOC): reference sections 5.4, 5.6."""

    num_classes: int = 150
    decoder: str = "mask_transformer"  # mask_transformer (Segmenter) | softmax (SPML)
    decoder_options: dict = field(default_factory=dict)  # e.g. {depth: 2, dropout: 0.1}
    pretrained: str = ""  # backbone checkpoint: our run (folder) or a released DeiT / MoCo / SPML file
    ignore_index: int = 255
    # per-parameter-group lr multipliers and decay (SPML: backbone x1, biases x2 without decay, head
    # weights x10, head biases x20 without decay); Segmenter: all 1, decay as optim.weight_decay
    bias_lr_mult: float = 1.0
    head_lr_mult: float = 1.0
    head_bias_lr_mult: float = 1.0
    bias_decay: bool = True
    val_shards: str = ""  # dense shards scored at every epoch end ("" = no validation)
    eval_resize: str = "short"  # short: short side -> eval_size (mmseg); long: long side -> eval_size (VOC)
    eval_size: int = 0  # 0 = data.image_size
    window: int = 0  # sliding window (0 = whole image); Segmenter ADE 512 / 512, Pascal Context 480 / 320
    stride: int = 0  # 0 = window
    val_max_images: int = 0  # > 0: score only this many val images per rank (smoke runs)


@dataclass
class KnnConfig:
    """kNN top-1 of the encoder being trained, at epoch ends: a quality figure that compares runs (the
    contrastive loss scales with its temperature), e.g. the Tune metric ``knn_top1`` of a sweep."""

    bank_shards: str = ""  # labelled shards whose features are the kNN memory ("" = off)
    query_shards: str = ""  # held-out labelled shards classified against it
    k: int = 20
    temperature: float = 0.07
    every_epochs: int = 1  # and always after the last epoch


@dataclass
class CheckpointConfig:
    every_steps: int = 0  # also checkpoint every N optimizer steps (0 = epoch ends only)
    best_metric: str = ""  # a validation metric (val_miou, val_top1): its best epoch is kept in <run>/best
    best_mode: str = "max"  # max | min
    keep: int = 3  # newest checkpoints kept in storage
    resume_from: str = ""  # a checkpoint dir (or a run folder: its newest) to start a new run from
    # checkpoint uploads and TensorBoard sync: transient storage errors are retried this long
    retry: RetryPolicy = field(default_factory=RetryPolicy)


@dataclass
class RayConfig:
    # a number, or [min, max]: elastic (Ray asks for max, starts with min, resizes after failures and when
    # nodes return; every restart continues from the last checkpoint at the new size)
    num_workers: int | list[int] = 1
    resize_interval_s: float = 60.0  # elastic: how often Ray looks for nodes to grow the group back
    use_gpu: bool = False
    resources_per_worker: dict = field(default_factory=dict)  # e.g. {"CPU": 8, "GPU": 1}
    storage_path: str = "outputs/runs"  # local folder or s3://bucket/prefix
    name: str = ""  # run name; the same name resumes that run
    max_failures: int = 0  # worker-group restarts (from the last checkpoint); elastic needs != 0
    backend: str = ""  # "" = nccl with GPUs, gloo without


@dataclass
class LoggingConfig:
    every_steps: int = 10  # metrics through ray.train.report every N optimizer steps
    tensorboard: bool = True  # event files under <run>/tensorboard on rank 0
    # a local folder: every rank appends one JSON line per optimizer step (step, samples seen, lr, the
    # keys it trained on) to <folder>/rank<r>.jsonl, the evidence that epochs stay exact ("" = off)
    sample_log: str = ""


@dataclass
class TrainConfig:
    objective: str = "moco"
    seed: int = 0
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    moco: MocoConfig = field(default_factory=MocoConfig)
    supervised: SupervisedConfig = field(default_factory=SupervisedConfig)
    linear: LinearConfig = field(default_factory=LinearConfig)
    segmentation: SegmentationConfig = field(default_factory=SegmentationConfig)
    knn: KnnConfig = field(default_factory=KnnConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    ray: RayConfig = field(default_factory=RayConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)

    @property
    def total_epochs(self) -> int:
        """Epochs trained: the schedule's plus the cooldown at its floor."""
        return self.schedule.epochs + self.schedule.cooldown_epochs

    @property
    def worker_range(self) -> tuple[int, int]:
        """(min, max) workers; equal for a fixed ``ray.num_workers``."""
        value = self.ray.num_workers
        if isinstance(value, int):
            return value, value
        if len(value) != 2:
            raise ConfigError(f"ray.num_workers: expected a number or [min, max], got {value!r}")
        return value[0], value[1]

    @property
    def global_batch(self) -> int:
        """Images per optimizer step over all workers (what the lr scales with, whatever the world size)."""
        return self.optim.global_batch or (
            self.data.batch_size * self.worker_range[1] * self.optim.grad_accum_steps
        )

    def batch_split(self, world_size: int) -> tuple[int, int]:
        """(per-worker micro-batch, accumulation steps) giving the global batch on ``world_size`` workers:
        the fewest accumulation steps whose micro-batch fits ``data.batch_size`` (the memory bound)."""
        total = self.global_batch
        for accum in range(1, total // world_size + 1):
            if total % (world_size * accum) == 0 and total // (world_size * accum) <= self.data.batch_size:
                return total // (world_size * accum), accum
        raise ConfigError(
            f"optim.global_batch: {total} images per step cannot be split evenly over {world_size} "
            f"workers (ray.num_workers={self.ray.num_workers}); pick a global batch divisible by every "
            f"world size in the range"
        )

    def validate(self) -> None:
        """Every check that can fail before a cluster resource is claimed; raises ConfigError."""
        _check(self.objective in OBJECTIVES, "objective", f"one of {OBJECTIVES}", self.objective)
        try:
            self.data.validate()
        except ValueError as e:
            raise ConfigError(str(e)) from e
        _check_model(self.model.name)
        _check_cast_arguments(self.model.name, self.model_kwargs(), set(self.model.kwargs))
        _check_provider(self.data)
        _check(self.model.precision in PRECISIONS, "model.precision", f"one of {PRECISIONS}",
               self.model.precision)
        _check(self.optim.name in OPTIMIZERS, "optim.name", f"one of {OPTIMIZERS}", self.optim.name)
        for key, value in (
            ("optim.base_lr", self.optim.base_lr),
            ("optim.base_batch", self.optim.base_batch),
            ("optim.grad_accum_steps", self.optim.grad_accum_steps),
            ("schedule.epochs", self.schedule.epochs),
            ("logging.every_steps", self.logging.every_steps),
            ("checkpoint.keep", self.checkpoint.keep),
        ):
            _check(value > 0, key, "a positive number", value)
        low, high = self.worker_range
        _check(1 <= low <= high, "ray.num_workers", "a positive number or [min, max] with 1 <= min <= max",
               self.ray.num_workers)
        _check(self.optim.global_batch >= 0, "optim.global_batch", ">= 0", self.optim.global_batch)
        for world_size in range(low, high + 1):
            self.batch_split(world_size)
        if low < high:
            _check(self.ray.max_failures != 0, "ray.max_failures",
                   "!= 0 with a [min, max] ray.num_workers (a resize is a restart; -1 = unlimited)",
                   self.ray.max_failures)
            _check(self.ray.resize_interval_s > 0, "ray.resize_interval_s", "> 0", self.ray.resize_interval_s)
        _check(
            0 <= self.schedule.warmup_epochs <= self.schedule.epochs,
            "schedule.warmup_epochs",
            "between 0 and schedule.epochs",
            self.schedule.warmup_epochs,
        )
        try:
            self.checkpoint.retry.validate("checkpoint.retry")
        except ValueError as e:
            raise ConfigError(str(e)) from e
        _check(self.schedule.cooldown_epochs >= 0, "schedule.cooldown_epochs", ">= 0",
               self.schedule.cooldown_epochs)
        _check(
            self.checkpoint.every_steps >= 0, "checkpoint.every_steps", ">= 0", self.checkpoint.every_steps
        )
        _check(
            self.ray.max_failures >= -1, "ray.max_failures", ">= -1 (-1 = unlimited)", self.ray.max_failures
        )
        _check(bool(self.ray.storage_path), "ray.storage_path", "a folder or URL", self.ray.storage_path)
        _check(
            self.ray.backend in ("", "gloo", "nccl"), "ray.backend", "'', 'gloo' or 'nccl'", self.ray.backend
        )
        _check(self.schedule.kind in SCHEDULES, "schedule.kind", f"one of {SCHEDULES}", self.schedule.kind)
        _check(self.checkpoint.best_mode in ("max", "min"), "checkpoint.best_mode", "'max' or 'min'",
               self.checkpoint.best_mode)
        if self.objective == "segmentation":
            seg = self.segmentation
            _check(self.data.recipe == "segmentation", "data.recipe",
                   "'segmentation' for objective segmentation", self.data.recipe)
            _check(seg.num_classes > 0, "segmentation.num_classes", "> 0", seg.num_classes)
            _check(seg.decoder in ("mask_transformer", "softmax"), "segmentation.decoder",
                   "'mask_transformer' or 'softmax'", seg.decoder)
            _check(seg.eval_resize in ("short", "long"), "segmentation.eval_resize", "'short' or 'long'",
                   seg.eval_resize)
            _check(seg.window >= 0 and seg.stride >= 0, "segmentation.window", ">= 0 (and stride >= 0)",
                   (seg.window, seg.stride))
            if self.checkpoint.best_metric:
                _check(bool(seg.val_shards), "segmentation.val_shards",
                       f"a shard set when checkpoint.best_metric={self.checkpoint.best_metric!r}", "")
        elif self.objective == "moco":
            _check(self.data.recipe == "moco", "data.recipe", "'moco' for objective moco", self.data.recipe)
            _check(self.moco.temperature > 0, "moco.temperature", "> 0", self.moco.temperature)
            _check(0 <= self.moco.momentum <= 1, "moco.momentum", "in [0, 1]", self.moco.momentum)
        else:
            _check(
                self.data.recipe in ("supervised", "eval", "linear", "linear_eval"),
                "data.recipe",
                "'supervised', 'eval', 'linear' or 'linear_eval' for a classification objective",
                self.data.recipe,
            )
            classes = (
                self.supervised.num_classes if self.objective == "supervised" else self.linear.num_classes
            )
            _check(classes > 0, f"{self.objective}.num_classes", "> 0", classes)
            _check(self.supervised.val_every_epochs > 0, "supervised.val_every_epochs", "> 0",
                   self.supervised.val_every_epochs)
            if self.objective == "supervised" and self.checkpoint.best_metric:
                _check(bool(self.supervised.val_shards), "supervised.val_shards",
                       f"a shard set when checkpoint.best_metric={self.checkpoint.best_metric!r}", "")
        if self.knn.bank_shards or self.knn.query_shards:
            _check(bool(self.knn.bank_shards and self.knn.query_shards), "knn.query_shards",
                   "both knn.bank_shards and knn.query_shards", self.knn.query_shards)
            _check(self.knn.k > 0, "knn.k", "> 0", self.knn.k)
            _check(self.knn.every_epochs > 0, "knn.every_epochs", "> 0", self.knn.every_epochs)
        if self.objective == "linear":
            _check(bool(self.linear.pretrained), "linear.pretrained", "a pretrained checkpoint path", "")
            _check(self.optim.name == "sgd", "optim.name", "'sgd' for the linear probe", self.optim.name)

    def model_kwargs(self) -> dict:
        """``timm.create_model`` keywords: ``model.kwargs`` plus, for CAST, the token budget
        ``data.max_superpixels`` as ``num_tokens`` (static shapes), unless the kwargs set it."""
        kwargs = dict(self.model.kwargs)
        if self.data.max_superpixels and self.model.name.startswith("cast_"):
            kwargs.setdefault("num_tokens", self.data.max_superpixels)
        return kwargs

    def training_data(self) -> DataConfig:
        """``data`` with ``min_superpixels`` raised to the CAST model's first pooling: the loader then
        skips (and counts) the views such a model could not pool."""
        from dataclasses import replace

        from cast.models import PRESETS, cast_config

        if self.model.name not in PRESETS:
            return self.data
        first = cast_config(self.model.name, **_architecture(self.model_kwargs())).num_clusters[0]
        return replace(self.data, min_superpixels=max(self.data.min_superpixels, first))

    def resolved_storage_path(self) -> str:
        """Ray needs an absolute local path or a URL."""
        return absolute(self.ray.storage_path)

    def run_folder(self) -> str:
        """``<storage_path>/<name>``: the run's checkpoints, config, TensorBoard files."""
        return join(self.resolved_storage_path(), self.ray.name)


def _check(ok: bool, key: str, expected: str, got) -> None:
    if not ok:
        raise ConfigError(f"{key}: expected {expected}, got {got!r}")


def _check_model(name: str) -> None:
    import timm

    import cast.models  # noqa: F401  (registers cast_* with timm)

    if not timm.is_model(name):
        raise ConfigError(
            f"model.name: {name!r} is not a registered timm model "
            f"(CAST ones: {', '.join(timm.list_models('cast_*'))})"
        )


def _architecture(kwargs: dict) -> dict:
    """The CASTConfig fields of ``timm.create_model`` keywords (placement and timm's own left out)."""
    from cast.models.registry import NON_CONFIG_ARGS

    return {k: v for k, v in kwargs.items() if k not in NON_CONFIG_ARGS}


def _check_cast_arguments(name: str, kwargs: dict, own: set[str]) -> None:
    """A CAST variant's arguments (model.kwargs and the token budget data.max_superpixels) build a config;
    an unknown or ill-typed one is named by its key (``own``: the keys that came from model.kwargs)."""
    import typing

    from cast.config import _coerce
    from cast.models import PRESETS, cast_config
    from cast.models.cast import CASTConfig

    if name in PRESETS:
        hints = typing.get_type_hints(CASTConfig)
        for key, value in _architecture(kwargs).items():
            where = f"model.kwargs.{key}" if key in own else "data.max_superpixels"
            if key not in hints:
                raise ConfigError(f"{where}: not an option of {name}; valid: {', '.join(sorted(hints))}")
            _coerce(value, hints[key], where)
        try:
            cast_config(name, **_architecture(kwargs))
        except (ValueError, TypeError) as e:
            raise ConfigError(f"model.kwargs / data.max_superpixels: {e}") from e


def _check_provider(data: DataConfig) -> None:
    try:
        data.provider()
    except (ValueError, TypeError) as e:
        raise ConfigError(f"data.superpixels: {e}") from e
