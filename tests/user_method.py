"""A method registered from outside the package, as a user would: SimSiam (Chen & He 2021), f_q
and a predictor, each view's prediction pulled to the other view's projection under a
stop-gradient; no momentum encoder, no negatives. tests/test_methods.py imports it; under
torchrun, tests/dist_worker.py runs it first (``--import``)."""

from __future__ import annotations

import torch.nn.functional as F
from torch import nn

import moco_engine
from moco_engine.method.step import BufferGuard, begin, optimize, set_lr
from moco_engine.runtime.precision import autocast


def predictor(cfg):
    """h: (B, D) -> (B, D), a bottleneck of width 8 (the paper's is D/4)."""
    d = cfg.model.dim
    return nn.Sequential(nn.Linear(d, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, d))


@moco_engine.register_method("simsiam", predictor=predictor, negatives=False, momentum_encoder=False,
                             ignores=("loss", "model.momentum", "model.momentum_schedule"), replace=True)
def simsiam_step(parts: moco_engine.StepParts, x_1, x_2, indices, lr, momentum):
    """L = -(cos(p_1, sg(z_2)) + cos(p_2, sg(z_1))) / 2 on two views (B, ...); ``momentum`` unused."""
    begin(parts)
    set_lr(parts.optimizer, lr)
    guard = BufferGuard(parts) if parts.check_finite else None
    with autocast(parts.device, parts.amp_dtype):
        p_1, z_1 = parts.model_q(x_1)  # prediction and projection (B, D)
        p_2, z_2 = parts.model_q(x_2)
        loss = -(F.cosine_similarity(p_1, z_2.detach()).mean() + F.cosine_similarity(p_2, z_1.detach()).mean()) / 2
    if guard is not None and not guard.finite(loss):
        return moco_engine.Skipped(loss.detach())
    optimize(parts, loss)
    return {"loss": loss.detach(), "embed_std": F.normalize(z_1.detach().float(), dim=1).std(dim=0).mean()}
