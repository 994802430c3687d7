"""The GPU step's precision rule and training knobs, exercised on the CPU (autocast supports fp16 there)."""

from pathlib import Path

import pytest
import torch

from cast.artifacts import latest_checkpoint, read_state
from cast.config import load_config
from cast.precision import resolve
from cast.train.config import TrainConfig
from cast.train.driver import fit
from data_tools.make_shards import build_shards
from tests.fixtures.datasets import make_imagefolder

CONFIGS = Path(__file__).resolve().parents[1] / "jobs" / "configs"


def test_precision_rule_and_fp16_loss_scaling_on_cpu():
    assert resolve("cpu").name == "fp32" and not resolve("cpu").grad_scaler().is_enabled()
    assert resolve("cuda", enabled=False).name == "fp32"
    with pytest.raises(ValueError, match="precision"):
        resolve("cpu", "fp8")
    fp16 = resolve("cpu", "fp16")
    assert fp16.metrics() == {"precision_bf16": 0, "precision_fp16": 1}
    weight = torch.nn.Parameter(torch.ones(4))
    optimizer = torch.optim.SGD([weight], lr=0.1)
    scaler = fp16.grad_scaler()
    with fp16.autocast():
        loss = (torch.ones(4, 4) @ weight.unsqueeze(1)).sum()  # a matmul: runs in fp16 under autocast
    assert loss.dtype == torch.float16
    scaler.scale(loss * 1e4).backward()  # the scaled gradient overflows fp16's range ...
    scaler.step(optimizer)
    scaler.update()
    assert torch.equal(weight.detach(), torch.ones(4)) and scaler.get_scale() == 2.0**15  # ... step skipped
    optimizer.zero_grad()
    with fp16.autocast():
        loss = (torch.ones(4, 4) @ weight.unsqueeze(1)).sum()
    scaler.scale(loss * 1e-3).backward()  # fits at 2^15: gradient 4e-3 per weight once unscaled
    scaler.step(optimizer)
    torch.testing.assert_close(weight.detach(), torch.full((4,), 1 - 0.1 * 4e-3), rtol=1e-3, atol=1e-6)


def test_a_run_in_fp16_with_a_token_budget_states_its_precision(ray_driver, tmp_path):
    make_imagefolder(tmp_path / "src", num_classes=2, per_class=4, size=64)
    build_shards(str(tmp_path / "src"), str(tmp_path / "shards"), "imagefolder", max_count=4, progress=False)
    cfg = load_config(TrainConfig, str(CONFIGS / "supervised_cast_tiny.yaml"), [
        f"data.shards={tmp_path / 'shards'}", "data.recipe=eval", "data.batch_size=8", "data.num_workers=0",
        "data.max_superpixels=64", "model.kwargs={img_size: 64}", "model.precision=fp16",
        "supervised.mixup_alpha=0.0", "supervised.cutmix_alpha=0.0", "schedule.epochs=1",
        "schedule.warmup_epochs=0", f"ray.storage_path={tmp_path / 'runs'}", "ray.name=fp16",
        "ray.num_workers=1", "logging.tensorboard=false",
    ])
    result = fit(cfg)
    assert result.metrics["precision_fp16"] == 1 and result.metrics["precision_bf16"] == 0
    assert 0 < result.metrics["grad_scale"] <= 2.0**16
    state = read_state(latest_checkpoint(str(tmp_path / "runs" / "fp16")))["model"]
    assert all(torch.isfinite(v).all() for v in state.values() if v.is_floating_point())


def test_compile_encoders_compiles_both_moco_encoders_in_place():
    import timm

    from cast.train.config import MocoConfig
    from cast.train.objectives import MoCo, compile_encoders

    moco = MoCo(timm.create_model("cast_tiny", num_classes=0), MocoConfig(dim=16, mlp_dim=32))
    keys = list(moco.state_dict())
    assert compile_encoders(moco) == 2
    assert list(moco.state_dict()) == keys  # checkpoints keep their layout
    assert moco.base_encoder._compiled_call_impl is not None and moco.predictor._compiled_call_impl is None
