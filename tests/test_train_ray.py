"""cast.train and cast.tune on a real in-process Ray cluster (shared by the tests of this session)."""

import dataclasses
from pathlib import Path

import pytest
import timm
import torch

from cast.artifacts import (
    COMPLETE_MARKER,
    latest_checkpoint,
    read_report,
    read_state,
    report_url,
    write_checkpoint,
)
from cast.config import load_config
from cast.train.config import MocoConfig, TrainConfig
from cast.train.driver import fit
from cast.train.objectives import MoCo
from cast.tune.sweep import SweepConfig, run_sweep
from data_tools.make_shards import build_shards
from tests.fixtures.datasets import make_imagefolder, tiny_sweep_overrides

CONFIGS = Path(__file__).resolve().parents[1] / "jobs" / "configs"


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    """8 labelled 64 px images in 2 shards of 4 (2 classes)."""
    root = tmp_path_factory.mktemp("data")
    make_imagefolder(root / "src", num_classes=2, per_class=4, size=64)
    build_shards(str(root / "src"), str(root / "shards"), "imagefolder", max_count=4, progress=False)
    return str(root / "shards")


def _supervised(shards, storage, name, workers, batch):
    overrides = [
        f"data.shards={shards}",
        "data.recipe=eval",
        f"data.batch_size={batch}",
        "data.shuffle=false",
        "model.kwargs={img_size: 64, drop_rate: 0.0, drop_path_rate: 0.0, pool_dropout: 0.0, "
        "fusion_dropout: 0.0}",
        "model.freeze_bn=true",
        "optim.name=sgd",
        "optim.base_lr=0.5",
        "optim.base_batch=8",
        "optim.weight_decay=0.0",
        "optim.exclude_bias_norm_from_wd=false",
        "supervised.mixup_alpha=0.0",
        "supervised.cutmix_alpha=0.0",
        "supervised.ema_decay=0.0",
        "schedule.epochs=1",
        "schedule.warmup_epochs=0",
        f"ray.num_workers={workers}",
        f"ray.storage_path={storage}",
        f"ray.name={name}",
        "logging.tensorboard=false",
    ]
    return load_config(TrainConfig, str(CONFIGS / "supervised_cast_tiny.yaml"), overrides)


def test_a_driver_that_builds_shards_with_a_process_pool_after_training_can_still_use_ray(
        ray_driver, s3_env, tmp_path):
    """A forked pool (writing to S3) once broke a driver that had run a trainer: its next remote call
    hung (the next trainer, in CI: for ever)."""
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    TorchTrainer(lambda: None, scaling_config=ScalingConfig(num_workers=1),
                 run_config=RunConfig(storage_path=str(tmp_path / "runs"))).fit()
    make_imagefolder(tmp_path / "src", num_classes=2, per_class=8, size=32)
    info = build_shards(str(tmp_path / "src"), f"s3://{s3_env}/shards", "imagefolder", max_count=2, workers=2,
                        progress=False)
    assert len(info.shards) == 8

    @ray_driver.remote
    class Echo:
        def echo(self, value):
            return value

    assert ray_driver.get(Echo.remote().echo.remote(7), timeout=60) == 7


def test_two_workers_and_accumulation_match_one_worker_with_the_whole_batch(ray_driver, shards, tmp_path):
    """DDP averages gradients and accumulation sums micro-batches: 2 workers x 4 and 1 worker x 2
    micro-batches of 4 must give 1 x 8's weights (no dropout, BN frozen, same samples, SGD)."""
    states = {}
    for name, workers, batch, global_batch in (("w2", 2, 4, 0), ("w1", 1, 8, 0), ("acc", 1, 4, 8)):
        cfg = _supervised(shards, str(tmp_path), name, workers, batch)
        cfg.optim.global_batch = global_batch
        assert cfg.global_batch == 8 and cfg.batch_split(workers) == (4 if name != "w1" else 8,
                                                                      2 if name == "acc" else 1)
        result = fit(cfg)
        assert result.metrics["step"] == 1
        states[name] = read_state(latest_checkpoint(str(tmp_path / name)))["model"]
    for key, value in states["w1"].items():
        assert torch.allclose(value, states["w2"][key], atol=1e-5, rtol=1e-4), key
        assert torch.allclose(value, states["acc"][key], atol=1e-5, rtol=1e-4), key
    torch.manual_seed(0)  # the loop seeds rank 0 with cfg.seed + 0 before building the model
    fresh = timm.create_model("cast_tiny", num_classes=2, img_size=64).state_dict()
    moved = [
        k
        for k in fresh
        if fresh[k].is_floating_point() and not torch.allclose(fresh[k], states["w1"][k], atol=1e-4)
    ]
    assert len(moved) > 10  # the step really changed the weights, far beyond the tolerance above

    # a new run continues the 1-worker run from its folder on 2 workers: only epoch 2 is trained
    cont = _supervised(shards, str(tmp_path), "continued", 2, 4)
    cont.schedule.epochs = 2
    cont.checkpoint.resume_from = str(tmp_path / "w1")
    assert fit(cont).metrics["step"] == 2
    names = sorted(p.name for p in (tmp_path / "continued").glob("checkpoint_epoch*"))
    assert names == ["checkpoint_epoch0002_step000000002"]


def test_linear_probe_writes_its_top1_beside_the_pretrained_checkpoint(shards, tmp_path):
    """The JSON ``jobs.evaluate`` picks up, beside the run folder named and the checkpoint it resolved to.
    Ray Train's local mode (no worker actors) runs the real per-worker loop in this process, in seconds."""
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from cast.train.loop import train_loop_per_worker

    moco = MoCo(timm.create_model("cast_tiny", num_classes=0, img_size=64), MocoConfig(dim=16, mlp_dim=32))
    pretrained = tmp_path / "moco"
    checkpoint = pretrained / "checkpoint_epoch0001_step000000002"
    checkpoint.mkdir(parents=True)
    write_checkpoint(str(checkpoint), {"model": moco.state_dict()}, "objective: moco\n")
    (checkpoint / COMPLETE_MARKER).write_text("ok\n")
    cfg = load_config(
        TrainConfig,
        str(CONFIGS / "linear_cast_tiny.yaml"),
        [
            f"data.shards={shards}",
            "data.batch_size=4",
            f"linear.pretrained={pretrained}",
            f"linear.val_shards={shards}",
            "schedule.epochs=1",
            "ray.num_workers=1",
            f"ray.storage_path={tmp_path}",
            "ray.name=probe",
            "logging.tensorboard=false",
        ],
    )
    cfg.validate()
    assert cfg.data.recipe == "linear"
    result = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"config": cfg},
        scaling_config=ScalingConfig(num_workers=0),
        run_config=RunConfig(name="probe", storage_path=str(tmp_path)),
    ).fit()
    beside_run = read_report(report_url(str(pretrained), "linear_probe"))
    beside_checkpoint = read_report(report_url(str(checkpoint), "linear_probe"))
    assert beside_run is not None and beside_run == beside_checkpoint
    assert beside_run["top1"] == pytest.approx(result.metrics["val_top1"])
    assert 0 <= beside_run["top1"] <= 100 and beside_run["checkpoint"] == str(checkpoint)
    assert beside_run["run"] == str(tmp_path / "probe")


def test_asha_sweep_ranks_by_knn_and_writes_the_base_recipe_plus_the_swept_values(
        ray_driver, shards, tmp_path, monkeypatch):
    monkeypatch.chdir(CONFIGS.parents[1])
    sweep = load_config(
        SweepConfig,
        str(CONFIGS / "sweep_moco_tiny.yaml"),
        [f"storage_path={tmp_path}", "name=sweep", "asha={max_t: 2, grace_period: 1, reduction_factor: 2}"],
    )
    sweep.overrides = [*tiny_sweep_overrides(shards, tmp_path), "ray.max_failures=0"]
    results, best = run_sweep(sweep)
    assert len(results) == 4
    assert all(r.error is None for r in results)
    assert all(0 <= r.metrics["knn_top1"] <= 100 for r in results)
    best_result = results.get_best_result(metric="knn_top1", mode="max", scope="last")
    cfg = load_config(TrainConfig, best, [f"data.shards={shards}"])
    cfg.validate()
    assert cfg.optim.base_lr == pytest.approx(best_result.config["optim.base_lr"])
    assert cfg.moco.temperature == best_result.config["moco.temperature"]
    tiny = load_config(TrainConfig, str(CONFIGS / "moco_cast_tiny.yaml"))
    # the base recipe's run, not the sweep's short one: its epochs, workers, batch; no kNN sets
    assert (cfg.schedule.epochs, cfg.ray.num_workers, cfg.data.batch_size, cfg.checkpoint.every_steps) == (
        tiny.schedule.epochs, tiny.ray.num_workers, tiny.data.batch_size, tiny.checkpoint.every_steps)
    assert cfg.ray.name == "" and cfg.knn.bank_shards == ""
    assert cfg.logging.every_steps == tiny.logging.every_steps

    # the same sweep again (as after its driver died) restores it: the finished trials are not rerun
    again, _ = run_sweep(sweep)
    assert sorted((r.path, r.metrics["knn_top1"]) for r in again) == sorted(
        (r.path, r.metrics["knn_top1"]) for r in results)


def test_supervised_validation_reports_raw_and_ema_top1_and_keeps_the_best_epoch(shards, tmp_path):
    """val top-1 of the trained weights and of their EMA every 2nd epoch and after the last; <run>/best
    holds the best validated epoch, and its figures are what its saved weights give on the same shards.
    Ray Train's local mode runs the real per-worker loop in this process (as the linear probe's test)."""
    import json

    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from cast.train.loop import train_loop_per_worker

    cfg = _supervised(shards, str(tmp_path), "val", 1, 8)
    cfg.schedule.epochs, cfg.supervised.ema_decay, cfg.supervised.val_shards = 3, 0.5, shards
    cfg.supervised.val_every_epochs, cfg.checkpoint.best_metric = 2, "val_top1"
    metrics = TorchTrainer(train_loop_per_worker, train_loop_config={"config": cfg},
                           scaling_config=ScalingConfig(num_workers=0),
                           run_config=RunConfig(name="val", storage_path=str(tmp_path))).fit().metrics
    assert metrics["epoch"] == 3 and {"val_top1", "val_top1_ema"} <= set(metrics)
    best = json.loads((tmp_path / "val" / "best" / "best.json").read_text())
    assert best["epoch"] in (2, 3) and best["value"] == max(best["value"], metrics["val_top1"])
    state = _assert_the_best_weights_give_their_figures(cfg, tmp_path / "val" / "best", best)
    assert not all(torch.equal(state["model"][k], state["ema"][k]) for k in state["ema"])  # two models


def test_supervised_cast_tiny_learns_fashion_mnist_and_its_best_checkpoint_gives_the_reported_top1(
        ray_driver, tmp_path):
    """Real images, 2 Ray workers, DeiT's loss (label smoothing, EMA): val top-1 well above the 10 % of
    chance, validated with the shards dealt over both ranks, equals what the weights saved in <run>/best
    give in one process (every val image counted once); the EMA's figure beside it."""
    import json

    from data_tools.sample_data import FASHION_MNIST_DIR, fashion_mnist

    if not (FASHION_MNIST_DIR / "train-images-idx3-ubyte.gz").exists():
        pytest.skip(f"{FASHION_MNIST_DIR}: Fashion-MNIST missing (apt-get install dataset-fashion-mnist)")
    for split, per_class in (("train", 30), ("test", 10)):
        fashion_mnist(tmp_path / split, split=split, per_class=per_class, size=64)
        build_shards(str(tmp_path / split), str(tmp_path / f"{split}-shards"), "imagefolder", max_count=64,
                     progress=False)
    val_shards = str(tmp_path / "test-shards")
    cfg = load_config(TrainConfig, str(CONFIGS / "supervised_cast_tiny.yaml"), [
        f"data.shards={tmp_path / 'train-shards'}",
        "data.recipe=eval",  # DeiT's augmentation needs hundreds of epochs (8 here: 35 %; 4 plain: 53 %)
        "data.batch_size=8",
        "optim.global_batch=16",
        "supervised.num_classes=10",
        "supervised.mixup_alpha=0.0",
        "supervised.cutmix_alpha=0.0",
        "supervised.ema_decay=0.9",
        f"supervised.val_shards={val_shards}",
        "schedule.epochs=3",
        "supervised.val_every_epochs=2",
        "schedule.warmup_epochs=0.5",
        "optim.base_lr=1.0e-3",
        "optim.base_batch=16",
        "checkpoint.best_metric=val_top1",
        "ray.num_workers=2",
        f"ray.storage_path={tmp_path / 'runs'}",
        "ray.name=fmnist",
        "logging.tensorboard=false",
    ])
    metrics = fit(cfg).metrics
    best = json.loads((tmp_path / "runs" / "fmnist" / "best" / "best.json").read_text())
    assert metrics["epoch"] == 3 and best["value"] == max(best["value"], metrics["val_top1"])
    assert best["value"] > 30, best  # chance: 10
    _assert_the_best_weights_give_their_figures(cfg, tmp_path / "runs" / "fmnist" / "best", best)
    figures = best["metrics"]
    print(f"fashion-mnist val top-1 {figures['val_top1']:.1f} (EMA {figures['val_top1_ema']:.1f}) at epoch "
          f"{best['epoch']}")


def _assert_the_best_weights_give_their_figures(cfg: TrainConfig, folder: Path, best: dict) -> dict:
    """The raw and EMA weights saved in ``folder`` score, in one process, the val top-1 that training
    reported for them (``best.json``'s); the saved state."""
    from cast.train.validation import classifier_top1

    state = read_state(str(folder))
    data = dataclasses.replace(cfg.data, shards=cfg.supervised.val_shards, recipe="eval", shuffle=False,
                               drop_remainder=False)
    for key, weights in (("val_top1", state["model"]), ("val_top1_ema", state["ema"])):
        model = timm.create_model(cfg.model.name, num_classes=cfg.supervised.num_classes, **cfg.model.kwargs)
        model.load_state_dict(weights)
        again = classifier_top1(model, data, rank=0, world_size=1, device=torch.device("cpu"),
                                provider=cfg.data.provider())
        assert again == pytest.approx(best["metrics"][key]), key
    return state
