"""Dense CAST: decoders over superpixel tokens, and initialisation from every checkpoint a user has
(released Segmenter/DeiT and COCO MoCo layouts, our own runs) with position tables resized."""

from __future__ import annotations

from pathlib import Path

import torch

import cast.models as cm
from cast.eval.model_loading import load_backbone
from cast.models.decoders import DenseSegmenter, build_decoder
from tests.test_models_checkpoint import moco_checkpoint, original_backbone, randomise

TINY = dict(embed_dim=64, num_heads=2)


def grid_superpixels(batch: int, size: int, cell: int = 8) -> torch.Tensor:
    side = size // cell
    labels = torch.arange(side * side).view(side, side).repeat_interleave(cell, 0).repeat_interleave(cell, 1)
    return labels.expand(batch, -1, -1).contiguous()


def dense(size: int = 128, **options) -> cm.CAST:
    return cm.create_model("cast_seg_tiny", img_size=size, **TINY, **options)


def backbone_equal(source: cm.CAST, target: cm.CAST) -> list[str]:
    """Names of the backbone tensors (blocks, stem, pools) that differ between the two models."""
    ours = target.state_dict()
    return [k for k, v in source.state_dict().items()
            if k.startswith(("blocks.", "stem.", "pools.", "cls_token")) and not torch.equal(v, ours[k])]


def test_segmenter_and_deit_layouts_load_into_a_bigger_dense_model():
    deit = randomise(cm.create_model("cast_tiny", img_size=64, pos_embed="learned", num_classes=5, **TINY))
    backbone = original_backbone(deit)
    for checkpoint in ({"model": backbone},  # DeiT best_checkpoint.pth (with its 5-class head and norm)
                       {"model": {**{f"encoder.{k}": v for k, v in backbone.items()},
                                  "decoder.cls_emb": torch.zeros(1, 3, 64)}}):  # a Segmenter checkpoint
        model = dense(pos_embed="learned")
        description = load_backbone(checkpoint, model, new=("fusion.",))
        assert backbone_equal(deit, model) == []
        assert "pos_embed (1, 65, 64) -> (1, 257, 64)" in description  # 8x8 grid + cls -> 16x16 + cls
        assert "new (freshly initialised)" in description and "['fusion']" in description
        assert torch.allclose(model.pos_embed[0, 0], deit.pos_embed[0, 0])  # the cls row is kept


def test_coco_moco_layout_and_our_moco_run_load_with_a_resized_sincos_table():
    pretrain = randomise(cm.create_model("cast_seg_tiny_pretrain", img_size=64, **TINY))
    model = dense()
    description = load_backbone(moco_checkpoint(pretrain), model)
    assert backbone_equal(pretrain, model) == [] and "resized" in description
    assert torch.equal(model.fusion.proj.weight, pretrain.fusion.proj.weight)  # COCO model has the fusion
    # our MoCo run (base_encoder.* in our names) of a classification model at 64 px: fusion is new
    ours = randomise(cm.create_model("cast_tiny", img_size=64, **TINY))
    state = {"model": {f"base_encoder.{k}": v for k, v in ours.state_dict().items()}}
    model = dense()
    description = load_backbone(state, model, new=("fusion.",))
    assert backbone_equal(ours, model) == [] and "pos_embed (1, 64, 64) -> (1, 256, 64)" in description
    grid = ours.pos_embed[0].T.reshape(1, 64, 8, 8)  # independent check: torch's bicubic upsampling
    expected = torch.nn.functional.interpolate(grid, size=(16, 16), mode="bicubic", align_corners=False)
    assert torch.allclose(model.pos_embed[0], expected.reshape(64, 256).T, atol=1e-5)


def test_decoders_paint_superpixel_scores_and_train_every_parameter():
    torch.manual_seed(0)
    images, superpixels = torch.randn(2, 3, 64, 64), grid_superpixels(2, 64)
    for name in ("mask_transformer", "softmax"):
        model = DenseSegmenter(dense(64), build_decoder(name, 4, 64)).train()
        logits = model(images, superpixels)
        assert logits.shape == (2, 4, 64, 64)
        assert torch.equal(logits[:, :, :8, :8], logits[:, :, :1, :1].expand(-1, -1, 8, 8))  # one superpixel
        target = torch.randint(0, 4, (2, 64, 64))
        target[:, :4] = 255
        torch.nn.functional.cross_entropy(logits, target, ignore_index=255).backward()
        unused = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
        assert unused == []  # DDP needs no find_unused_parameters


def test_segmentation_objective_starts_from_our_run_folder(tmp_path):
    """segmentation.pretrained = one of our MoCo runs (a run folder): backbone loaded at the new size,
    block fusion and decoder fresh, and a loss that CE over the painted scores gives."""
    from cast.artifacts import COMPLETE_MARKER, write_checkpoint
    from cast.config import load_config
    from cast.train.config import TrainConfig
    from cast.train.objectives import SegmentationObjective

    ours = randomise(cm.create_model("cast_tiny", img_size=64))
    folder = tmp_path / "moco-run" / "checkpoint_epoch0001_step000000004"
    folder.mkdir(parents=True)
    state = {"model": {f"base_encoder.{k}": v for k, v in ours.state_dict().items()}}
    write_checkpoint(str(folder), state, "")
    (folder / COMPLETE_MARKER).write_text("ok\n")
    config = Path(__file__).resolve().parents[1] / "jobs/configs/seg_cast_tiny.yaml"
    cfg = load_config(TrainConfig, str(config),
                      ["data.shards=/d", f"segmentation.pretrained={tmp_path / 'moco-run'}",
                       "segmentation.num_classes=3", "model.kwargs={img_size: 128}"])
    objective = SegmentationObjective(cfg)
    model = objective.build()
    assert backbone_equal(ours, model.encoder) == []
    batch = {"images": torch.randn(2, 1, 3, 128, 128), "superpixels": grid_superpixels(2, 128)[:, None],
             "mask": torch.randint(0, 3, (2, 128, 128))}
    loss, _ = objective.loss(model.train(), batch, 0.0)
    assert torch.isfinite(loss) and loss.requires_grad
