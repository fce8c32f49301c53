"""Judging the learned features: encoding a split (sharded under torchrun) and the kNN monitor.

The kNN monitor is the one of Wu et al. 2018 used by the MoCo CIFAR-10 demo: the normalised
features of the training images are the memory, each test image votes with its k nearest
neighbours (cosine similarity), each vote weighted by exp(similarity / T). Training runs it every
``eval.knn_every`` epochs and ``moco-eval knn`` runs it on a checkpoint: both call
:func:`knn_monitor`. The linear probe is in ``probe.py``.

Encodings run under the run's own precision (``precision.autocast``): an fp32 run encodes in
fp32, a bf16 run in bf16.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from moco_engine.runtime import distributed as dist
from moco_engine.runtime.batches import to_device
from moco_engine.runtime.precision import autocast


@torch.no_grad()
def extract_features(
    model: nn.Module, loader: Iterable, device: torch.device, batch_stats: bool = False, normalize: bool = True,
    dtype: torch.dtype | None = None,
) -> tuple[Tensor, Tensor]:
    """Run ``model`` over ``loader``'s ``(x, targets, indices)`` batches (x: (B, ...) or a dict of
    such tensors), in eval mode unless ``batch_stats``, under autocast to ``dtype`` (None: fp32).

    ``batch_stats=True`` keeps BatchNorm on batch statistics, as when the model makes keys during
    training (the memory bank's refresh must match the keys it stands in for).

    Returns:
        (features (N, F) float32, L2-normalised unless ``normalize=False``, labels (N,) int64), on
        ``device``, in loader order.
    """
    was_training = model.training
    model.train(batch_stats)
    feats, labels = [], []
    try:
        for x, targets, _ in loader:
            with autocast(device, dtype):
                out = model(to_device(x, device))
            # Always a new tensor: a CUDA-graphed model (train.cuda_graphs) overwrites its
            # output at its next replay, so a view of it must not be kept.
            feats.append(F.normalize(out.float(), dim=1) if normalize else out.to(torch.float32, copy=True))
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
    return {f"knn_{name}": value for name, value in topk_accuracy(scores, query_labels).items()}


def topk_accuracy(scores: Tensor, labels: Tensor) -> dict[str, float]:
    """Top-1 and top-5 (%) of class scores (N, C) against labels (N,) (top-C when C < 5): the
    kNN monitor's and the linear probe's."""
    ranked = scores.topk(min(5, scores.shape[1]), dim=1).indices
    hits = ranked == labels[:, None]
    return {"top1": hits[:, 0].float().mean().item() * 100, "top5": hits.any(1).float().mean().item() * 100}




def encode_split(model: nn.Module, shard: Iterable, n: int, device: torch.device, dtype: torch.dtype | None = None,
                 batch_stats: bool = False) -> tuple[Tensor, Tensor]:
    """Features (n, F) and labels (n,) of a split of n items, each rank encoding its shard
    (``loaders.shard_indices``; on one process the shard is the whole split).

    The parts are gathered in rank order, which is index order (then the padding, cut off), so
    every rank ends with the same tensors, each having encoded 1/world of the split.
    """
    features, labels = extract_features(model, shard, device, batch_stats=batch_stats, dtype=dtype)
    return dist.all_gather_cat(features, same_size=True)[:n], dist.all_gather_cat(labels, same_size=True)[:n]


@torch.no_grad()
def knn_monitor(model: nn.Module, train: Iterable, test: Iterable, num_train: int, num_test: int, num_classes: int,
                k: int, temperature: float, device: torch.device, dtype: torch.dtype | None = None) -> dict[str, float]:
    """Weighted kNN top-1/top-5 (%) of the test split against the train split, both encoded by
    ``model`` in eval mode (``train`` and ``test`` are this rank's shards of the two splits)."""
    memory, memory_labels = encode_split(model, train, num_train, device, dtype)
    query, query_labels = encode_split(model, test, num_test, device, dtype)
    return knn_accuracy(query, query_labels, memory, memory_labels, num_classes, k, temperature)
