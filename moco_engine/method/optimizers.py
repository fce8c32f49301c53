"""The optimizers of a run (``optim.name``): SGD with momentum (MoCo v1/v2), LARS (MoCo v3's
ResNet recipes) and AdamW (its ViT recipes).

LARS follows moco-v3's ``moco/optimizer.py`` in what it computes (the code is ours). For a
parameter p with more than one dimension, with gradient g, weight decay wd, trust coefficient
η (``optim.trust_coefficient``, 0.001) and momentum μ (``optim.momentum``, 0.9)::

    d = g + wd·p
    d ← d · η‖p‖/‖d‖        (1 if ‖p‖ or ‖d‖ is 0)
    m ← μ·m + d ;  p ← p − lr·m

One-dimensional parameters (biases, norm layers' scales and shifts) get neither weight decay nor
the trust ratio. ``optim.lars_clip`` is solo-learn's clipping: the ratio η‖p‖/‖d‖ is capped at
lr, so the step is lr·min(η‖p‖/‖d‖, lr)/lr ≤ lr (solo-learn's CIFAR recipe uses η = 0.02 with it).
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from moco_engine.config.schema import OptimConfig


class LARS(torch.optim.Optimizer):
    """Layer-wise adaptive rate scaling (You et al. 2017) as MoCo v3 uses it (see the module)."""

    def __init__(self, params: Iterable, lr: float = 0.0, weight_decay: float = 0.0, momentum: float = 0.9,
                 trust_coefficient: float = 0.001, clip: bool = False):
        super().__init__(params, dict(lr=lr, weight_decay=weight_decay, momentum=momentum,
                                      trust_coefficient=trust_coefficient, clip=clip))

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                d = p.grad
                if p.ndim > 1:
                    d = d.add(p, alpha=group["weight_decay"])
                    p_norm, d_norm = torch.linalg.vector_norm(p), torch.linalg.vector_norm(d)
                    ratio = group["trust_coefficient"] * p_norm / d_norm
                    if group["clip"] and group["lr"] > 0:
                        ratio = torch.clamp(ratio / group["lr"], max=1.0)
                    one = torch.ones_like(p_norm)
                    d = d * torch.where((p_norm > 0) & (d_norm > 0), ratio, one)
                state = self.state[p]
                if "mu" not in state:
                    state["mu"] = torch.zeros_like(p)
                state["mu"].mul_(group["momentum"]).add_(d)
                p.add_(state["mu"], alpha=-group["lr"])
        return None


def build_optimizer(cfg: OptimConfig, params: Iterable[nn.Parameter]) -> torch.optim.Optimizer:
    """The optimizer ``optim.name`` names over ``params`` (its lr is set every step by the schedule).

    - ``sgd``: ``optim.momentum``, ``optim.weight_decay``;
    - ``lars``: the same, with ``optim.trust_coefficient`` and ``optim.lars_clip``;
    - ``adamw``: ``optim.betas``, ``optim.eps`` (torch's defaults 0.9, 0.999 and 1e-8;
      Contriever's 0.9, 0.98 and 1e-6) and ``optim.weight_decay``.
    """
    params = [p for p in params if p.requires_grad]  # a frozen part (a ViT's patch projection) is no one's
    if cfg.name == "lars":
        return LARS(params, lr=cfg.lr, weight_decay=cfg.weight_decay, momentum=cfg.momentum,
                    trust_coefficient=cfg.trust_coefficient, clip=cfg.lars_clip)
    if cfg.name == "adamw":
        return torch.optim.AdamW(params, lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps, weight_decay=cfg.weight_decay)
    return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
