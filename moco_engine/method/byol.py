"""BYOL (Grill et al. 2020): the step and its predictor, registered as ``method=byol``. It takes
no negatives and no objective (``negatives.kind``, what the kinds of negatives read, and
``loss.name`` are ignored): each view's prediction regresses the target network f_k's projection
of the other view::

    p_i, z_i = predictor(f_q(x_i)), f_q(x_i)     online prediction and projection (B, D)
    t_i = f_k(x_i)                               the target's projection, no gradients
    L = byol_loss(p_1, t_2) + byol_loss(p_2, t_1)
    backward; optimizer step
    θ_k ← m·θ_k + (1 − m)·θ_q                    the target, after the optimizer step
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from moco_engine.config.schema import Config
from moco_engine.method.losses import byol_loss
from moco_engine.method.step import (
    BufferGuard,
    Skipped,
    StepParts,
    begin,
    optimize,
    register_method,
    set_lr,
)
from moco_engine.runtime.precision import autocast


def build_predictor(cfg: Config) -> nn.Module:
    """BYOL's predictor q_θ after f_q's projector, (B, D) -> (B, D): fc-BN-ReLU-fc of width
    ``loss.byol_hidden_dim``."""
    dim, hidden = cfg.model.dim, cfg.loss.byol_hidden_dim
    return nn.Sequential(nn.Linear(dim, hidden), nn.BatchNorm1d(hidden), nn.ReLU(inplace=True), nn.Linear(hidden, dim))


@register_method("byol", predictor=build_predictor, negatives=False, ignores=("loss.name",))
def byol_step(parts: StepParts, x_1: Any, x_2: Any, indices: Tensor, lr: float,
              momentum: float) -> dict[str, Tensor] | Skipped:
    """One BYOL step (Grill et al. 2020) on two views x_1, x_2 (B, ...): each view's
    prediction regresses the target network's projection of the other view."""
    begin(parts)
    set_lr(parts.optimizer, lr)
    guard = BufferGuard(parts) if parts.check_finite else None
    with autocast(parts.device, parts.amp_dtype):
        p_1, z_1 = parts.model_q(x_1)  # online prediction and projection (B, D), not normalised
        p_2, _ = parts.model_q(x_2)
        with torch.no_grad():
            t_1, t_2 = parts.encoder_k(x_1), parts.encoder_k(x_2)  # target projections (B, D)
        loss = byol_loss(p_1, t_2) + byol_loss(p_2, t_1)

    if guard is not None and not guard.finite(loss):
        return Skipped(loss.detach())
    optimize(parts, loss)

    parts.encoder_k.update(parts.encoder_q, momentum)  # the target: θ_k ← m·θ_k + (1 − m)·θ_q
    return {"loss": loss.detach(), "embed_std": F.normalize(z_1.detach().float(), dim=1).std(dim=0).mean()}
