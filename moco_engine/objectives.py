"""The loss of a step, bound once from ``cfg.loss`` by :func:`build_objective`.

An :class:`Objective` scores one direction of a step: queries q (B, D), their positives (B, D),
the source's :class:`~moco_engine.negatives.Negatives` and the logits [q·p, q·negativesᵀ] / T
(B, 1 + K) the step has formed already (for InfoNCE they are all it needs). Every
hyper-parameter is bound here by name, so a renamed argument fails when the run is built, not
silently at a default.

An objective may carry state: NCE's normaliser Z (Wu et al. 2018). Its calls compute the new
value without keeping it; the step calls :meth:`Objective.commit` after the optimizer step (or
:meth:`Objective.discard` for a skipped step), beside the EMA and the enqueue.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

from torch import Tensor

from .config import LossConfig
from .losses import (
    blend_log_z,
    debiased_loss,
    estimate_log_z,
    info_nce,
    lifted_structured_loss,
    mochi_loss,
    n_pair_loss,
    nce,
    pair_loss,
    triplet_loss,
)
from .negatives import MemoryBank, Negatives, NegativeSource


class Objective:
    """A stateless objective: ``loss(q, positive, negatives, logits) -> ()``."""

    def __init__(self, loss: Callable[[Tensor, Tensor, Negatives, Tensor], Tensor]):
        self.loss = loss

    def __call__(self, q: Tensor, positive: Tensor, negatives: Negatives, logits: Tensor) -> Tensor:
        """The loss () of one direction: q and positive (B, D), logits (B, 1 + K)."""
        return self.loss(q, positive, negatives, logits)

    def commit(self) -> None:
        """Keep the state this step's calls computed (after the optimizer step)."""

    def discard(self) -> None:
        """Forget it (a step skipped for its non-finite loss)."""


class NCEObjective(Objective):
    """Wu et al.'s NCE against uniform noise over the N items, with its normaliser Z kept in the
    memory bank's ``log_z`` buffer (so checkpoints carry it): each call blends in that batch's
    Monte-Carlo estimate, :meth:`commit` writes the result to the bank."""

    def __init__(self, bank: MemoryBank):
        super().__init__(self.loss_and_normaliser)
        self.bank = bank
        self.pending: Tensor | None = None

    def loss_and_normaliser(self, q: Tensor, positive: Tensor, negatives: Negatives, logits: Tensor) -> Tensor:
        current = self.bank.log_z if self.pending is None else self.pending  # the symmetric loss's second call
        self.pending = blend_log_z(current, estimate_log_z(logits.detach(), self.bank.num_items))
        return nce(logits, self.bank.num_items, self.pending)

    def commit(self) -> None:
        if self.pending is not None:
            self.bank.log_z.copy_(self.pending)
        self.pending = None

    def discard(self) -> None:
        self.pending = None


def pairwise(fn: Callable[..., Tensor], **hyper) -> Objective:
    """An objective of ``losses`` over (q, p, negatives (K, D), drop) with its hyper-parameters."""
    bound = functools.partial(fn, **hyper)
    return Objective(lambda q, p, neg, logits: bound(q, p, neg.embeddings, neg.drop))


def build_objective(cfg: LossConfig, negatives: NegativeSource) -> Objective:
    """The objective ``cfg.name`` names, its hyper-parameters bound from ``cfg``.

    Raises:
        ValueError: NCE without a memory bank (``rules.validate`` refuses it first).
    """
    name, t = cfg.name, cfg.temperature
    if name in ("infonce", "nt_xent"):  # NT-Xent is InfoNCE over in-batch negatives
        return Objective(lambda q, p, neg, logits: info_nce(logits))
    if name == "nce":
        if not isinstance(negatives, MemoryBank):
            raise ValueError("loss.name=nce needs negatives.kind=memory_bank")
        return NCEObjective(negatives)
    if name == "pair":
        return pairwise(pair_loss, pair_margin=cfg.pair_margin)
    if name == "triplet":
        return pairwise(triplet_loss, triplet_margin=cfg.triplet_margin)
    if name == "lifted":
        return pairwise(lifted_structured_loss, lifted_margin=cfg.lifted_margin)
    if name == "npair":
        return pairwise(n_pair_loss)
    if name == "debiased":
        return pairwise(debiased_loss, temperature=t, tau_plus=cfg.tau_plus)
    if name == "mochi":
        return pairwise(mochi_loss, temperature=t, mochi_hardest=cfg.mochi_hardest, mochi_mix=cfg.mochi_mix,
                        mochi_mix_query=cfg.mochi_mix_query)
    raise ValueError(f"unknown loss.name {name!r}")
