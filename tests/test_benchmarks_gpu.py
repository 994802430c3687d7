"""Argument handling of the GPU benchmarks on a machine without CUDA (the GPU paths skip, exit 0)."""

from pathlib import Path

import pytest
import torch

from benchmarks import gpu
from benchmarks import model as model_bench
from cast.config import load_config
from cast.train.config import TrainConfig

pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU behaviour")


@pytest.mark.parametrize("command", ["bench", "smoke"])
def test_without_cuda_both_skip_with_a_clear_message(command, capsys):
    assert gpu.main([command]) == 0
    assert "no CUDA GPU" in capsys.readouterr().out


@pytest.mark.parametrize("argv", [["bench", "--batch", "0"], ["smoke", "--gpus", "-1"], ["smoke", "--x"], []])
def test_bad_arguments_are_refused(argv):
    with pytest.raises(SystemExit) as exit_info:
        gpu.main(argv)
    assert exit_info.value.code == 2


def test_plans_name_the_runs_and_the_smoke_configs_validate(capsys):
    assert gpu.main(["bench", "--plan", "--batch", "64"]) == 0
    assert "benchmarks.model --device cuda --batch 64 --iters 20 --compile" in capsys.readouterr().out
    assert gpu.main(["smoke", "--plan", "--gpus", "2"]) == 0
    plan = capsys.readouterr().out.splitlines()
    assert len(plan) == 2 and all("ray job submit" in line and "ray.num_workers=2" in line for line in plan)
    config = Path(gpu.REPO) / "jobs" / "configs" / "moco_cast_tiny.yaml"
    for compiled in (False, True):
        cfg = load_config(TrainConfig, str(config), gpu.smoke_overrides("/x", "/runs", 2, compiled, 8))
        cfg.validate()
        assert cfg.model.compile is compiled and cfg.ray.use_gpu and cfg.model.sync_bn
        assert cfg.model_kwargs()["num_tokens"] == 36 and cfg.data.superpixel_params == {"num_segments": 36}


def test_model_benchmark_runs_on_cpu(capsys):
    model_bench.main(["--batch", "2", "--size", "64", "--iters", "1", "--warmup", "0"])
    out = capsys.readouterr().out
    assert "precision=fp32" in out and "CAST-S / ViT-S/16 eager" in out
    assert "graph pooling + segment ops" in out
