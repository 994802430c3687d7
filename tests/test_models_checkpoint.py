"""Released-checkpoint loading: state dicts written in the original key layouts load back exactly."""

import argparse
import re

import pytest
import torch

import cast.models as cm
from cast.models.cast import CAST


def randomise(model: CAST, seed: int = 0) -> CAST:
    """Random values everywhere (parameters and BN statistics), so a wrong key map cannot go unnoticed."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, tensor in model.state_dict().items():
            if tensor.is_floating_point():
                fresh = torch.rand(tensor.shape, generator=gen) + 0.5 if "running_var" in name else None
                tensor.copy_(fresh if fresh is not None else torch.randn(tensor.shape, generator=gen) * 0.05)
    return model


def original_backbone(model: CAST, per_stage_numbering: bool = False) -> dict[str, torch.Tensor]:
    """Our weights written under the original names (cast.py / cast_deit.py / cast_seg.py), spelled out
    independently of the loader: blocks under ``blocks.i`` plus the sliced ``blocksS.i`` aliases, or only
    ``blocksS.j`` (0-based per stage) for cast_seg."""
    starts = (0,) + model.stage_ends[:-1]
    out = {}
    for key, value in model.state_dict().items():
        if key.startswith("stem.proj."):
            out["patch_embed.proj." + key[len("stem.proj.") :]] = value
        elif match := re.match(r"pools\.(\d+)\.(.+)", key):
            out[f"pool{int(match[1]) + 1}.pool_block.{match[2]}"] = value
        elif key.startswith("fusion.norm."):
            out["block_fusion.proj_blocks.0.norm." + key[len("fusion.norm.") :]] = value
        elif key.startswith("fusion.proj."):
            out["block_fusion.proj_blocks.2." + key[len("fusion.proj.") :]] = value
        elif match := re.match(r"blocks\.(\d+)\.(.+)", key):
            index = int(match[1])
            stage = max(s for s, start in enumerate(starts) if start <= index)
            if per_stage_numbering:
                out[f"blocks{stage + 1}.{index - starts[stage]}.{match[2]}"] = value
            else:
                out[key] = value
                out[f"blocks{stage + 1}.{index}.{match[2]}"] = value.clone()
        else:
            out[key] = value
    if model.config.pos_embed == "sincos":
        out["pe_token"] = torch.zeros(1, 1, model.embed_dim)
    return out


def moco_checkpoint(model: CAST) -> dict:
    """A MoCo-v3 ``checkpoint_XXXX.pth.tar``: DDP prefixes, two encoders with projector heads, predictor."""
    dim = model.embed_dim
    projector = {
        "0.weight": torch.randn(32, dim),
        "1.weight": torch.ones(32),
        "1.bias": torch.zeros(32),
        "1.running_mean": torch.zeros(32),
        "1.running_var": torch.ones(32),
        "1.num_batches_tracked": torch.tensor(3),
        "6.weight": torch.randn(16, 32),
    }
    backbone = {k: v for k, v in original_backbone(model).items() if not k.startswith("head.")}
    state = {}
    for encoder in ("base_encoder", "momentum_encoder"):
        state.update({f"module.{encoder}.{k}": v.clone() for k, v in backbone.items()})
        state.update({f"module.{encoder}.head.{k}": v.clone() for k, v in projector.items()})
    state["module.predictor.0.weight"] = torch.randn(32, 16)
    return {
        "epoch": 99,
        "arch": "cast_small",
        "state_dict": state,
        "optimizer": {"state": {}, "param_groups": []},
    }


def assert_same_weights(a: CAST, b: CAST) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for key in sa:
        torch.testing.assert_close(sa[key], sb[key], rtol=0, atol=0, msg=key)


def test_moco_pth_tar_round_trip_through_fsspec(tmp_path):
    source = randomise(cm.create_model("cast_tiny", num_classes=0))
    path = tmp_path / "checkpoint_0099.pth.tar"
    torch.save(moco_checkpoint(source), path)
    target = cm.create_model("cast_tiny", num_classes=0)
    report = cm.load_original_checkpoint(f"file://{path}", target, strict=True)
    assert report.layout == "moco" and report.complete
    assert "pe_token" in report.ignored and any(k.startswith("blocks2.") for k in report.ignored)
    assert_same_weights(source, target)
    assert report.extras["projector"]["0.weight"].shape == (32, source.embed_dim)
    assert set(report.extras["predictor"]) == {"0.weight"}
    torch.testing.assert_close(
        report.extras["momentum_encoder"]["blocks.0.attn.qkv.weight"],
        source.state_dict()["blocks.0.attn.qkv.weight"],
    )


def test_deit_checkpoint_with_args_namespace(tmp_path):
    source = randomise(cm.create_model("cast_tiny", pos_embed="learned", num_classes=7), seed=1)
    path = tmp_path / "best_checkpoint.pth"
    torch.save({"model": original_backbone(source), "args": argparse.Namespace(lr=1e-3), "epoch": 299}, path)
    target = cm.create_model("cast_tiny", pos_embed="learned", num_classes=7)
    report = cm.load_original_checkpoint(str(path), target, strict=True)
    assert report.layout == "deit"
    assert_same_weights(source, target)


def test_linear_probe_and_dense_layouts():
    probe = randomise(cm.create_model("cast_tiny", num_classes=5), seed=2)
    state = {"module." + k: v for k, v in original_backbone(probe).items()}
    target = cm.create_model("cast_tiny", num_classes=5)
    assert (
        cm.load_original_checkpoint({"state_dict": state, "best_acc1": 1.0}, target).layout == "linear_probe"
    )
    assert_same_weights(probe, target)

    dense = randomise(cm.create_model("cast_seg_tiny", depths=(2, 1, 2, 1)), seed=3)
    spml = {
        "embedding_model": {"vit_backbone." + k: v for k, v in original_backbone(dense, True).items()},
        "prediction_model": {"semantic_classifier.0.weight": torch.zeros(1)},
    }
    target = cm.create_model("cast_seg_tiny", depths=(2, 1, 2, 1))
    report = cm.load_original_checkpoint(spml, target, strict=True)
    assert report.layout == "spml" and "semantic_classifier.0.weight" in report.extras["classifier"]
    assert_same_weights(dense, target)


def test_report_names_missing_unexpected_and_resized_keys():
    source = randomise(cm.create_model("cast_tiny", num_classes=0), seed=4)
    state = original_backbone(source)
    del state["pool2.pool_block.fc1.1.weight"]
    state["mystery.weight"] = torch.zeros(3)
    state["pos_embed"] = torch.randn(1, 16, source.embed_dim)  # a 4x4 table for an 8x8 grid
    target = cm.create_model("cast_tiny", num_classes=0)
    report = cm.load_original_checkpoint(state, target)
    assert report.missing == ["pools.1.fc1.1.weight"]
    assert report.unexpected == ["mystery.weight"]
    assert report.resized and target.pos_embed.shape == (1, 64, source.embed_dim)
    with pytest.raises(ValueError, match="incomplete load"):
        cm.load_original_checkpoint(state, target, strict=True)
    with pytest.raises(ValueError, match="unrecognised checkpoint layout"):
        cm.load_original_checkpoint({"weird": 1}, target)
