"""Judging the learned features: extraction, the weighted kNN classifier and the linear probe.

The kNN monitor is the one of Wu et al. 2018 used by the MoCo CIFAR-10 demo: the normalised
features of the training images are the memory, each test image votes with its k nearest
neighbours (cosine similarity), each vote weighted by exp(similarity / T).

The linear probe is MoCo's linear classification protocol: a fully connected layer, initialised
N(0, 0.01), trained on the frozen backbone's features (backbone in eval mode, so not even its
BatchNorm statistics move) with SGD at lr 30, momentum 0.9, no weight decay, 100 epochs and the
lr divided by 10 at epochs 60 and 80. ``cached`` is the fast variant: the features of the
un-augmented training images are extracted once and the fc is trained on them.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader


@torch.no_grad()
def extract_features(
    model: nn.Module, loader: DataLoader, device: torch.device, batch_stats: bool = False, normalize: bool = True
) -> tuple[Tensor, Tensor]:
    """Run ``model`` over ``loader``, in eval mode unless ``batch_stats``.

    ``batch_stats=True`` keeps BatchNorm on batch statistics, as when the model makes keys during
    training (the memory bank's refresh must match the keys it stands in for).

    Returns:
        (features (N, F) float32, L2-normalised unless ``normalize=False``, labels (N,) int64), on
        ``device``, in loader order.
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
            feats.append(F.normalize(out.float(), dim=1) if normalize else out.float())
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


# ---------------------------------------------------------------------------------------------
# Linear probe
# ---------------------------------------------------------------------------------------------
def topk_accuracy(logits: Tensor, labels: Tensor) -> dict[str, float]:
    """Top-1 and top-5 (%) of class scores (N, C) against labels (N,)."""
    ranked = logits.topk(min(5, logits.shape[1]), dim=1).indices
    hits = ranked == labels[:, None]
    return {"top1": hits[:, 0].float().mean().item() * 100, "top5": hits.any(1).float().mean().item() * 100}


def fit_linear(
    batches: Callable[[int], Iterable[tuple[Tensor, Tensor]]],
    width: int,
    num_classes: int,
    cfg,
    device: torch.device,
    seed: int = 0,
) -> nn.Linear:
    """Train the probe's fc with MoCo's recipe.

    Args:
        batches: epoch -> iterable of (features (B, width) float32, labels (B,)) on ``device``.
        width: feature size; num_classes: C.
        cfg: a :class:`~moco_engine.config.LinearConfig` (epochs, lr, momentum, weight_decay,
            milestones, gamma).

    Returns:
        the trained ``nn.Linear(width, C)``.
    """
    generator = torch.Generator().manual_seed(seed)
    fc = nn.Linear(width, num_classes)
    with torch.no_grad():
        fc.weight.normal_(0.0, 0.01, generator=generator)
        fc.bias.zero_()
    fc.to(device)
    optimizer = torch.optim.SGD(fc.parameters(), lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    schedule = torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones=list(cfg.milestones), gamma=cfg.gamma)
    for epoch in range(cfg.epochs):
        for features, labels in batches(epoch):
            loss = F.cross_entropy(fc(features), labels)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        schedule.step()
    return fc


def linear_probe_cached(
    train: tuple[Tensor, Tensor], test: tuple[Tensor, Tensor], num_classes: int, cfg, seed: int = 0
) -> dict[str, float]:
    """The fast probe: the fc trained on fixed features.

    Args:
        train, test: (features (N, F) float32, labels (N,)) on one device.

    Returns:
        {"top1", "top5"} (%) on the test features.
    """
    features, labels = train
    device = features.device
    generator = torch.Generator().manual_seed(seed)

    def batches(epoch: int):
        order = torch.randperm(len(labels), generator=generator).to(device)
        for chunk in order.split(cfg.batch_size):
            yield features[chunk], labels[chunk]

    fc = fit_linear(batches, features.shape[1], num_classes, cfg, device, seed)
    with torch.no_grad():
        return topk_accuracy(fc(test[0]), test[1])


def _fingerprint(module: nn.Module) -> dict[str, Tensor]:
    return {name: t.detach().clone() for name, t in module.state_dict().items()}


@torch.no_grad()
def _unchanged(module: nn.Module, before: dict[str, Tensor]) -> bool:
    return all(torch.equal(t, before[name]) for name, t in module.state_dict().items())


def linear_probe(
    backbone: nn.Module,
    train_loader: Iterable,
    test_loader: Iterable,
    width: int,
    num_classes: int,
    cfg,
    device: torch.device,
    seed: int = 0,
) -> dict[str, float]:
    """MoCo's linear classification protocol on a frozen backbone.

    ``train_loader`` yields augmented ``(images, labels, index)`` batches, ``test_loader`` plain
    ones. The backbone runs in eval mode without gradients; afterwards every tensor of its
    state_dict is checked against a copy taken before (a probe that moved the backbone would
    measure something else).

    Returns:
        {"top1", "top5"} (%) on the test split.

    Raises:
        RuntimeError: the backbone changed during the probe.
    """
    before = _fingerprint(backbone)
    was_training = backbone.training
    backbone.eval()
    autocast = (
        torch.autocast(device_type="cuda", dtype=torch.bfloat16) if device.type == "cuda" else contextlib.nullcontext()
    )

    def features(images: Tensor) -> Tensor:
        with torch.no_grad(), autocast:
            return backbone(images.to(device, non_blocking=True)).float()

    def batches(epoch: int):
        for images, labels, _ in train_loader:
            yield features(images), labels.to(device)

    try:
        fc = fit_linear(batches, width, num_classes, cfg, device, seed)
        with torch.no_grad():
            logits, labels = zip(*[(fc(features(images)), y.to(device)) for images, y, _ in test_loader])
        result = topk_accuracy(torch.cat(logits), torch.cat(labels))
    finally:
        backbone.train(was_training)
    if not _unchanged(backbone, before):
        raise RuntimeError("the backbone changed during the linear probe")
    return result
