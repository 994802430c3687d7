"""jobs.export: a checkpoint folder of ours, as training saves it, written in the original DeiT / MoCo layouts
and read back by ``load_original_checkpoint`` into a fresh model, tensor for tensor."""

import shutil

import pytest
import torch

import cast.models as cm
from cast.artifacts import COMPLETE_MARKER
from cast.config import dump_config, load_config
from cast.models.original_checkpoint import backbone_to_original
from cast.train.checkpoint import TrainState
from cast.train.config import TrainConfig
from cast.train.objectives import build_objective
from jobs.export import export_checkpoint, main
from tests import test_models_checkpoint as reference  # the key layout spelled out apart from the loader


def saved_run(tmp_path, overrides: list[str], ema_seed: int | None = None, name: str = "best"):
    """``<tmp>/run/<name>``: a complete checkpoint folder written by ``TrainState.save`` (state.pt with model,
    optimizer, position, rng, the objective's EMA; config.yaml) of a randomised model; returns (folder,
    objective, module)."""
    cfg = load_config(TrainConfig, None, ["model.name=cast_tiny", *overrides])
    objective = build_objective(cfg)
    module = reference.randomise(objective.build())
    objective.setup(module)
    if ema_seed is not None:
        reference.randomise(objective.ema.module, seed=ema_seed)
    optimizer = torch.optim.SGD(module.parameters(), lr=0.1)
    state = TrainState(module, optimizer, objective, rank=0, world_size=1, seed=0,
                       config_yaml=dump_config(cfg))
    state.position.epoch = 7
    best = tmp_path / "run" / name
    best.parent.mkdir()
    shutil.move(state.save(), best)
    (best / COMPLETE_MARKER).write_text("ok\n")
    return best, objective, module


def test_deit_export_of_the_ema_and_raw_weights_round_trips(tmp_path, capsys):
    overrides = ["objective=supervised", "model.kwargs={pos_embed: learned}", "supervised.num_classes=7",
                 "supervised.ema_decay=0.99"]
    best, objective, module = saved_run(tmp_path, overrides, ema_seed=1)
    out = tmp_path / "best_checkpoint.pth"
    # the command line of the README, in this process (a fresh interpreter would cost ~7 s of imports)
    assert main(["--checkpoint", str(best), "--layout", "deit", "--out", str(out), "--weights", "ema"]) == 0
    assert "ema weights of epoch 7" in capsys.readouterr().out
    missing = str(tmp_path / "no-run")
    assert main(["--checkpoint", missing, "--layout", "deit", "--out", str(tmp_path / "x.pth")]) == 2
    assert f"{missing}: no such checkpoint or run folder" in capsys.readouterr().err

    exported = torch.load(out, map_location="cpu", weights_only=True)
    assert set(exported) == {"model", "model_ema", "epoch", "arch"} and exported["epoch"] == 7
    for key, value in exported["model_ema"].items():  # DeiT's own copy of the EMA, as the chosen weights here
        torch.testing.assert_close(value, exported["model"][key], rtol=0, atol=0, msg=key)
    # the original cast_deit state_dict keys: blocks.i and sliced aliases blocksS.i, patch_embed, pool{L}
    assert set(exported["model"]) == set(reference.original_backbone(objective.ema.module))
    for weights, source in (("ema", objective.ema.module), ("raw", module)):
        fresh = cm.create_model("cast_tiny", pos_embed="learned", num_classes=7)
        checkpoint = exported if weights == "ema" else export_checkpoint(str(best), "deit")
        report = cm.load_original_checkpoint(checkpoint, fresh, strict=True)
        assert report.layout == "deit" and not report.missing and not report.unexpected
        reference.assert_same_weights(source, fresh)
    with pytest.raises(AssertionError):  # the two exports really differ
        reference.assert_same_weights(objective.ema.module, module)


def test_moco_export_round_trips_both_encoders_projector_and_predictor(tmp_path):
    overrides = ["objective=moco", "moco.mlp_dim=32", "moco.dim=16"]
    best, _, module = saved_run(tmp_path, overrides, name="checkpoint_epoch0007_step000000070")
    exported = export_checkpoint(str(tmp_path / "run"), "moco")  # the run folder: its newest checkpoint
    encoder = module.base_encoder
    backbone = {k for k in reference.original_backbone(encoder) if not k.startswith("head.")}
    ours = module.state_dict()
    expected = {f"module.{part}.{k}" for part in ("base_encoder", "momentum_encoder") for k in backbone}
    expected |= {f"module.{k}" for k in ours if k.startswith(("base_encoder.head.", "momentum_encoder.head.",
                                                               "predictor."))}
    assert set(exported["state_dict"]) == expected and exported["arch"] == "cast_tiny"

    fresh = cm.create_model("cast_tiny", num_classes=0)
    report = cm.load_original_checkpoint(exported, fresh, strict=True)
    assert report.layout == "moco" and not report.missing
    own = fresh.state_dict()
    for key, value in encoder.state_dict().items():
        if key.startswith("head."):
            torch.testing.assert_close(report.extras["projector"][key[5:]], value, rtol=0, atol=0)
        else:
            torch.testing.assert_close(own[key], value, rtol=0, atol=0, msg=key)
    for key, value in module.momentum_encoder.state_dict().items():
        if not key.startswith("head."):
            torch.testing.assert_close(report.extras["momentum_encoder"][key], value, rtol=0, atol=0)
    assert report.extras["predictor"].keys() == {k[10:] for k in ours if k.startswith("predictor.")}

    with pytest.raises(ValueError, match=r"step000000070: holds no EMA weights"):
        export_checkpoint(str(best), "moco", weights="ema")
    with pytest.raises(ValueError, match=r"moco run of cast_tiny.*use layout 'moco'"):
        export_checkpoint(str(best), "deit")


def test_fused_models_export_per_stage_block_numbering():
    """cast_seg's layout (no blocks.i, blocksS.j from 0 per stage, block_fusion) from the same table."""
    source = reference.randomise(cm.create_model("cast_seg_tiny"), seed=2)
    exported = backbone_to_original(source.state_dict(), source)
    assert set(exported) == set(reference.original_backbone(source, per_stage_numbering=True))
    fresh = cm.create_model("cast_seg_tiny")
    assert cm.load_original_checkpoint(exported, fresh, strict=True).layout == "state_dict"
    reference.assert_same_weights(source, fresh)
