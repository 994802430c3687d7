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
