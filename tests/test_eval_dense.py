"""Sliding-window inference as the segmentation recipes evaluate, and SPML's parameter groups."""

from __future__ import annotations

import torch

import cast.models as cm
from cast.eval.dense import predict_logits, sliding_logits, window_starts
from cast.models.decoders import DenseSegmenter, build_decoder
from cast.superpixels import get_provider
from cast.train.config import SegmentationConfig
from cast.train.objectives import segmentation_param_groups


class NoSuperpixels:
    def batch(self, images01):
        return torch.zeros(images01.shape[0], *images01.shape[-2:], dtype=torch.int64)


def window_mean(images, superpixels):
    """Every pixel gets the mean of channel 0 over its window: windows differ, pixels of one do not."""
    return images[:, :1].mean(dim=(2, 3), keepdim=True).expand(-1, 2, *images.shape[-2:])


def test_window_offsets_cover_the_image_and_stay_inside():
    assert window_starts(20, 8, 4) == [0, 4, 8, 12]
    assert window_starts(18, 8, 8) == [0, 8, 10]  # the last window is shifted back inside (mmseg)
    assert window_starts(6, 8, 4) == [0]


def test_overlapping_windows_are_averaged():
    images = torch.arange(16.0).expand(1, 3, 8, 16).contiguous()  # channel 0 = column index
    logits = sliding_logits(window_mean, images, NoSuperpixels(), window=8, stride=4, num_classes=2)
    means = {0: 3.5, 4: 7.5, 8: 11.5}  # window left edge -> its mean column
    expected = torch.tensor([sum(m for left, m in means.items() if left <= c < left + 8)
                             / sum(1 for left in means if left <= c < left + 8) for c in range(16)])
    assert torch.allclose(logits[0, 0, 0], expected) and torch.allclose(logits[0, 1], logits[0, 0])
    assert logits[0, 0, 0, 5] == 5.5  # covered by the windows at 0 and 4


def test_a_window_covering_the_image_equals_whole_image_inference():
    torch.manual_seed(0)
    model = DenseSegmenter(cm.create_model("cast_seg_tiny", img_size=64, embed_dim=64, num_heads=2),
                           build_decoder("mask_transformer", 3, 64)).eval()
    provider = get_provider("seeds_fast", num_superpixels=64)
    images = torch.randn(1, 3, 56, 72)
    with torch.no_grad():
        whole = sliding_logits(model, images, provider, window=0, stride=0, num_classes=3)
        covering = sliding_logits(model, images, provider, window=80, stride=40, num_classes=3)
        resized = predict_logits(model, images, provider, size=64, resize="short", window=64, stride=32,
                                 num_classes=3)
    assert whole.shape == (1, 3, 56, 72) and torch.equal(whole, covering)
    assert resized.shape == (1, 3, 56, 72)  # scored at short side 64, returned at the original size


def test_spml_parameter_groups():
    model = DenseSegmenter(cm.create_model("cast_seg_tiny", img_size=64), build_decoder("softmax", 3, 192))
    cfg = SegmentationConfig(bias_lr_mult=2.0, head_lr_mult=10.0, head_bias_lr_mult=20.0, bias_decay=False)
    made = segmentation_param_groups(model, cfg, 1e-4)
    groups = {(g["lr_scale"], g["weight_decay"]): g["params"] for g in made}
    assert set(groups) == {(1.0, 1e-4), (2.0, 0.0), (10.0, 1e-4), (20.0, 0.0)}
    assert any(p is model.decoder.classifier.bias for p in groups[(20.0, 0.0)])
    assert any(p is model.encoder.fusion.proj.weight for p in groups[(1.0, 1e-4)])
    trainable = sum(1 for p in model.parameters() if p.requires_grad)
    assert sum(len(v) for v in groups.values()) == trainable


def test_segmentation_job_scores_a_checkpoint_and_writes_overlays(tmp_path):
    """jobs.evaluate --task segmentation on real pasted shards: the dataset mIoU of the job equals
    torchmetrics' on the model's whole-image predictions, per-class IoU named by the manifest, overlays."""
    import json

    import numpy as np
    from torchmetrics.classification import MulticlassJaccardIndex

    import jobs.evaluate as job
    from cast.artifacts import write_checkpoint
    from cast.data import DataConfig, build_loader
    from cast.data.transforms import denormalize, to_input
    from data_tools.make_shards import build_shards
    from data_tools.sample_data import pasted_segmentation

    src = pasted_segmentation(tmp_path / "src", train=0, val=4, size=64, num_classes=2)
    build_shards(str(src), str(tmp_path / "val"), "voc", name="val",
                 split_list="ImageSets/Segmentation/val.txt", progress=False)
    torch.manual_seed(1)
    model = DenseSegmenter(cm.create_model("cast_seg_tiny", img_size=64), build_decoder("softmax", 3, 192))
    folder = tmp_path / "run" / "best"
    folder.mkdir(parents=True)
    write_checkpoint(str(folder), {"model": model.state_dict()}, "")
    code = job.main(["--task", "segmentation", "--checkpoint", str(folder), "--model", "cast_seg_tiny",
                     "--model-arg", "img_size=64", "--decoder", "softmax",
                     "--seg-eval-shards", str(tmp_path / "val"), "--size", "64",
                     "--superpixels", "seeds_fast",
                     "--superpixel-param", "num_superpixels=64",
                     "--loader-workers", "0", "--device", "cpu", "--no-progress"])
    assert code == 0
    report = json.loads((tmp_path / "run" / "best.segmentation.json").read_text())
    assert list(report["class_iou"]) == ["background", "t-shirt", "trouser"] and report["images"] == 4
    provider = get_provider("seeds_fast", num_superpixels=64)
    metric = MulticlassJaccardIndex(3, average="none", ignore_index=255)
    model.eval()
    cfg = DataConfig(shards=str(tmp_path / "val"), recipe="segmentation_eval", batch_size=1, num_workers=0,
                     shuffle=False, drop_remainder=False, superpixels="")
    with torch.no_grad():
        for batch in build_loader(cfg, rank=0, world_size=1, epoch=0):
            images = to_input(batch["images"][:, 0])  # uint8 as loaded; 64 px: no resize, one window
            logits = model(images, provider.batch(denormalize(images)).long())
            metric.update(logits.argmax(1), batch["mask"])
    expected = metric.compute().tolist()
    ours = list(report["class_iou"].values())
    assert all(v is None or abs(v - e) < 1e-6 for v, e in zip(ours, expected)) and any(v for v in ours)
    assert abs(report["miou"] - np.mean([v for v in ours if v is not None])) < 1e-9
    overlays = sorted((tmp_path / "run").glob("best.segmentation-overlays/*.png"))
    assert len(overlays) == 4 and report["overlays"]
