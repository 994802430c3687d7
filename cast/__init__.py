"""cast-train: training, evaluation and use of CAST (hierarchical segmentation ViT) on Ray."""

__version__ = "0.1.0"
