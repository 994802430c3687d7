"""Evaluation of CAST models: kNN on frozen features, segmentation metrics, segment retrieval, reports."""
