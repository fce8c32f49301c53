"""Judging the learned features: extraction and the weighted kNN classifier.

The kNN monitor is the one of Wu et al. 2018 used by the MoCo CIFAR-10 demo: the normalised
features of the training images are the memory, each test image votes with its k nearest
neighbours (cosine similarity), each vote weighted by exp(similarity / T).
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader


@torch.no_grad()
def extract_features(
    model: nn.Module, loader: DataLoader, device: torch.device, batch_stats: bool = False
) -> tuple[Tensor, Tensor]:
    """Run ``model`` over ``loader``, in eval mode unless ``batch_stats``.

    ``batch_stats=True`` keeps BatchNorm on batch statistics, as when the model makes keys during
    training (the memory bank's refresh must match the keys it stands in for).

    Returns:
        (features (N, F) float32 and L2-normalised, labels (N,) int64), on ``device``, in loader order.
    """
    was_training = model.training
    model.train(batch_stats)
    autocast = (
        torch.autocast(device_type="cuda", dtype=torch.bfloat16) if device.type == "cuda" else contextlib.nullcontext()
    )
    feats, labels = [], []
    try:
        for images, targets, _ in loader:
            with autocast:
                out = model(images.to(device, non_blocking=True))
            feats.append(F.normalize(out.float(), dim=1))
            labels.append(targets.to(device))
    finally:
        model.train(was_training)
    return torch.cat(feats), torch.cat(labels)


@torch.no_grad()
def knn_predict(
    query: Tensor,
    memory: Tensor,
    memory_labels: Tensor,
    num_classes: int,
    k: int = 200,
    temperature: float = 0.1,
    chunk_size: int = 1024,
) -> Tensor:
    """Weighted kNN class scores.

    Args:
        query: (Q, F) normalised features to classify.
        memory: (N, F) normalised features of the labelled memory.
        memory_labels: (N,) int64 class of each memory item.
        num_classes: C.
        k: neighbours per query (capped at N).
        temperature: T of the vote weights exp(sim / T).
        chunk_size: queries per block, so the (chunk, N) similarity matrix bounds the memory.

    Returns:
        (Q, C) scores; ``argmax`` is the prediction.
    """
    k = min(k, memory.shape[0])
    scores = []
    for block in query.split(chunk_size):
        sim = block @ memory.t()  # (q, N)
        top_sim, top_idx = sim.topk(k, dim=1)  # (q, k)
        weights = (top_sim / temperature).exp()
        votes = torch.zeros(block.shape[0], num_classes, device=query.device, dtype=weights.dtype)
        votes.scatter_add_(1, memory_labels[top_idx], weights)  # (q, C)
        scores.append(votes)
    return torch.cat(scores)


def knn_accuracy(
    query: Tensor, query_labels: Tensor, memory: Tensor, memory_labels: Tensor, num_classes: int, k: int, temperature: float
) -> dict[str, float]:
    """Top-1 and top-5 (%) of the weighted kNN classifier."""
    scores = knn_predict(query, memory, memory_labels, num_classes, k, temperature)
    ranked = scores.topk(min(5, num_classes), dim=1).indices
    hits = ranked == query_labels[:, None]
    return {"knn_top1": hits[:, 0].float().mean().item() * 100, "knn_top5": hits.any(1).float().mean().item() * 100}
