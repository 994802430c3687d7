"""Objectives, schedules and optimizer groups of cast.train, on real modules, in one process."""

import math
from pathlib import Path

import pytest
import timm
import torch
import torch.nn.functional as F
from torch import nn

import cast.models  # noqa: F401
from cast.config import ConfigError, load_config
from cast.train.config import MocoConfig, OptimConfig, ScheduleConfig, SupervisedConfig, TrainConfig
from cast.train.objectives import (
    DeiTLoss,
    MoCo,
    MoCoObjective,
    build_mlp,
    contrastive_loss,
    moco_momentum,
    prepare_linear_probe,
)
from cast.train.optim import build_optimizer, lr_at, param_groups, scaled_lr

CONFIGS = Path(__file__).resolve().parents[1] / "jobs" / "configs"


def test_contrastive_loss_matches_definition():
    torch.manual_seed(0)
    q, k = torch.randn(6, 8), torch.randn(6, 8)
    qn, kn = F.normalize(q, dim=1), F.normalize(k, dim=1)
    logits = qn @ kn.t() / 0.2
    expected = -torch.log_softmax(logits, dim=1).diagonal().mean() * 0.4
    assert contrastive_loss(q, k, 0.2).item() == pytest.approx(expected.item(), rel=1e-5)
    # perfectly aligned, well-separated keys give a lower loss than random ones
    assert contrastive_loss(k * 10, k, 0.2) < contrastive_loss(q, k, 0.2)


def test_momentum_schedule():
    cfg = MocoConfig(momentum=0.99, momentum_cosine=True)
    assert moco_momentum(0, 100, cfg) == pytest.approx(0.99)
    assert moco_momentum(50, 100, cfg) == pytest.approx(0.995)
    assert moco_momentum(100, 100, cfg) == pytest.approx(1.0)
    assert moco_momentum(50, 100, MocoConfig(momentum_cosine=False)) == 0.99


def test_lr_schedule_warmup_then_half_cosine():
    sched = ScheduleConfig(epochs=10, warmup_epochs=2, warmup_start_lr=0.0, min_lr=0.0)
    peak = scaled_lr(OptimConfig(base_lr=1.5e-4, base_batch=256), 512)
    assert peak == pytest.approx(3e-4)
    assert lr_at(0, 100, 20, peak, sched) == 0.0
    assert lr_at(10, 100, 20, peak, sched) == pytest.approx(peak / 2)
    assert lr_at(20, 100, 20, peak, sched) == pytest.approx(peak)
    assert lr_at(60, 100, 20, peak, sched) == pytest.approx(peak / 2)
    assert lr_at(100, 100, 20, peak, sched) == pytest.approx(0.0, abs=1e-12)
    deit = ScheduleConfig(warmup_start_lr=1e-6, min_lr=1e-5)
    assert lr_at(0, 100, 10, 1e-3, deit) == pytest.approx(1e-6)
    assert lr_at(100, 100, 10, 1e-3, deit) == pytest.approx(1e-5)


def test_mlp_layout_of_the_reference():
    proj = build_mlp(3, 192, 4096, 256, last_bn=True)
    kinds = [type(m).__name__ for m in proj]
    assert kinds == [
        "Linear",
        "BatchNorm1d",
        "ReLU",
        "Linear",
        "BatchNorm1d",
        "ReLU",
        "Linear",
        "BatchNorm1d",
    ]
    assert all(m.bias is None for m in proj if isinstance(m, nn.Linear))
    assert proj[-1].affine is False
    pred = build_mlp(2, 256, 4096, 256, last_bn=False)
    assert [type(m).__name__ for m in pred] == ["Linear", "BatchNorm1d", "ReLU", "Linear"]


def _tiny_batch(b=4, views=2, size=32):
    torch.manual_seed(0)
    images = torch.randn(b, views, 3, size, size)
    cells = torch.arange(16).view(4, 4).repeat_interleave(size // 4, 0).repeat_interleave(size // 4, 1)
    return images, cells.expand(b, views, size, size).contiguous()


def test_moco_step_updates_base_and_momentum_encoders():
    encoder = timm.create_model("cast_tiny", num_classes=0, img_size=32)
    moco = MoCo(encoder, MocoConfig(dim=16, mlp_dim=32))
    key_before = [p.clone() for p in moco.momentum_encoder.parameters()]
    assert not any(p.requires_grad for p in moco.momentum_encoder.parameters())
    images, superpixels = _tiny_batch()
    loss = moco(images, superpixels)
    loss.backward()
    assert loss.item() > 0 and math.isfinite(loss.item())
    assert moco.base_encoder.head[0].weight.grad is not None
    assert all(p.grad is None for p in moco.momentum_encoder.parameters())
    assert all(torch.equal(a, b) for a, b in zip(key_before, moco.momentum_encoder.parameters()))
    torch.optim.SGD([p for p in moco.parameters() if p.requires_grad], lr=1.0).step()
    moco.update_momentum_encoder(0.5)
    changed = [
        not torch.equal(a, b) for a, b in zip(key_before, moco.momentum_encoder.parameters(), strict=True)
    ]
    assert any(changed)


def test_supervised_objective_mixes_and_smooths():
    model = timm.create_model("cast_tiny", num_classes=3, img_size=32)
    images, superpixels = _tiny_batch(views=1)
    labels = torch.tensor([0, 1, 2, 0])
    objective = DeiTLoss(SupervisedConfig(num_classes=3, mixup_alpha=0.8, cutmix_alpha=1.0))
    loss, logits = objective(model, images[:, 0].clone(), superpixels[:, 0], labels)
    assert logits.shape == (4, 3) and loss.item() > 0
    plain = DeiTLoss(
        SupervisedConfig(num_classes=3, mixup_alpha=0, cutmix_alpha=0, label_smoothing=0)
    )
    loss, logits = plain(model, images[:, 0], superpixels[:, 0], labels)
    assert loss.item() == pytest.approx(F.cross_entropy(logits, labels).item(), rel=1e-5)


def test_linear_probe_freezes_backbone_and_inits_head():
    moco = MoCo(timm.create_model("cast_tiny", num_classes=0, img_size=32), MocoConfig(dim=16, mlp_dim=32))
    probe = timm.create_model("cast_tiny", num_classes=5, img_size=32)
    prepare_linear_probe(probe, moco.state_dict())
    trainable = [n for n, p in probe.named_parameters() if p.requires_grad]
    assert trainable == ["head.weight", "head.bias"]
    assert probe.head.weight.std().item() == pytest.approx(0.01, rel=0.3) and probe.head.bias.abs().sum() == 0
    key = next(k for k in moco.base_encoder.state_dict() if not k.startswith("head."))
    assert torch.equal(probe.state_dict()[key], moco.base_encoder.state_dict()[key])
    with pytest.raises(ValueError, match="linear.pretrained: .*unrecognised checkpoint layout"):
        prepare_linear_probe(probe, {"x": 1})


def test_linear_probe_from_a_released_moco_checkpoint(tmp_path):
    """A ``checkpoint_0099.pth.tar`` in the original MoCo layout (``module.base_encoder.*`` with the
    projector, momentum encoder, predictor) starts a probe: every backbone weight loads, a fresh head."""
    from tests.test_models_checkpoint import moco_checkpoint, randomise

    source = randomise(timm.create_model("cast_tiny", num_classes=0, img_size=32), seed=4)
    path = tmp_path / "checkpoint_0099.pth.tar"
    torch.save(moco_checkpoint(source), path)
    probe = prepare_linear_probe(timm.create_model("cast_tiny", num_classes=5, img_size=32), str(path))
    ours = probe.state_dict()
    for key, value in source.state_dict().items():
        assert torch.equal(ours[key], value), key
    assert [n for n, p in probe.named_parameters() if p.requires_grad] == ["head.weight", "head.bias"]
    with pytest.raises(ValueError, match="does not fit"):  # a backbone of another width
        wider = timm.create_model("cast_tiny", num_classes=5, embed_dim=96, img_size=32)
        prepare_linear_probe(wider, str(path))


@pytest.mark.parametrize("name", ["linear_cast_tiny.yaml", "linear_cast_small_in1k.yaml"])
def test_linear_probe_configs_train_with_the_reference_augmentation(name):
    cfg = load_config(TrainConfig, str(CONFIGS / name), ["data.shards=/data", "linear.pretrained=/runs/moco"])
    cfg.validate()
    assert (cfg.objective, cfg.data.recipe) == ("linear", "linear")


def test_weight_decay_exclusions():
    model = timm.create_model("cast_tiny", num_classes=3, img_size=32)
    groups = param_groups(model, 0.05, exclude_bias_norm=True)
    no_decay = {id(p) for p in groups[1]["params"]}
    names = {n for n, p in model.named_parameters() if id(p) in no_decay}
    assert groups[1]["weight_decay"] == 0.0
    assert all(
        p.ndim <= 1
        for n, p in model.named_parameters()
        if id(p) in no_decay and n not in model.no_weight_decay()
    )
    assert set(model.no_weight_decay()) & {n for n, _ in model.named_parameters()} <= names
    assert len(param_groups(model, 0.1, exclude_bias_norm=False)) == 1  # MoCo: wd on all params
    sgd = build_optimizer(model, OptimConfig(name="sgd", weight_decay=0.0, momentum=0.9), lr=0.1)
    assert isinstance(sgd, torch.optim.SGD) and sgd.param_groups[0]["momentum"] == 0.9


def test_world_size_gives_per_worker_batch_and_accumulation():
    """The recipe fixes the global batch; each world size in the range gets the fewest accumulation
    steps whose micro-batch fits data.batch_size, and a size that cannot give it is refused up front."""
    cfg = load_config(TrainConfig, str(CONFIGS / "moco_cast_tiny.yaml"), [
        "data.shards=/nowhere", "data.batch_size=8", "optim.global_batch=24", "ray.num_workers=[1, 4]",
        "ray.max_failures=-1"])
    assert [cfg.batch_split(w) for w in (1, 2, 3, 4)] == [(8, 3), (6, 2), (8, 1), (6, 1)]
    cfg.validate()
    cfg.ray.num_workers = [1, 5]
    with pytest.raises(ConfigError, match=r"optim.global_batch: 24 .* over 5 workers"):
        cfg.validate()
    cfg.ray.num_workers, cfg.ray.max_failures = [1, 4], 0
    with pytest.raises(ConfigError, match=r"ray.max_failures: expected != 0 with a \[min, max\]"):
        cfg.validate()
    cfg.ray.num_workers = [3, 2]
    with pytest.raises(ConfigError, match="ray.num_workers: expected a positive number or"):
        cfg.validate()
    default = load_config(TrainConfig, str(CONFIGS / "moco_cast_tiny.yaml"), [
        "data.batch_size=8", "ray.num_workers=[1, 2]"])
    assert default.global_batch == 16 and default.batch_split(1) == (8, 2)  # from the largest size


def test_moco_key_encoder_moves_once_per_step_not_per_micro_batch():
    cfg = TrainConfig()
    cfg.model.kwargs = {"img_size": 32}
    cfg.moco = MocoConfig(dim=16, mlp_dim=32, momentum=0.9, momentum_cosine=False)
    objective = MoCoObjective(cfg)
    moco = objective.build()
    images, superpixels = _tiny_batch()
    keys = [p.clone() for p in moco.momentum_encoder.parameters()]
    for _ in range(3):  # three micro-batches of one step: no EMA yet
        objective.loss(moco, {"images": images, "superpixels": superpixels}, 0.0)[0].backward()
    assert all(torch.equal(a, b) for a, b in zip(keys, moco.momentum_encoder.parameters()))
    torch.optim.SGD([p for p in moco.parameters() if p.requires_grad], lr=1.0).step()
    objective.after_step(moco, 0.1)
    for key, base, now in zip(keys, moco.base_encoder.parameters(), moco.momentum_encoder.parameters()):
        assert torch.allclose(now, 0.9 * key + 0.1 * base.detach())  # exactly one EMA update


def test_cooldown_epochs_train_at_the_floor_after_the_schedule():
    deit = load_config(TrainConfig, str(CONFIGS / "deit_cast_small_in1k.yaml"))
    assert deit.total_epochs == 310  # DeiT/timm: 300 scheduled + 10 cooldown epochs
    epoch = 1000  # samples per epoch
    total, warmup = 300 * epoch, 5 * epoch
    assert lr_at(total - epoch, total, warmup, 1e-3, deit.schedule) > deit.schedule.min_lr
    for seen in (total, total + 5 * epoch, total + 10 * epoch - 1):
        assert lr_at(seen, total, warmup, 1e-3, deit.schedule) == pytest.approx(deit.schedule.min_lr)
    assert moco_momentum(105, 100, MocoConfig()) == pytest.approx(1.0)  # stays at 1, no second cosine
