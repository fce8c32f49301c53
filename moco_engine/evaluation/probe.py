"""The linear probe: MoCo's linear classification protocol on a frozen backbone.

A fully connected layer, initialised N(0, 0.01), trained on the frozen backbone's features
(backbone in eval mode, so not even its BatchNorm statistics move) with SGD, momentum 0.9, no
weight decay. Two schedules, each its paper's ``main_lincls.py``:

- MoCo v1/v2 (facebookresearch/moco): lr 30, 100 epochs, the lr divided by 10 at epochs 60 and
  80 (``linear.schedule=step``);
- MoCo v3 (facebookresearch/moco-v3): lr = base x batch / 256 (``linear.lr_scaling=linear``;
  base 0.1 for ResNets, 3 for ViTs, batch 1024), 90 epochs, the lr of epoch e
  lr·½(1 + cos(π·e/epochs)) (``linear.schedule=cosine``, its ``adjust_learning_rate``).

``cached`` is the fast variant: the features of the un-augmented training images are extracted
once and the fc is trained on them.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from moco_engine.evaluation.knn import topk_accuracy
from moco_engine.runtime.batches import to_device
from moco_engine.runtime.precision import autocast


def probe_lr(cfg, epoch: int) -> float:
    """The probe's lr in ``epoch`` (from 0) under ``linear.*``: ``lr`` (x ``batch_size`` / 256
    with linear scaling), then ``gamma`` per milestone passed (step) or the half cosine (cosine)."""
    lr = cfg.lr * (cfg.batch_size / 256 if cfg.lr_scaling == "linear" else 1.0)
    if cfg.schedule == "cosine":
        return lr * 0.5 * (1.0 + math.cos(math.pi * epoch / cfg.epochs))
    return lr * cfg.gamma ** sum(epoch >= m for m in cfg.milestones)


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
        cfg: a :class:`~moco_engine.config.schema.LinearConfig` (epochs, lr, lr_scaling, schedule,
            momentum, weight_decay, milestones, gamma, batch_size).

    Returns:
        the trained ``nn.Linear(width, C)``.
    """
    generator = torch.Generator().manual_seed(seed)
    fc = nn.Linear(width, num_classes)
    with torch.no_grad():
        fc.weight.normal_(0.0, 0.01, generator=generator)
        fc.bias.zero_()
    fc.to(device)
    optimizer = torch.optim.SGD(fc.parameters(), lr=probe_lr(cfg, 0), momentum=cfg.momentum,
                                weight_decay=cfg.weight_decay)
    for epoch in range(cfg.epochs):
        for group in optimizer.param_groups:
            group["lr"] = probe_lr(cfg, epoch)
        for features, labels in batches(epoch):
            loss = F.cross_entropy(fc(features), labels)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
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
    dtype: torch.dtype | None = None,
) -> dict[str, float]:
    """MoCo's linear classification protocol on a frozen backbone (its features under autocast
    to ``dtype``, None: fp32).

    ``train_loader`` yields augmented ``(x, labels, index)`` batches, ``test_loader`` plain
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

    def features(x: Any) -> Tensor:
        with torch.no_grad(), autocast(device, dtype):
            return backbone(to_device(x, device)).float()

    def batches(epoch: int):
        for x, labels, _ in train_loader:
            yield features(x), labels.to(device)

    try:
        fc = fit_linear(batches, width, num_classes, cfg, device, seed)
        with torch.no_grad():
            logits, labels = zip(*[(fc(features(x)), y.to(device)) for x, y, _ in test_loader])
        result = topk_accuracy(torch.cat(logits), torch.cat(labels))
    finally:
        backbone.train(was_training)
    if not _unchanged(backbone, before):
        raise RuntimeError("the backbone changed during the linear probe")
    return result
