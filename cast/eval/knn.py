"""Weighted k-nearest-neighbour classification of frozen features (the InstDisc / DINO protocol).

Features are L2-normalised, so the dot product is the cosine similarity. Each of a test sample's ``k``
nearest training samples votes for its label with weight ``exp(similarity / temperature)``; the class
with the largest summed weight wins (ties go to the lower class index). Weights are computed relative to
the nearest neighbour's (a common factor per sample), so small temperatures cannot overflow.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

DEFAULT_K = 20
DEFAULT_TEMPERATURE = 0.07


def _check(train_features: torch.Tensor, train_labels: torch.Tensor, test_features: torch.Tensor,
           num_classes: int, k: int) -> None:
    if train_features.dim() != 2 or test_features.dim() != 2 or (
            train_features.shape[1] != test_features.shape[1]):
        raise ValueError(f"knn: features must be [N, D] with the same D, got train "
                         f"{tuple(train_features.shape)} and test {tuple(test_features.shape)}")
    if train_labels.shape != (train_features.shape[0],):
        raise ValueError(f"knn: train labels {tuple(train_labels.shape)} do not match "
                         f"{train_features.shape[0]} train features")
    if train_labels.numel() and (int(train_labels.min()) < 0 or int(train_labels.max()) >= num_classes):
        raise ValueError(f"knn: train labels must lie in 0..{num_classes - 1} (unlabelled samples have -1), "
                         f"got {int(train_labels.min())}..{int(train_labels.max())}")
    if not 1 <= k <= train_features.shape[0]:
        raise ValueError(f"knn: k={k} must be between 1 and the {train_features.shape[0]} train samples")


@torch.no_grad()
def knn_scores(
    train_features: torch.Tensor,
    train_labels: torch.Tensor,
    test_features: torch.Tensor,
    num_classes: int,
    k: int = DEFAULT_K,
    temperature: float = DEFAULT_TEMPERATURE,
    chunk_size: int = 1024,
) -> torch.Tensor:
    """Summed vote weights per class, float [N_test, num_classes], scaled so the nearest neighbour weighs
    1 (test samples go in chunks to bound memory)."""
    _check(train_features, train_labels, test_features, num_classes, k)
    train = F.normalize(train_features.float(), dim=1)
    labels = train_labels.to(train.device).long()
    scores = []
    for start in range(0, test_features.shape[0], chunk_size):
        test = F.normalize(test_features[start:start + chunk_size].float().to(train.device), dim=1)
        similarity, neighbours = (test @ train.T).topk(k, dim=1)
        weights = ((similarity - similarity[:, :1]) / temperature).exp()
        votes = torch.zeros(test.shape[0], num_classes, device=train.device, dtype=weights.dtype)
        votes.scatter_add_(1, labels[neighbours], weights)
        scores.append(votes)
    if not scores:
        return torch.zeros(0, num_classes)
    return torch.cat(scores)


def knn_predict(train_features, train_labels, test_features, num_classes: int, k: int = DEFAULT_K,
                temperature: float = DEFAULT_TEMPERATURE) -> torch.Tensor:
    """Predicted class per test sample (int64 [N_test])."""
    return knn_scores(train_features, train_labels, test_features, num_classes, k, temperature).argmax(dim=1)


def knn_accuracy(
    train_features: torch.Tensor,
    train_labels: torch.Tensor,
    test_features: torch.Tensor,
    test_labels: torch.Tensor,
    num_classes: int,
    k: int = DEFAULT_K,
    temperature: float = DEFAULT_TEMPERATURE,
) -> dict[str, float]:
    """Top-1 and top-5 accuracy (in %) of the weighted vote, plus the settings used."""
    if test_labels.shape != (test_features.shape[0],):
        raise ValueError(f"knn: test labels {tuple(test_labels.shape)} do not match "
                         f"{test_features.shape[0]} test features")
    scores = knn_scores(train_features, train_labels, test_features, num_classes, k, temperature)
    truth = test_labels.to(scores.device).long()[:, None]
    ranked = scores.argsort(dim=1, descending=True, stable=True)
    top1 = (ranked[:, :1] == truth).any(dim=1).float().mean().item() * 100
    top5 = (ranked[:, :5] == truth).any(dim=1).float().mean().item() * 100
    return {"top1": top1, "top5": top5, "k": k, "temperature": temperature,
            "train_samples": int(train_features.shape[0]), "test_samples": int(test_features.shape[0])}
