"""Evaluation of CAST models: kNN on frozen features, segment retrieval, PartImageNet part/whole,
segmentation metrics, reports; every task runs over Ray workers or in one process.

    from cast.eval import KnnTask, LoaderSpec, ModelSpec, RunSettings, run_tasks
    task = KnnTask(ModelSpec("cast_small", "runs/moco"), LoaderSpec(), "s3://b/train", "s3://b/val",
                   features="runs/moco.knn-features")
    (result,) = run_tasks([task], RunSettings(num_workers=8, use_gpu=True))
"""

from cast.eval.distributed import RunSettings, WorkerContext, run_tasks
from cast.eval.features import FeatureBank, Features, extract_features
from cast.eval.knn import knn_accuracy, knn_predict, knn_scores, nearest_neighbours
from cast.eval.model_loading import load_model
from cast.eval.report import format_table
from cast.eval.retrieval import (
    MemoryBank,
    SegmentedImage,
    build_memory_bank,
    cast_segmented_images,
    evaluate_retrieval,
)
from cast.eval.segmentation import (
    IGNORE_INDEX,
    SegmentationMeter,
    boundary_recall,
    class_iou,
    confusion_matrix,
    mean_iou,
)
from cast.eval.tasks import KnnTask, LoaderSpec, ModelSpec, RetrievalTask

__all__ = [
    "IGNORE_INDEX", "FeatureBank", "Features", "KnnTask", "LoaderSpec", "MemoryBank", "ModelSpec",
    "RetrievalTask", "RunSettings", "SegmentationMeter", "SegmentedImage", "WorkerContext", "boundary_recall",
    "build_memory_bank", "cast_segmented_images", "class_iou", "confusion_matrix", "evaluate_retrieval",
    "extract_features", "format_table", "knn_accuracy", "knn_predict", "knn_scores", "load_model",
    "mean_iou", "nearest_neighbours", "run_tasks",
]
