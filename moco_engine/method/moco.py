"""MoCo v1/v2 (He et al. 2020; Chen et al. 2020): the step in the paper's order, registered as
``method=moco``. It builds f_k (the EMA of f_q; none with end-to-end negatives), takes the
negative source ``negatives.kind`` names and the objective ``loss.name`` names::

    q = f_q(x_q)                                  (B, D) with gradients
    k = keys(x_k)                                 (B, D): f_k under shuffle-BN, no gradients
                                                  (in-batch negatives: f_q itself, end to end)
    negatives = source.negatives(q, k, idx)       (K, D) snapshot, drop (B, K) or None
    logits = [q·k, q·negativesᵀ] / T              (B, 1 + K), float32
    loss = objective(q, k, negatives, logits)     (the symmetric loss: both directions, summed)
    backward; optimizer step
    θ_k ← m·θ_k + (1 − m)·θ_q                     one fused foreach op
    objective.commit()                            NCE's normaliser
    source.update(all_gather(k), all_gather(idx)) identical on every rank

Every state change happens after the optimizer step, in that order.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from moco_engine.method.losses import info_nce_logits
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


@register_method("moco")
def moco_step(parts: StepParts, x_q: Any, x_k: Any, indices: Tensor, lr: float,
              momentum: float) -> dict[str, Tensor] | Skipped:
    """One MoCo step on two views x_q, x_k (B, ...) of the items ``indices`` (B,), at learning
    rate ``lr`` and EMA momentum ``momentum``."""
    begin(parts)
    set_lr(parts.optimizer, lr)
    source_metrics = parts.negatives.metrics(indices)  # the source's state before this batch
    guard = BufferGuard(parts) if parts.check_finite else None
    # The symmetric loss (the MoCo CIFAR-10 demo's) sums both directions; its gradient is twice
    # an asymmetric step's.
    directions = ((x_q, x_k), (x_k, x_q)) if parts.symmetric else ((x_q, x_k),)
    losses, keys = [], []
    with autocast(parts.device, parts.amp_dtype):
        for x_query, x_key in directions:
            q = parts.model_q(x_query)  # (B, D) unit queries, with gradients
            k = parts.keys(x_key)  # (B, D) unit keys
            negatives = parts.negatives.negatives(q, k, indices)  # (K, D) snapshot, drop (B, K) or None
            supplied = parts.negatives.positives(indices)  # the memory bank's v_i (B, D), or None
            positive = k if supplied is None else supplied
            logits = info_nce_logits(q, positive, negatives.embeddings, parts.temperature, negatives.drop)
            losses.append(parts.objective(q, positive, negatives, logits))  # ()
            keys.append(k)
            if len(losses) == 1:
                first_q, first_logits = q, logits  # the metrics are the first direction's
    loss = sum(losses[1:], losses[0])

    if guard is not None and not guard.finite(loss):
        parts.objective.discard()
        return Skipped(loss.detach())
    optimize(parts, loss)

    # State changes, after the optimizer step.
    if parts.encoder_k is not None:
        parts.encoder_k.update(parts.encoder_q, momentum)  # θ_k ← m·θ_k + (1 − m)·θ_q
    parts.objective.commit()  # NCE's normaliser
    # The demo's enqueue order: the key of x_q (the second direction's) before that of x_k.
    enqueued = torch.cat(keys[::-1]).detach().float()  # (B·directions, D)
    # Equal shares on every rank (EpochSampler) make every step's batch the same size on every
    # rank, ragged last batch included: the gathers need no size exchange.
    parts.negatives.update(dist.all_gather_cat(enqueued, same_size=True),
                           dist.all_gather_cat(indices.repeat(len(directions)), same_size=True))
    return {**contrastive_metrics(first_logits.detach(), first_q.detach(), parts.temperature), "loss": loss.detach(),
            **source_metrics}
