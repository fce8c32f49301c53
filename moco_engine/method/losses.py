"""Contrastive losses as pure functions on tensors.

Shapes: B queries q and their positive keys k, both (B, D) and unit norm; K negatives (K, D).
Logits are formed in float32 at least (float64 inputs stay float64), whatever the autocast
dtype of the encoders, because 1/T (T as small as 0.07) amplifies bf16's rounding.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor


def _up(x: Tensor) -> Tensor:
    """Half-precision inputs to float32 (1/T amplifies their rounding); float32/64 as they are."""
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


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
    q = _up(q)
    with torch.autocast(q.device.type, enabled=False):  # autocast would run the matmul in bf16
        l_pos = (q * _up(k)).sum(dim=1, keepdim=True)  # (B, 1)
        l_neg = q @ _up(negatives).to(q.dtype).t()  # (B, K)
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


def blend_log_z(log_z: Tensor, estimate: Tensor, momentum: float = 0.99) -> Tensor:
    """NCE's normaliser after one more batch: the first estimate as is (``log_z`` NaN), then a
    moving average of Z, log(m·Z + (1 − m)·Ẑ); all () tensors, no host sync."""
    blended = torch.logaddexp(log_z + math.log(momentum), estimate + math.log(1 - momentum))
    return torch.where(torch.isnan(log_z), estimate, blended)


def estimate_log_z(logits: Tensor, num_items: int) -> Tensor:
    """Monte-Carlo estimate of log Z = log(N · mean_j exp(logit_j)) over a batch's sampled
    negatives (B, 1 + K) -> (), as Wu et al. do on the first batches."""
    negative = logits[:, 1:]
    finite = torch.isfinite(negative)
    mean_exp = torch.where(finite, negative.exp(), 0.0).sum() / finite.sum().clamp(min=1)
    return torch.log(mean_exp * num_items)


# ---------------------------------------------------------------------------------------------
# The objectives of the literature, over any negative source.
#
# Every function below takes unit queries q (B, D), their positives p (B, D), negatives (K, D)
# shared by the batch, and an optional drop mask (B, K) (True: not a negative of that query, as
# the memory bank's own item or in-batch's own views); it returns a scalar mean over the batch.
# For unit vectors the squared Euclidean distance is 2 − 2·cosine, which the metric-learning
# losses use.
# ---------------------------------------------------------------------------------------------
def _similarities(q: Tensor, p: Tensor, negatives: Tensor, drop: Tensor | None) -> tuple[Tensor, Tensor, Tensor]:
    """(s_pos (B,), s_neg (B, K), valid (B, K) bool) cosine similarities in float32."""
    q = _up(q)
    with torch.autocast(q.device.type, enabled=False):  # autocast would run the matmul in bf16
        s_pos = (q * _up(p)).sum(dim=1)
        s_neg = q @ _up(negatives).to(q.dtype).t()
    valid = torch.ones_like(s_neg, dtype=torch.bool) if drop is None else ~drop
    return s_pos, s_neg, valid


def _masked_mean(x: Tensor, valid: Tensor) -> Tensor:
    """Mean over the valid entries of each row: (B, K) -> (B,)."""
    return torch.where(valid, x, 0.0).sum(dim=1) / valid.sum(dim=1).clamp(min=1)


def info_nce_loss(q: Tensor, p: Tensor, negatives: Tensor, drop: Tensor | None = None, temperature: float = 0.1) -> Tensor:
    """InfoNCE (van den Oord et al. 2018): −log e^{q·p/T} / (e^{q·p/T} + Σ_j e^{q·n_j/T}).

    Over in-batch negatives (the other 2B − 2 views) this is SimCLR's NT-Xent (Chen et al. 2020).
    """
    return info_nce(info_nce_logits(q, p, negatives, temperature, drop))


def pair_loss(q: Tensor, p: Tensor, negatives: Tensor, drop: Tensor | None = None, pair_margin: float = 1.0) -> Tensor:
    """The contrastive pair loss (Chopra, Hadsell & LeCun 2005): pull the positive pair together,
    push each negative pair beyond a margin m on the squared distance:
    L = d²(q, p) + mean_j max(0, m − d²(q, n_j))."""
    s_pos, s_neg, valid = _similarities(q, p, negatives, drop)
    d2_pos, d2_neg = 2 - 2 * s_pos, 2 - 2 * s_neg
    return (d2_pos + _masked_mean(F.relu(pair_margin - d2_neg), valid)).mean()


def triplet_loss(q: Tensor, p: Tensor, negatives: Tensor, drop: Tensor | None = None, triplet_margin: float = 0.2) -> Tensor:
    """The triplet loss (Schroff et al. 2015, FaceNet): each (anchor q, positive p, negative n_j)
    costs max(0, d²(q, p) − d²(q, n_j) + α); the mean over the valid negatives (FaceNet mines
    semi-hard triplets; over a queue of K every negative forms one)."""
    s_pos, s_neg, valid = _similarities(q, p, negatives, drop)
    violation = F.relu((2 - 2 * s_pos)[:, None] - (2 - 2 * s_neg) + triplet_margin)
    return _masked_mean(violation, valid).mean()


def lifted_structured_loss(
    q: Tensor, p: Tensor, negatives: Tensor, drop: Tensor | None = None, lifted_margin: float = 1.0
) -> Tensor:
    """The lifted structured loss (Song et al. 2016), its smooth form, for each positive pair
    (q_i, p_i) with the negatives of both of its ends (here the same shared set):
    J_i = log(Σ_j e^{α − D(q_i, n_j)} + Σ_j e^{α − D(p_i, n_j)}) + D(q_i, p_i), L = mean_i max(0, J_i)² / 2,
    with D the Euclidean distance."""
    s_pos, s_neg_q, valid = _similarities(q, p, negatives, drop)
    with torch.autocast(q.device.type, enabled=False):
        s_neg_p = _up(p).to(s_neg_q.dtype) @ _up(negatives).to(s_neg_q.dtype).t()

    def distance(s: Tensor) -> Tensor:
        return torch.sqrt((2 - 2 * s).clamp(min=1e-12))

    terms = torch.cat([lifted_margin - distance(s_neg_q), lifted_margin - distance(s_neg_p)], dim=1)
    terms = terms.masked_fill(~torch.cat([valid, valid], dim=1), float("-inf"))
    j = torch.logsumexp(terms, dim=1) + distance(s_pos)
    return (F.relu(j) ** 2).mean() / 2


def n_pair_loss(q: Tensor, p: Tensor, negatives: Tensor, drop: Tensor | None = None) -> Tensor:
    """The multi-class N-pair loss (Sohn 2016): log(1 + Σ_j exp(q·n_j − q·p)), i.e. a softmax
    cross-entropy over inner products without temperature (Sohn's L2 penalty on the embeddings
    is constant here: they are unit vectors)."""
    s_pos, s_neg, valid = _similarities(q, p, negatives, drop)
    diff = (s_neg - s_pos[:, None]).masked_fill(~valid, float("-inf"))
    zero = torch.zeros_like(s_pos)[:, None]
    return torch.logsumexp(torch.cat([zero, diff], dim=1), dim=1).mean()


def debiased_loss(
    q: Tensor, p: Tensor, negatives: Tensor, drop: Tensor | None = None, temperature: float = 0.1, tau_plus: float = 0.1
) -> Tensor:
    """The debiased contrastive loss (Chuang et al. 2020): the negatives' term corrected for the
    chance τ⁺ that a "negative" shares the query's class,
    g = max((mean_j e^{q·n_j/T} − τ⁺ e^{q·p/T}) / (1 − τ⁺), e^{−1/T}),
    L = −log e^{q·p/T} / (e^{q·p/T} + N·g), N the number of negatives. τ⁺ = 0 is InfoNCE."""
    s_pos, s_neg, valid = _similarities(q, p, negatives, drop)
    n = valid.sum(dim=1).clamp(min=1).float()
    # Shift by the row's largest logit so the exponentials cannot overflow at small T.
    shift = torch.maximum(s_pos, s_neg.masked_fill(~valid, -1.0).amax(dim=1)).detach() / temperature
    pos = torch.exp(s_pos / temperature - shift)
    neg_mean = torch.where(valid, torch.exp(s_neg / temperature - shift[:, None]), 0.0).sum(dim=1) / n
    g = torch.maximum((neg_mean - tau_plus * pos) / (1 - tau_plus), torch.exp(-1 / temperature - shift))
    return -(torch.log(pos) - torch.log(pos + n * g)).mean()


def mochi_negatives(
    q: Tensor, negatives: Tensor, hardest: int, mix: int, mix_query: int, generator: torch.Generator | None = None,
    drop: Tensor | None = None,
) -> Tensor:
    """MoCHi's synthetic hard negatives (Kalantidis et al. 2020), per query, without gradients.

    From each query's ``hardest`` most similar negatives, ``mix`` points h = normalize(α n_i +
    (1 − α) n_j) (α ~ U(0, 1), i, j drawn among the hardest) and ``mix_query`` points
    h' = normalize(β q + (1 − β) n_j) (β ~ U(0, 0.5)). Only negatives that count are mixed:
    entries ``drop`` (B, K) marks (the query's own views, its bank item, its older key) are
    never in its pool. The similarities that choose the pool are float32, as the logits are,
    also under autocast.

    Returns:
        (B, mix + mix_query, D) unit vectors.
    """
    with torch.no_grad(), torch.autocast(q.device.type, enabled=False):
        q = _up(q)
        neg = _up(negatives).to(q.dtype)
        b, k = q.shape[0], neg.shape[0]
        sim = q @ neg.t()  # (B, K)
        if drop is not None:
            sim = sim.masked_fill(drop, float("-inf"))
        top_sim, top = sim.topk(min(hardest, k), dim=1)  # (B, H), the counted ones first
        counted = torch.isfinite(top_sim).sum(dim=1, keepdim=True).clamp(min=1)  # (B, 1)
        pool = neg[top]  # (B, H, D)
        device = q.device

        def pick(count: int) -> Tensor:  # (B, count, D) random counted members of each query's pool
            u = torch.rand(b, count, device=device, generator=generator)
            idx = (u * counted).long().clamp(max=pool.shape[1] - 1)
            return pool.gather(1, idx[..., None].expand(-1, -1, pool.shape[2]))

        parts = []
        if mix:
            alpha = torch.rand(b, mix, 1, device=device, generator=generator)
            parts.append(F.normalize(alpha * pick(mix) + (1 - alpha) * pick(mix), dim=2))
        if mix_query:
            beta = 0.5 * torch.rand(b, mix_query, 1, device=device, generator=generator)
            parts.append(F.normalize(beta * q[:, None] + (1 - beta) * pick(mix_query), dim=2))
        return torch.cat(parts, dim=1) if parts else q.new_zeros(b, 0, q.shape[1])


def mochi_loss(
    q: Tensor, p: Tensor, negatives: Tensor, drop: Tensor | None = None, temperature: float = 0.1,
    mochi_hardest: int = 1024, mochi_mix: int = 1024, mochi_mix_query: int = 256, generator: torch.Generator | None = None,
) -> Tensor:
    """InfoNCE with MoCHi's synthetic hard negatives appended to each query's negatives; with
    no mixed points it is InfoNCE."""
    logits = info_nce_logits(q, p, negatives, temperature, drop)  # (B, 1 + K)
    synthetic = mochi_negatives(q, negatives, mochi_hardest, mochi_mix, mochi_mix_query, generator, drop)
    with torch.autocast(q.device.type, enabled=False):
        extra = torch.einsum("bd,bmd->bm", _up(q).to(logits.dtype), synthetic.to(logits.dtype)) / temperature  # (B, M)
    return info_nce(torch.cat([logits, extra], dim=1))


def moco_v3_loss(q: Tensor, keys: Tensor, offset: int, temperature: float,
                 drop: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """MoCo v3's ctr(q, k) (``contrastive_loss`` of moco-v3's moco/builder.py): unit queries q
    (B, D) of this process against keys (G, D), the global batch's momentum keys (then any
    stored negatives); query i's positive is key ``offset + i`` (offset = B·rank).

    logits = q·keysᵀ / T (B, G), float32; loss = CrossEntropy(logits, arange(B) + offset)·2T.
    ``drop`` (B, G) marks entries that are no negatives of a query (-inf). Returns (loss (),
    logits (B, G)).
    """
    logits = _up(q) @ _up(keys).t() / temperature
    if drop is not None:
        logits = logits.masked_fill(drop, float("-inf"))
    labels = torch.arange(q.shape[0], device=q.device) + offset
    return F.cross_entropy(logits, labels) * (2 * temperature), logits


def byol_loss(prediction: Tensor, target: Tensor) -> Tensor:
    """BYOL's regression loss (Grill et al. 2020): 2 − 2·cos(prediction, target), both (B, D),
    the target without gradients; scalar mean over the batch."""
    return (2 - 2 * F.cosine_similarity(_up(prediction), _up(target).detach(), dim=1)).mean()



# ------------------------------------------------------------------- image–text contrast
def multi_positive_targets(ids: Tensor, candidate_ids: Tensor) -> Tensor:
    """Each row's target spread evenly over its positives: (B, C) float32, ``pos / pos.sum(1)``
    where ``pos[i, j]`` = ``ids[i] == candidate_ids[j]`` (ALBEF's ``models/model_retrieval.py``:
    every caption of the same image, in the batch and in the id queue, is a positive).

    Args:
        ids: (B,) the batch's image ids (each row's own id is among the candidates).
        candidate_ids: (C,) the ids of the columns (the batch's, then the queue's; -1 never matches an id).
    """
    positive = (ids[:, None] == candidate_ids[None, :]).float()  # (B, C)
    return positive / positive.sum(1, keepdim=True)


def distilled_targets(momentum_logits: Tensor, targets: Tensor, alpha: float) -> Tensor:
    """ALBEF's momentum distillation (``models/model_pretrain.py``): ``alpha·softmax(s_m) + (1 −
    alpha)·targets``, the momentum model's own similarities softened into the targets. (B, C)."""
    return alpha * F.softmax(momentum_logits.float(), dim=1) + (1 - alpha) * targets


def soft_cross_entropy(logits: Tensor, targets: Tensor) -> Tensor:
    """``−Σ_j targets_ij · log softmax(logits)_ij``, the batch's mean: () (ALBEF's ITC loss of one
    direction; with one-hot targets, the cross-entropy of CLIP's loss). A column whose logit is
    −inf (not scored) must have target 0; it adds nothing (not 0·−inf)."""
    terms = F.log_softmax(logits.float(), dim=1) * targets
    return -torch.where(targets > 0, terms, 0.0).sum(1).mean()


def distill_ramp(alpha: float, step: Tensor, steps_per_epoch: int) -> Tensor:
    """The distillation weight at global step ``step`` (0-d int, 0-based), a 0-d float32 tensor on
    its device (no host read): ALBEF's ``Pretrain.py`` ramps it in over epoch 0 as
    ``alpha · min(1, i / len(data_loader))`` (i the batch of the epoch) and keeps it at ``alpha``
    from epoch 1 on."""
    if steps_per_epoch <= 0:
        return torch.full((), alpha, device=step.device)
    return alpha * (step.float() / steps_per_epoch).clamp(max=1.0)
