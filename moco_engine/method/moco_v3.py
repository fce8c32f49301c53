"""MoCo v3 (Chen, Xie & He 2021), registered as ``method=moco_v3``: its predictor and its step,
made of the pieces of ``step.py``: the same parts, the same order (the optimizer step, then the
EMA, then the enqueue), its own loss (``loss.name`` and ``loss.symmetric`` are ignored). Its keys
come from f_k, so end-to-end negatives are refused; the EMA after step t uses m_{t+1}
(``StepParts.ema_ahead``)."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from moco_engine.config.schema import Config
from moco_engine.method.encoders import batch_norm_as_configured
from moco_engine.method.heads import v3_mlp
from moco_engine.method.losses import moco_v3_loss
from moco_engine.method.step import (
    BufferGuard,
    Skipped,
    StepParts,
    begin,
    contrastive_metrics,
    optimize,
    register_method,
    set_lr,
)
from moco_engine.runtime import distributed as dist
from moco_engine.runtime.precision import autocast


def build_predictor(cfg: Config) -> nn.Module:
    """MoCo v3's predictor after f_q's projector, (B, D) -> (B, D): its 2-layer MLP
    (``heads.v3_mlp``) of width ``model.hidden_dim``, with the last BN for ViTs and without it for
    ResNets (``model.predictor_last_bn``). Under SyncBN or split-BN it is converted as the encoder
    is (moco-v3 converts the whole model, predictor included, to SyncBatchNorm)."""
    model = cfg.model
    return batch_norm_as_configured(v3_mlp(2, model.dim, model.hidden_dim or model.dim, model.dim,
                                           last_bn=model.predictor_last_bn), model)


@register_method("moco_v3", predictor=build_predictor, ema_ahead=1, ignores=("loss.name", "loss.symmetric"),
                 refuses={"in_batch": "takes its keys from the momentum encoder: momentum_batch, or a queue or "
                                      "memory bank beside them"})
def moco_v3_step(parts: StepParts, x_1: Any, x_2: Any, indices: Tensor, lr: float,
                 momentum: float) -> dict[str, Tensor] | Skipped:
    """One MoCo v3 step (Chen, Xie & He 2021; moco-v3's moco/builder.py) on two views x_1, x_2
    (B, ...) of the items ``indices`` (B,)::

        q_i = normalize(predictor(f_q(x_i)))     each view its own forward pass (its own BN statistics)
        k_i = normalize(f_k(x_i))                no gradients, gathered from every process
        L = ctr(q_1, k_2) + ctr(q_2, k_1)        ctr: losses.moco_v3_loss (labels offset by rank, ×2T)

    A stored source (queue, memory bank) appends its K entries, as they were before this step's
    enqueue, to the batch's keys as further negatives; then both views' keys are enqueued.
    """
    begin(parts)
    set_lr(parts.optimizer, lr)
    source_metrics = parts.negatives.metrics(indices)
    guard = BufferGuard(parts) if parts.check_finite else None
    offset = indices.shape[0] * dist.rank()  # equal batches on every rank (EpochSampler)
    with autocast(parts.device, parts.amp_dtype):
        q_1 = F.normalize(parts.model_q(x_1)[0], dim=1)  # (B, D), with gradients
        q_2 = F.normalize(parts.model_q(x_2)[0], dim=1)
        k_1, k_2 = parts.keys(x_1), parts.keys(x_2)  # (B, D) unit, no gradients
        stored = parts.negatives.negatives(q_1, k_1, indices) if parts.negatives.stored else None
        losses, logits = [], []
        for q, k in ((q_1, k_2), (q_2, k_1)):
            keys, drop = dist.all_gather_cat(k.float(), same_size=True), None  # (G, D)
            if stored is not None:  # (G + K, D); a query's own item among the stored ones dropped
                keys = torch.cat([keys, stored.embeddings.float()])
                if stored.drop is not None:
                    drop = torch.cat([torch.zeros(q.shape[0], keys.shape[0] - stored.drop.shape[1], dtype=torch.bool,
                                                  device=q.device), stored.drop], dim=1)
            loss_i, logits_i = moco_v3_loss(q, keys, offset, parts.temperature, drop)
            losses.append(loss_i)
            logits.append(logits_i)
    loss = losses[0] + losses[1]

    if guard is not None and not guard.finite(loss):
        return Skipped(loss.detach())
    optimize(parts, loss)

    parts.encoder_k.update(parts.encoder_q, momentum)  # θ_k ← m·θ_k + (1 − m)·θ_q (not the predictor)
    if parts.negatives.stored:
        parts.negatives.update(dist.all_gather_cat(torch.cat([k_1, k_2]).float(), same_size=True),
                               dist.all_gather_cat(indices.repeat(2), same_size=True))
    # The metrics see the first direction's logits as [positive, negatives] (positive dropped from them).
    first = logits[0].detach()
    positive = torch.arange(first.shape[0], device=first.device) + offset
    # (F.one_hot would read the labels' range to the host: two syncs a step.)
    own = torch.arange(first.shape[1], device=first.device)[None, :] == positive[:, None]  # (B, G)
    as_moco = torch.cat([first.gather(1, positive[:, None]), first.masked_fill(own, float("-inf"))], dim=1)
    return {**contrastive_metrics(as_moco, q_1.detach(), parts.temperature), "loss": loss.detach(), **source_metrics}
