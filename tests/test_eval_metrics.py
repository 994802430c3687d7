"""Segmentation metrics, kNN votes and reports against values worked out by hand."""

import json
import math

import numpy as np
import pytest
import torch

from cast.artifacts import read_report, report_url, write_report
from cast.eval.knn import knn_accuracy, knn_predict, knn_scores
from cast.eval.report import format_table
from cast.eval.segmentation import (
    SegmentationMeter,
    boundary_recall,
    class_iou,
    confusion_matrix,
    ground_truth_edges,
    mean_iou,
)

# 3 classes, one ignored pixel (255)
TARGET = np.array([[0, 0, 1],
                   [1, 2, 255]])
PRED = np.array([[0, 1, 1],
                 [1, 1, 0]])


def test_confusion_matrix_counts_pairs_and_skips_ignore():
    expected = np.array([[1, 1, 0],   # gt 0: one right, one predicted as 1
                         [0, 2, 0],   # gt 1: both right
                         [0, 1, 0]])  # gt 2: predicted as 1; the ignored pixel (pred 0) is not counted
    np.testing.assert_array_equal(confusion_matrix(PRED, TARGET, 3), expected)
    from_torch = confusion_matrix(torch.from_numpy(PRED), torch.from_numpy(TARGET), 3)
    np.testing.assert_array_equal(from_torch, expected)


def test_iou_by_hand():
    confusion = confusion_matrix(PRED, TARGET, 3)
    # class 0: tp 1, union = 2 (gt) + 1 (pred) - 1 = 2 -> 0.5
    # class 1: tp 2, union = 2 (gt) + 4 (pred) - 2 = 4 -> 0.5; class 2: tp 0, union 1 -> 0
    np.testing.assert_allclose(class_iou(confusion), [0.5, 0.5, 0.0])
    assert mean_iou(confusion) == pytest.approx(1 / 3)


def test_absent_class_is_left_out_of_the_mean():
    confusion = confusion_matrix(np.array([[0, 1]]), np.array([[0, 1]]), 4)
    iou = class_iou(confusion)
    assert iou[:2].tolist() == [1.0, 1.0] and np.isnan(iou[2:]).all()
    assert mean_iou(confusion) == 1.0


def test_out_of_range_labels_are_named():
    with pytest.raises(ValueError, match="target holds label 7"):
        confusion_matrix(np.zeros((2, 2)), np.full((2, 2), 7), 3)
    with pytest.raises(ValueError, match="prediction holds label -1"):
        confusion_matrix(np.full((2, 2), -1), np.zeros((2, 2)), 3)


def test_meter_dataset_and_per_image_miou():
    meter = SegmentationMeter(num_classes=2)
    meter.update(np.array([[0, 0], [1, 1]]), np.array([[0, 0], [1, 1]]))       # perfect: 1.0
    meter.update(np.array([[0, 0], [0, 0]]), np.array([[0, 0], [1, 255]]))     # class 0: 2/3, class 1: 0
    meter.update(np.array([[1]]), np.array([[255]]))                            # nothing valid
    result = meter.result(class_names=["bg", "fg"])
    # per image: (1 + 1) / 2 = 1 and (2/3 + 0) / 2 = 1/3 -> mean 2/3
    assert result["image_miou"] == pytest.approx(2 / 3)
    # dataset confusion [[4, 0], [1, 2]]: IoU bg = 4/5, fg = 2/3
    assert result["class_iou"] == pytest.approx({"bg": 0.8, "fg": 2 / 3})
    assert result["miou"] == pytest.approx((0.8 + 2 / 3) / 2)
    assert result["pixel_accuracy"] == pytest.approx(6 / 7)
    assert (result["images"], result["empty_images"]) == (2, 1)


def test_ground_truth_edges_skip_ignore():
    target = np.array([[0, 0, 1, 1],
                       [0, 0, 255, 1]])
    edges = ground_truth_edges(target)
    expected = np.zeros_like(edges)
    expected[0, 1] = True  # 0 | 1 in row 0; no edge next to the ignored pixel
    np.testing.assert_array_equal(edges, expected)


def test_boundary_recall_by_hand():
    target = np.zeros((8, 8), int)
    target[:, 4:] = 1                # one vertical edge: pixels (r, 3), 8 of them
    exact = target.copy()
    assert boundary_recall(exact, target, tolerance=0) == 1.0
    shifted = np.zeros((8, 8), int)
    shifted[:, 6:] = 1               # predicted border at column 5, two pixels off
    assert boundary_recall(shifted, target, tolerance=1) == 0.0
    assert boundary_recall(shifted, target, tolerance=2) == 1.0
    half = np.zeros((8, 8), int)
    half[:4, 4:] = 1                 # border only in the top half (rows 0-3), plus a horizontal one at row 3
    assert boundary_recall(half, target, tolerance=0) == pytest.approx(4 / 8)
    assert boundary_recall(np.zeros((8, 8), int), np.zeros((8, 8), int)) == 1.0  # no edge to find


def test_meter_boundary_recall_is_averaged_over_images():
    meter = SegmentationMeter(num_classes=2)
    target = np.zeros((8, 8), int)
    target[:, 4:] = 1
    meter.update(target, target, segments=target, tolerance=0)             # recall 1
    meter.update(target, target, segments=np.zeros((8, 8), int), tolerance=0)  # recall 0
    assert meter.result()["boundary_recall"] == pytest.approx(0.5)


def test_knn_weighted_vote_by_hand():
    # train points on the unit circle; test point at angle 0
    angles = torch.tensor([0.1, 0.2, 0.3, 1.4, 1.5])
    train = torch.stack([angles.cos(), angles.sin()], dim=1) * 3  # scale must not matter (normalised)
    labels = torch.tensor([0, 1, 1, 0, 0])
    test = torch.tensor([[1.0, 0.0]])
    scores = knn_scores(train, labels, test, num_classes=2, k=3, temperature=0.5)
    w = ((angles[:3].cos() - angles[0].cos()) / 0.5).exp()  # relative to the nearest neighbour
    torch.testing.assert_close(scores, torch.tensor([[w[0], w[1] + w[2]]]))
    assert scores[0, 0] == 1.0
    assert knn_predict(train, labels, test, num_classes=2, k=3, temperature=0.5).item() == 1
    # A low temperature makes the single nearest neighbour outweigh the two others (and must not overflow).
    assert knn_predict(train, labels, test, num_classes=2, k=3, temperature=0.02).item() == 0
    assert knn_predict(train, labels, test, num_classes=2, k=3, temperature=0.0005).item() == 0
    # k = 5 brings in two far class-0 points; at T = 10 all weights are near equal: 3 votes beat 2.
    assert knn_predict(train, labels, test, num_classes=2, k=5, temperature=10.0).item() == 0


def test_knn_accuracy_top1_top5_and_checks():
    torch.manual_seed(0)
    centres = torch.randn(6, 16) * 5
    train_labels = torch.arange(6).repeat(10)
    train = centres[train_labels] + torch.randn(60, 16)
    test_labels = torch.arange(6).repeat(3)
    test = centres[test_labels] + torch.randn(18, 16)
    result = knn_accuracy(train, train_labels, test, test_labels, num_classes=6, k=20)
    assert result["top1"] == 100.0 and result["top5"] == 100.0
    flipped = knn_accuracy(train, train_labels, test, (test_labels + 1) % 6, num_classes=6, k=20)
    assert flipped["top1"] == 0.0
    with pytest.raises(ValueError, match="train labels must lie in 0..5"):
        knn_accuracy(train, train_labels - 1, test, test_labels, num_classes=6)
    with pytest.raises(ValueError, match="k=61"):
        knn_accuracy(train, train_labels, test, test_labels, num_classes=6, k=61)


def test_report_round_trip_and_table(tmp_path):
    checkpoint = tmp_path / "run" / "checkpoint_000003"
    checkpoint.mkdir(parents=True)
    url = report_url(str(checkpoint) + "/")
    assert url == str(checkpoint) + ".eval.json"
    results = {"knn": {"top1": 51.25, "k": 20}, "segmentation": {"miou": float("nan")}}
    write_report(results, url)
    assert json.loads(open(url).read()) == {"knn": {"top1": 51.25, "k": 20}, "segmentation": {"miou": None}}
    assert read_report(url)["knn"]["top1"] == 51.25
    assert read_report(str(tmp_path / "missing.json")) is None
    assert not list(tmp_path.glob("run/*.partial"))
    table = format_table(results, title="eval")
    assert "knn.top1" in table and "51.25" in table and "segmentation.miou" in table
    assert math.isnan(results["segmentation"]["miou"])  # the caller's dict is untouched
