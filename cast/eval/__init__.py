"""Evaluation of CAST models: kNN on frozen features, segmentation metrics, segment retrieval, reports.

    from cast.eval import knn_accuracy, extract_features, SegmentationMeter, evaluate_retrieval
"""

from cast.eval.evaluate import EvaluationConfig, evaluate
from cast.eval.features import Features, extract_features
from cast.eval.knn import knn_accuracy, knn_predict, knn_scores
from cast.eval.model_loading import load_model
from cast.eval.report import format_table
from cast.eval.retrieval import (
    MemoryBank,
    SegmentedImage,
    build_memory_bank,
    cast_segmented_images,
    evaluate_retrieval,
    iter_cast_segmented_images,
)
from cast.eval.segmentation import (
    IGNORE_INDEX,
    SegmentationMeter,
    boundary_recall,
    class_iou,
    confusion_matrix,
    mean_iou,
)

__all__ = [
    "IGNORE_INDEX", "EvaluationConfig", "Features", "MemoryBank", "SegmentationMeter", "SegmentedImage",
    "boundary_recall", "build_memory_bank", "cast_segmented_images", "class_iou", "confusion_matrix",
    "evaluate", "evaluate_retrieval", "extract_features", "format_table", "iter_cast_segmented_images",
    "knn_accuracy", "knn_predict", "knn_scores", "load_model", "mean_iou",
]
