"""Where negatives come from: the ``NegativeSource`` interface, its kinds, and their registry
(``negatives.kind``).

- :class:`Queue`: MoCo's ring buffer of the K most recent keys (He et al. 2020).
- ``memory_bank.MemoryBank``: one stored embedding per data-set item, K of them sampled per step
  (Wu et al. 2018); its own module, registered from there.
- :class:`InBatch`: the other items of the batch, end to end with gradients (SimCLR's NT-Xent).
- :class:`MomentumBatch`: the other items' momentum keys, no gradients (MoCo v3's).

The training step asks the source for the negatives of a batch, computes the loss, steps the
optimizer, and only then hands the source the batch's keys::

    neg = source.negatives(q, k, idx)   # Negatives((K, D), drop (B, K) or None)
    loss = info_nce(info_nce_logits(q, k, neg.embeddings, T, neg.drop))
    loss.backward(); optimizer.step()
    source.update(k, idx)               # keys (B, D) and their data-set indices (B,)

A source is an ``nn.Module`` whose state lives in persistent buffers, so ``state_dict()`` carries
it into every checkpoint and ``.to(device)`` keeps it on the training device. It lives outside
any DDP wrapper: every process updates it identically from the gathered keys.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from moco_engine.config.registry import Registry
from moco_engine.config.schema import Config
from moco_engine.runtime import distributed as dist

STORAGE_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class Negatives(NamedTuple):
    """The negatives of one batch.

    Attributes:
        embeddings: (K, D) shared by every query of the batch.
        drop: (B, K) bool or None; True where an entry must not count as a negative of that
            query (it is the query's own item), and its logit becomes -inf.
    """

    embeddings: Tensor
    drop: Tensor | None = None


class NegativeSource(nn.Module):
    """The contract every kind of negatives follows (queue, memory bank, in-batch)."""

    #: True when keys must come from the query encoder with gradients (end to end, no EMA).
    end_to_end = False
    #: True when it keeps negatives of its own (the queue, the bank): MoCo v3 appends them to the
    #: batch's momentum keys.
    stored = False

    def negatives(self, queries: Tensor, keys: Tensor, indices: Tensor) -> Negatives:
        """The negatives for queries (B, D) whose positive keys are keys (B, D).

        A stored source returns a detached snapshot that a later :meth:`update` never changes.
        """
        raise NotImplementedError

    def positives(self, indices: Tensor) -> Tensor | None:
        """(B, D) positives supplied by the source itself (the memory bank's v_i), else None."""
        return None

    def update(self, keys: Tensor, indices: Tensor) -> None:
        """Take in a batch of keys (B, D) and their data-set indices (B,); any B >= 1."""

    def on_start(self, encode: Callable[[], Tensor]) -> None:
        """Hook before the first step of a fresh run (not a resumed one); ``encode()`` returns
        every item's embedding (N, D)."""

    def on_epoch_end(self, epoch: int, encode: Callable[[], Tensor]) -> None:
        """Hook at the end of every epoch; ``encode()`` returns every item's embedding (N, D)."""

    def metrics(self, indices: Tensor) -> dict[str, Tensor]:
        """Scalars about the source's state for a batch's indices (B,), as 0-d tensors."""
        return {}

    def memory_bytes(self) -> int:
        """Bytes held in the source's buffers."""
        return sum(b.numel() * b.element_size() for b in self.buffers())


class Queue(NegativeSource):
    """MoCo's queue: a ring buffer of the K most recent keys, on the training device.

    Any K >= 1 and any batch size B: a batch wraps around the end of the buffer, a batch larger
    than K keeps its last K keys, and a ragged last batch is just a smaller B (no ``K % B == 0``
    rule). The buffer starts as random unit vectors, as in the paper's code. Keys may be stored
    in bfloat16 or float16 to halve the memory; logits are always formed in float32.

    Each slot also remembers whose key it holds and when it was written, so the queue can report
    its age and, with ``mask_same_instance``, keep a query's own older key out of its negatives
    (which matters once K approaches the data set's size).

    Buffers (persistent, in ``state_dict``):
        keys: (K, D) the stored keys, oldest overwritten first.
        index: (K,) int64 data-set index of each slot's key (-1: still the random start).
        written: (K,) int64 value of ``clock`` when the slot was written.
        clock: () int64, the number of updates so far.
        ptr: () int64, the slot the next key goes to.
    """

    stored = True

    def __init__(self, size: int, dim: int, mask_same_instance: bool = False, dtype: str = "float32",
                 generator: torch.Generator | None = None) -> None:
        super().__init__()
        if size < 1 or dim < 1:
            raise ValueError(f"queue needs K >= 1 and D >= 1, got K={size}, D={dim}")
        self.size = size
        self.dim = dim
        self.mask_same_instance = mask_same_instance
        start = F.normalize(torch.randn(size, dim, generator=generator), dim=1)
        self.register_buffer("keys", start.to(STORAGE_DTYPES[dtype]))
        self.register_buffer("index", torch.full((size,), -1, dtype=torch.long))
        self.register_buffer("written", torch.zeros(size, dtype=torch.long))
        self.register_buffer("clock", torch.zeros((), dtype=torch.long))
        self.register_buffer("ptr", torch.zeros((), dtype=torch.long))

    def negatives(self, queries: Tensor | None = None, keys: Tensor | None = None,
                  indices: Tensor | None = None) -> Negatives:
        """(K, D) keys; ``update`` writes out of place, so this tensor is never modified later."""
        drop = None
        if self.mask_same_instance and indices is not None:
            drop = self.index[None, :] == indices[:, None]  # (B, K)
        return Negatives(self.keys, drop)

    @torch.no_grad()
    def update(self, keys: Tensor, indices: Tensor | None = None) -> None:
        """Enqueue keys (B, D): slot ``(ptr + i) % K`` gets key i; ptr advances by B."""
        b = keys.shape[0]
        if b == 0:
            return
        if keys.shape[1] != self.dim:
            raise ValueError(f"queue holds keys of dimension {self.dim}, got {tuple(keys.shape)}")
        if indices is None:
            indices = torch.full((b,), -1, dtype=torch.long, device=keys.device)
        # Of more than K keys only the last K survive; dropping the rest first keeps the
        # written slots distinct (index_copy with repeated indices has no defined winner).
        kept = min(b, self.size)
        start = self.ptr + (b - kept)
        slots = (start + torch.arange(kept, device=self.keys.device)) % self.size
        # Out of place: a snapshot handed out by negatives() may still be saved by autograd.
        self.keys = self.keys.index_copy(0, slots, keys[-kept:].detach().to(self.keys.dtype))
        self.index = self.index.index_copy(0, slots, indices[-kept:].to(self.index.device))
        self.written = self.written.index_fill(0, slots, self.clock)
        self.clock = self.clock + 1
        self.ptr = (self.ptr + b) % self.size

    @torch.no_grad()
    def metrics(self, indices: Tensor) -> dict[str, Tensor]:
        """fill (share of slots holding real keys), mean and max age (updates since written),
        the share of the batch whose own older key is in the queue, and of those it scores."""
        filled = self.index >= 0
        held = torch.isin(indices, self.index).float().mean()  # the share of the batch whose own older key is held
        age = (self.clock - self.written).float()
        n = filled.sum().clamp(min=1)
        return {
            "queue_fill": filled.float().mean(),
            "queue_age_mean": torch.where(filled, age, 0.0).sum() / n,
            "queue_age_max": torch.where(filled, age, 0.0).max(),
            "queue_same_instance": held,
            # ... and among the negatives actually scored: none when the mask drops them.
            "queue_same_instance_scored": torch.zeros_like(held) if self.mask_same_instance else held,
        }


class InBatch(NegativeSource):
    """End-to-end negatives: the other items of the (global) batch, with gradients.

    Both branches are the query encoder (no EMA, no stored state). For a query q_i with positive
    k_i the negatives are every other key k_j and every other query q_j, as in SimCLR's NT-Xent:
    2B - 2 negatives per query for a batch of B (gathered over all processes).
    """

    end_to_end = True

    def negatives(self, queries: Tensor, keys: Tensor, indices: Tensor) -> Negatives:
        """(2G, D) all keys then all queries of the global batch of G items; each query's own key
        (its positive) and its own query are dropped."""
        all_keys = dist.all_gather_with_grad(keys)
        all_queries = dist.all_gather_with_grad(queries)
        all_indices = dist.all_gather_cat(indices, same_size=True)  # equal batches on every rank (EpochSampler)
        own = all_indices[None, :] == indices[:, None]  # (B, G)
        return Negatives(torch.cat([all_keys, all_queries]), torch.cat([own, own], dim=1))


class MomentumBatch(NegativeSource):
    """The momentum keys of the other items of the (global) batch, without gradients: MoCo v3's
    negatives, and for ``method=moco`` MoCo without a queue. Unlike :class:`InBatch` (SimCLR's)
    the keys come from f_k, and the queries are not negatives."""

    def negatives(self, queries: Tensor, keys: Tensor, indices: Tensor) -> Negatives:
        """(G, D) the keys of the global batch of G items; each query's own key is dropped."""
        all_keys = dist.all_gather_cat(keys.detach(), same_size=True)
        all_indices = dist.all_gather_cat(indices, same_size=True)  # equal batches on every rank (EpochSampler)
        return Negatives(all_keys, all_indices[None, :] == indices[:, None])


class NoNegatives(NegativeSource):
    """A method's without negatives (BYOL's): no negatives and no state (BYOL's loss regresses the
    target network's projection)."""

    def negatives(self, queries: Tensor, keys: Tensor, indices: Tensor) -> Negatives:
        raise RuntimeError("this run's method takes no negatives (it was registered with negatives=False)")


# =============================================================================== the registry
@dataclass(frozen=True)
class NegativesEntry:
    """A registered kind of negatives (``negatives.kind``).

    Attributes:
        build: ``build(cfg, num_items) -> NegativeSource`` for a data set of ``num_items`` items.
        reads: the settings it reads among those other kinds read (``queue``, ``memory_bank``).
        planned: ``planned(cfg, num_items) -> (setting, what, bytes)``: the buffers it will hold,
            checked against the device's memory before anything is allocated (None: none).
    """

    build: Callable[[Config, int], NegativeSource]
    reads: tuple[str, ...] = ()
    planned: Callable[[Config, int], tuple[str, str, int]] | None = None


NEGATIVES = Registry("negatives.kind", "kind of negatives")


def register_negatives(name: str, build: Callable | None = None, *, reads: tuple[str, ...] = (),
                       planned: Callable | None = None, replace: bool = False):
    """Register ``build(cfg, num_items) -> NegativeSource`` under ``name``; a decorator without ``build``."""
    return NEGATIVES.add(name, build, lambda fn: NegativesEntry(fn, tuple(reads), planned), replace)


def queue_bytes(cfg: Config, num_items: int) -> tuple[str, str, int]:
    """The queue's buffers, the float32 draw of its start included."""
    k, d = cfg.queue.size, cfg.model.dim
    storage = STORAGE_DTYPES[cfg.queue.dtype].itemsize
    return "queue.size", f"the queue of K={k} keys of D={d}", k * d * (4 + storage) + k * 8


def masks_same_instance(setting: str, size: int, num_items: int) -> bool:
    """``queue.mask_same_instance``: "auto" masks when K is at least half an epoch's items, where
    the queue holds most items' own older keys (a 1,000-image set with K = 4,096 holds each about
    four times); "true" and "false" decide alone."""
    return setting == "true" or (setting == "auto" and 2 * size >= num_items)


@register_negatives("queue", reads=("queue",), planned=queue_bytes)
def build_queue(cfg: Config, num_items: int) -> Queue:
    """A queue of K keys for ``num_items`` items an epoch; one warning line when K exceeds them."""
    k = cfg.queue.size
    mask = masks_same_instance(cfg.queue.mask_same_instance, k, num_items)
    if k > num_items and dist.is_main():
        held = "masked from their own queries" if mask else "scored as negatives: queue.mask_same_instance=false"
        warnings.warn(f"queue.size K={k} is more than an epoch's {num_items} items: the queue holds items' own "
                      f"older keys, {held}", stacklevel=2)
    return Queue(k, cfg.model.dim, mask, cfg.queue.dtype)


register_negatives("in_batch", lambda cfg, num_items: InBatch())
register_negatives("momentum_batch", lambda cfg, num_items: MomentumBatch())


def planned_bytes(cfg: Config, num_items: int) -> tuple[str, str, int]:
    """(setting, what, bytes) of the source ``cfg`` would build: the key that sizes its buffers,
    their description, and the bytes they take while being built."""
    planned = NEGATIVES[cfg.negatives.kind].planned
    return planned(cfg, num_items) if planned is not None else ("negatives.kind", "no stored negatives", 0)


def build_source(cfg: Config, num_items: int) -> NegativeSource:
    """The negative source ``negatives.kind`` names, for ``num_items`` items (a method without
    negatives builds :class:`NoNegatives` instead: ``step.build_parts``)."""
    return NEGATIVES[cfg.negatives.kind].build(cfg, num_items)
