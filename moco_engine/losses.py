"""Contrastive losses as pure functions on tensors.

Shapes: B queries q and their positive keys k, both (B, D) and unit norm; K negatives (K, D).
Logits are always formed in float32, whatever the autocast dtype of the encoders, because
1/T (T as small as 0.07) amplifies bf16's rounding.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor


def info_nce_logits(
    q: Tensor, k: Tensor, negatives: Tensor, temperature: float, drop: Tensor | None = None
) -> Tensor:
    """The MoCo logits ``[l_pos, l_neg] / T``.

    Args:
        q: (B, D) queries (carry gradients).
        k: (B, D) positive keys, one per query.
        negatives: (K, D) negatives shared by the batch.
        temperature: T > 0.
        drop: optional (B, K) bool; True entries are not negatives of that query (logit -inf).

    Returns:
        (B, 1 + K) logits; column 0 is the positive.
    """
    q = q.float()
    l_pos = (q * k.float()).sum(dim=1, keepdim=True)  # (B, 1)
    l_neg = q @ negatives.float().t()  # (B, K)
    if drop is not None:
        l_neg = l_neg.masked_fill(drop, float("-inf"))
    return torch.cat([l_pos, l_neg], dim=1) / temperature


def info_nce(logits: Tensor) -> Tensor:
    """InfoNCE (van den Oord et al. 2018) on logits whose column 0 is the positive: a (K+1)-way
    cross-entropy with label 0. logits (B, 1 + K) -> scalar mean over the batch."""
    labels = torch.zeros(logits.shape[0], dtype=torch.long, device=logits.device)
    return F.cross_entropy(logits, labels)


def instance_accuracy(logits: Tensor, topk: tuple[int, ...] = (1, 5)) -> dict[str, Tensor]:
    """Instance discrimination accuracy: how often the positive ranks within the top k of K+1.

    The positive's rank is the number of negatives scoring strictly higher, which avoids a top-k
    over K+1 columns. logits (B, 1 + K) -> {"top1": (), "top5": ()} in percent, on device.
    """
    rank = (logits[:, 1:] > logits[:, :1]).sum(dim=1)  # (B,)
    return {f"top{k}": (rank < k).float().mean() * 100.0 for k in topk}


def nce(logits: Tensor, num_items: int, log_z: Tensor) -> Tensor:
    """Binary NCE of Wu et al. 2018 (after Gutmann & Hyvärinen 2010) against uniform noise.

    With P(i|v) = exp(v·f_i / T) / Z and noise P_n = 1/N, each pair is classified as data with
    h = P / (P + K·P_n); the loss is -log h(positive) - Σ_j log(1 - h(negative_j)), averaged
    over the batch. Computed in log space; a dropped negative (logit -inf) adds nothing.

    Args:
        logits: (B, 1 + K) similarities / T; column 0 is the positive.
        num_items: N, the size of the data set the negatives are drawn from.
        log_z: () log of the normalising constant Z.

    Returns:
        scalar loss.
    """
    num_negatives = logits.shape[1] - 1
    log_noise = logits.new_full((), math.log(num_negatives / num_items))  # no host-to-device copy
    log_p = logits - log_z  # log P(i|v), (B, 1 + K)
    log_denominator = torch.logaddexp(log_p, log_noise.expand_as(log_p))
    log_h_pos = log_p[:, 0] - log_denominator[:, 0]
    log_not_h_neg = log_noise - log_denominator[:, 1:]
    log_not_h_neg = torch.where(torch.isinf(logits[:, 1:]), 0.0, log_not_h_neg)
    return -(log_h_pos + log_not_h_neg.sum(dim=1)).mean()


def estimate_log_z(logits: Tensor, num_items: int) -> Tensor:
    """Monte-Carlo estimate of log Z = log(N · mean_j exp(logit_j)) over a batch's sampled
    negatives (B, 1 + K) -> (), as Wu et al. do on the first batches."""
    negative = logits[:, 1:]
    finite = torch.isfinite(negative)
    mean_exp = torch.where(finite, negative.exp(), 0.0).sum() / finite.sum().clamp(min=1)
    return torch.log(mean_exp * num_items)
