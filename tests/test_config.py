"""cast.config: strict YAML + dotted overrides into dataclasses, and every shipped job config."""

from pathlib import Path

import pytest

from cast.config import ConfigError, dump_config, load_config, parse_job_args
from cast.train.config import TrainConfig
from cast.tune.sweep import SweepConfig

CONFIGS = Path(__file__).resolve().parents[1] / "jobs" / "configs"
TINY = str(CONFIGS / "moco_cast_tiny.yaml")


def test_overrides_parse_yaml_scalars_and_lists():
    cfg = load_config(
        TrainConfig,
        TINY,
        [
            "optim.base_lr=3e-4",
            "data.batch_size=4",
            "optim.betas=[0.9, 0.95]",
            "model.kwargs.drop_rate=0.0",
            "ray.use_gpu=true",
        ],
    )
    assert cfg.optim.base_lr == pytest.approx(3e-4)
    assert cfg.data.batch_size == 4
    assert cfg.optim.betas == (0.9, 0.95)
    assert cfg.model.kwargs == {"img_size": 64, "drop_rate": 0.0}
    assert cfg.ray.use_gpu is True


@pytest.mark.parametrize(
    "override, key, expected",
    [
        ("optim.base_lrr=1", "optim.base_lrr", "valid keys"),
        ("data.batch_size=big", "data.batch_size", "expected int"),
        ("ray.use_gpu=3", "ray.use_gpu", "expected bool"),
        ("optim.betas=0.9", "optim.betas", "expected a list"),
        ("model=cast_tiny", "model", "expected a mapping"),
    ],
)
def test_wrong_key_or_type_names_the_key(override, key, expected):
    with pytest.raises(ConfigError) as info:
        load_config(TrainConfig, TINY, [override])
    assert key in str(info.value) and expected in str(info.value)


def test_wrong_key_in_yaml_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("objective: moco\nschedule:\n  epoch: 3\n")
    with pytest.raises(ConfigError, match="schedule.epoch"):
        load_config(TrainConfig, str(bad))


def test_round_trip(tmp_path):
    cfg = load_config(TrainConfig, TINY, ["data.shards=s3://b/x", "optim.betas=[0.8, 0.9]"])
    path = tmp_path / "resolved.yaml"
    path.write_text(dump_config(cfg))
    assert load_config(TrainConfig, str(path)) == cfg


def test_validation_names_the_field():
    cfg = load_config(TrainConfig, TINY, ["data.shards=/x", "model.name=cast_nope"])
    with pytest.raises(ConfigError, match="model.name"):
        cfg.validate()
    cfg = load_config(TrainConfig, TINY, ["data.shards=/x", "data.superpixels=felzenszwalb"])
    with pytest.raises(ConfigError, match="data.superpixels"):
        cfg.validate()
    with pytest.raises(ConfigError, match="data.shards"):
        load_config(TrainConfig, TINY).validate()
    cfg = load_config(TrainConfig, TINY, ["data.shards=/x", "optim.base_lr=-1"])
    with pytest.raises(ConfigError, match="optim.base_lr"):
        cfg.validate()


def test_parse_job_args():
    assert parse_job_args(["--config", "a.yaml", "x.y=1", "z=[1,2]"]) == ("a.yaml", ["x.y=1", "z=[1,2]"])


@pytest.mark.parametrize(
    "name", sorted(p.name for p in CONFIGS.glob("*.yaml") if not p.name.startswith("sweep"))
)
def test_shipped_job_configs_validate(name):
    overrides = ["data.shards=/data/shards", "linear.pretrained=/runs/moco",
                 "segmentation.val_shards=/data/val"]
    cfg = load_config(TrainConfig, str(CONFIGS / name), overrides)
    cfg.validate()
    expected = {"moco": "moco", "deit": "supervised", "supervised": "supervised", "linear": "linear",
                "seg": "segmentation"}
    assert cfg.objective == expected[name.split("_")[0]]


def test_segmentation_recipes_and_best_checkpoint_need_validation():
    seg = {name: load_config(TrainConfig, str(CONFIGS / f"seg_cast_small_{name}.yaml"))
           for name in ("ade20k", "pcontext", "voc")}
    assert [(c.segmentation.num_classes, c.optim.base_lr, c.global_batch, c.segmentation.window,
             c.segmentation.stride) for c in seg.values()] == [
        (150, 1e-3, 8, 512, 512), (60, 1e-3, 16, 480, 320), (21, 3e-3, 16, 0, 0)]
    voc = seg["voc"].segmentation
    assert (voc.decoder, voc.bias_lr_mult, voc.head_lr_mult, voc.head_bias_lr_mult, voc.bias_decay) == (
        "softmax", 2.0, 10.0, 20.0, False)
    assert seg["voc"].schedule.warmup_steps == 100 and seg["ade20k"].schedule.kind == "poly"
    with pytest.raises(ConfigError, match="segmentation.val_shards"):
        load_config(TrainConfig, str(CONFIGS / "seg_cast_tiny.yaml"), ["data.shards=/d"]).validate()


def test_paper_recipes_exact():
    moco = load_config(TrainConfig, str(CONFIGS / "moco_cast_small_in1k.yaml"))
    assert (
        moco.schedule.epochs,
        moco.schedule.warmup_epochs,
        moco.optim.base_lr,
        moco.optim.weight_decay,
    ) == (100, 10, 1.5e-4, 0.1)
    assert moco.global_batch == 256 and (moco.moco.temperature, moco.moco.momentum) == (0.2, 0.99)
    assert (moco.moco.dim, moco.moco.mlp_dim) == (256, 4096)
    coco = load_config(TrainConfig, str(CONFIGS / "moco_cast_small_coco.yaml"))
    assert (coco.model.name, coco.schedule.epochs, coco.schedule.warmup_epochs) == (
        "cast_seg_small_pretrain",
        400,
        40,
    )
    linear = load_config(TrainConfig, str(CONFIGS / "linear_cast_small_in1k.yaml"))
    assert linear.optim.base_lr * linear.global_batch / linear.optim.base_batch == 120.0
    deit = load_config(TrainConfig, str(CONFIGS / "deit_cast_small_in1k.yaml"))
    assert deit.optim.base_lr * deit.global_batch / deit.optim.base_batch == pytest.approx(1e-3)


@pytest.mark.parametrize("name", ["sweep_moco_tiny.yaml", "sweep_moco_lr.yaml"])
def test_shipped_sweeps_validate(name, monkeypatch):
    monkeypatch.chdir(CONFIGS.parents[1])
    sweep = load_config(
        SweepConfig,
        str(CONFIGS / name),
        ["overrides=[data.shards=/data/shards]"] if name == "sweep_moco_tiny.yaml" else [],
    )
    sweep.validate()


def test_sweep_search_key_is_checked(monkeypatch):
    monkeypatch.chdir(CONFIGS.parents[1])
    sweep = load_config(
        SweepConfig,
        str(CONFIGS / "sweep_moco_tiny.yaml"),
        ["overrides=[data.shards=/d]", "search={optim.base_lrr: {choice: [1, 2]}}"],
    )
    with pytest.raises(ConfigError, match="optim.base_lrr"):
        sweep.validate()
    sweep = load_config(
        SweepConfig,
        str(CONFIGS / "sweep_moco_tiny.yaml"),
        ["overrides=[data.shards=/d]", "search={optim.base_lr: {loguniform: [0, 1]}}"],
    )
    with pytest.raises(ConfigError, match="search.optim.base_lr"):
        sweep.validate()
