"""The loss of a step: the registry of objectives (``loss.name``), each bound once from
``cfg.loss`` by :func:`build_objective`.

An :class:`Objective` scores one direction of a step: queries q (B, D), their positives (B, D),
the source's :class:`~moco_engine.method.negatives.Negatives` and the logits [q·p, q·negativesᵀ] / T
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
from dataclasses import dataclass, field, fields
from typing import Any

from torch import Tensor

from moco_engine.config.registry import Registry
from moco_engine.config.schema import LossConfig
from moco_engine.method.losses import (
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
from moco_engine.method.memory_bank import MemoryBank
from moco_engine.method.negatives import Negatives, NegativeSource


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


# =============================================================================== the registry
@dataclass(frozen=True)
class LossEntry:
    """A registered objective.

    Attributes:
        build: ``build(source, **hyper) -> Objective``, the negative source and the hyper-parameters.
        hyper: the hyper-parameters it takes, by name: each bound from ``cfg.loss.<name>`` where
            the schema has that key, else from ``cfg.loss.params.<name>`` (default: ``params``).
        params: the defaults of those the schema lacks (a user's loss: ``loss.params.margin=0.3``).
        needs: the ``negatives.kind`` values it works with (empty: any).
    """

    build: Callable[..., Objective]
    hyper: tuple[str, ...] = ()
    params: dict[str, Any] = field(default_factory=dict)
    needs: tuple[str, ...] = ()

    @property
    def reads(self) -> tuple[str, ...]:
        """The settings of its own among ``loss.*`` (a changed one that the chosen loss does not
        read draws a warning). ``loss.temperature`` is every loss's: the step forms the logits."""
        schema = {f.name for f in fields(LossConfig)}
        return tuple(f"loss.{h}" for h in self.hyper if h in schema and h != "temperature")


LOSSES = Registry("loss.name", "loss")


def register_loss(name: str, fn: Callable | None = None, *, form: str = "pairwise", hyper: tuple[str, ...] = (),
                  params: dict[str, Any] | None = None, needs: tuple[str, ...] = (), replace: bool = False):
    """Register the loss ``fn`` under ``name`` (``loss.name=<name>``); a decorator without ``fn``.

    Args:
        form: how ``fn`` is called, per direction of a step:
            ``"pairwise"``: ``fn(q (B, D), positive (B, D), negatives (K, D), drop (B, K) or None, **hyper) -> ()``;
            ``"logits"``: ``fn(logits (B, 1 + K), **hyper) -> ()``, the logits [q·p, q·negativesᵀ] / T;
            ``"objective"``: ``fn(source, **hyper) -> Objective``, for a loss with state of its own.
        hyper: names of the hyper-parameters ``fn`` takes as keywords (see :class:`LossEntry`).
        params: defaults of those the schema lacks; they are set with ``loss.params.<name>=...``.
        needs: the negatives kinds it works with (empty: any).
    """
    forms = {"pairwise": pairwise, "logits": on_logits, "objective": lambda f: f}
    if form not in forms:
        raise ValueError(f"loss {name!r}: form must be one of {', '.join(forms)}, not {form!r}")
    params = dict(params or {})
    hyper = tuple(hyper) + tuple(p for p in params if p not in hyper)
    return LOSSES.add(name, fn, lambda f: LossEntry(forms[form](f), hyper, params, tuple(needs)), replace)


def pairwise(fn: Callable[..., Tensor]) -> Callable[..., Objective]:
    """Objectives of a loss over (q, p, negatives (K, D), drop) with keyword hyper-parameters."""
    def build(source: NegativeSource, **hyper) -> Objective:
        bound = functools.partial(fn, **hyper)
        return Objective(lambda q, p, neg, logits: bound(q, p, neg.embeddings, neg.drop))
    return build


def on_logits(fn: Callable[..., Tensor]) -> Callable[..., Objective]:
    """Objectives of a loss over the logits (B, 1 + K) alone."""
    def build(source: NegativeSource, **hyper) -> Objective:
        bound = functools.partial(fn, **hyper)
        return Objective(lambda q, p, neg, logits: bound(logits))
    return build


def nce_objective(source: NegativeSource) -> Objective:
    if not isinstance(source, MemoryBank):
        raise ValueError("loss.name=nce needs negatives.kind=memory_bank")
    return NCEObjective(source)


register_loss("infonce", info_nce, form="logits")
register_loss("nt_xent", info_nce, form="logits")  # NT-Xent is InfoNCE over in-batch negatives
register_loss("nce", nce_objective, form="objective", needs=("memory_bank",))  # uniform noise over the items
register_loss("pair", pair_loss, hyper=("pair_margin",))
register_loss("triplet", triplet_loss, hyper=("triplet_margin",))
register_loss("lifted", lifted_structured_loss, hyper=("lifted_margin",))
register_loss("npair", n_pair_loss)
register_loss("debiased", debiased_loss, hyper=("temperature", "tau_plus"))
register_loss("mochi", mochi_loss, hyper=("temperature", "mochi_hardest", "mochi_mix", "mochi_mix_query"))


def build_objective(cfg: LossConfig, negatives: NegativeSource) -> Objective:
    """The objective ``cfg.name`` names, each of its hyper-parameters bound from ``cfg`` by name
    (a renamed argument fails here, when the run is built, not silently at a default)."""
    entry = LOSSES[cfg.name]
    hyper = {h: getattr(cfg, h) if hasattr(cfg, h) else cfg.params.get(h, entry.params.get(h)) for h in entry.hyper}
    return entry.build(negatives, **hyper)
