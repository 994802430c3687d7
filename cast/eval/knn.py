"""Weighted k-nearest-neighbour classification of frozen features (the InstDisc / DINO protocol).

Features are L2-normalised, so the dot product is the cosine similarity. Each of a test sample's ``k``
nearest training samples votes for its label with weight ``exp(similarity / temperature)``; the class
with the largest summed weight wins (ties go to the lower class index). Weights are computed relative to
the nearest neighbour's (a common factor per sample), so small temperatures cannot overflow.

Top-k runs in blocks (``nearest_neighbours``): ``query_block`` test rows against ``bank_block`` bank rows
at a time, keeping a running top-k, so the largest temporary is a ``query_block x bank_block``
similarity tile whatever the bank size (1.28M ImageNet features included). The bank is normalised in
place when the caller allows it (``normalised=True`` says it already is), so it is never held twice.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

DEFAULT_K = 20
DEFAULT_TEMPERATURE = 0.07
QUERY_BLOCK = 1024
BANK_BLOCK = 65536


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
def nearest_neighbours(bank: torch.Tensor, queries: torch.Tensor, k: int,
                       bank_block: int = BANK_BLOCK) -> tuple[torch.Tensor, torch.Tensor]:
    """(similarities, bank indices), each [Q, k] in descending similarity, of unit-norm ``queries``
    against the unit-norm ``bank``, computed ``bank_block`` bank rows at a time (ties: lower index)."""
    best_sim = queries.new_full((queries.shape[0], 0), float("-inf"))
    best_index = torch.zeros((queries.shape[0], 0), dtype=torch.long, device=queries.device)
    for start in range(0, bank.shape[0], bank_block):
        block = bank[start:start + bank_block]
        similarity = queries @ block.T
        sim, index = similarity.topk(min(k, block.shape[0]), dim=1)
        # candidates in index order (earlier blocks first), so a stable sort keeps ties at the lower index
        best_sim, order = torch.cat([best_sim, sim], dim=1).sort(dim=1, descending=True, stable=True)
        best_index = torch.cat([best_index, index + start], dim=1).gather(1, order)
        best_sim, best_index = best_sim[:, :k], best_index[:, :k]
    return best_sim, best_index


def normalise_rows_(features: torch.Tensor) -> torch.Tensor:
    """L2-normalise the rows of a float tensor in place (no second copy of a large bank)."""
    return features.div_(features.norm(dim=1, keepdim=True).clamp_min_(1e-12))


@torch.no_grad()
def knn_scores(
    train_features: torch.Tensor,
    train_labels: torch.Tensor,
    test_features: torch.Tensor,
    num_classes: int,
    k: int = DEFAULT_K,
    temperature: float = DEFAULT_TEMPERATURE,
    query_block: int = QUERY_BLOCK,
    bank_block: int = BANK_BLOCK,
    normalised: bool = False,
) -> torch.Tensor:
    """Summed vote weights per class, float [N_test, num_classes], scaled so the nearest neighbour weighs
    1. The bank stays where it is (put it on the GPU to score there); ``normalised=True`` when its rows
    already have unit norm (``FeatureBank``), else a normalised float32 copy is made."""
    _check(train_features, train_labels, test_features, num_classes, k)
    train = train_features if normalised else F.normalize(train_features.float(), dim=1)
    labels = train_labels.to(train.device).long()
    scores = []
    for start in range(0, test_features.shape[0], query_block):
        test = F.normalize(test_features[start:start + query_block].float().to(train.device), dim=1)
        similarity, neighbours = nearest_neighbours(train, test, k, bank_block)
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


def top_hits(scores: torch.Tensor, labels: torch.Tensor) -> tuple[int, int]:
    """(top-1 hits, top-5 hits) of per-class ``scores`` [N, C] against true ``labels`` [N]."""
    truth = labels.to(scores.device).long()[:, None]
    ranked = scores.argsort(dim=1, descending=True, stable=True)
    return int((ranked[:, :1] == truth).any(dim=1).sum()), int((ranked[:, :5] == truth).any(dim=1).sum())


def knn_accuracy(
    train_features: torch.Tensor,
    train_labels: torch.Tensor,
    test_features: torch.Tensor,
    test_labels: torch.Tensor,
    num_classes: int,
    k: int = DEFAULT_K,
    temperature: float = DEFAULT_TEMPERATURE,
    **blocks,
) -> dict[str, float]:
    """Top-1 and top-5 accuracy (in %) of the weighted vote, plus the settings used."""
    if test_labels.shape != (test_features.shape[0],):
        raise ValueError(f"knn: test labels {tuple(test_labels.shape)} do not match "
                         f"{test_features.shape[0]} test features")
    scores = knn_scores(train_features, train_labels, test_features, num_classes, k, temperature, **blocks)
    top1, top5 = top_hits(scores, test_labels)
    return knn_summary(top1, top5, k, temperature, train_features.shape[0], test_features.shape[0])


def knn_summary(top1_hits: int, top5_hits: int, k: int, temperature: float, train_samples: int,
                test_samples: int) -> dict:
    """The JSON record of a kNN evaluation from hit counts (summed over workers when distributed)."""
    scale = 100.0 / max(test_samples, 1)
    return {"top1": top1_hits * scale, "top5": top5_hits * scale, "k": k, "temperature": temperature,
            "train_samples": int(train_samples), "test_samples": int(test_samples)}
