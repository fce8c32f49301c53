"""Where negatives come from: the ``NegativeSource`` interface and the MoCo queue.

The training step asks a source for a snapshot of K negatives, computes the loss, steps the
optimizer, and only then hands the source the batch's keys::

    neg = source.negatives()          # (K, D), detached
    loss = info_nce(q, k, neg, T)     # q: (B, D) with gradients, k: (B, D) keys
    loss.backward(); optimizer.step()
    source.update(k, idx)             # keys (B, D) and their data-set indices (B,)

A source is an ``nn.Module`` whose state lives in persistent buffers, so ``state_dict()`` carries
it into every checkpoint and ``.to(device)`` keeps it on the training device. It lives outside
any DDP wrapper: every process updates it identically from the gathered keys.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class NegativeSource(nn.Module):
    """The contract every kind of negatives follows (queue, memory bank, in-batch)."""

    def negatives(self) -> Tensor:
        """A snapshot (K, D) of the negatives, detached; a later :meth:`update` never changes it."""
        raise NotImplementedError

    def update(self, keys: Tensor, indices: Tensor) -> None:
        """Take in a batch of keys (B, D) and their data-set indices (B,); any B >= 1."""
        raise NotImplementedError

    def on_epoch_end(self, epoch: int) -> None:
        """Hook at the end of every epoch (the memory bank refreshes here); a no-op by default."""

    def metrics(self) -> dict[str, Tensor]:
        """Scalars about the source's state, as 0-d tensors (no host sync)."""
        return {}


class Queue(NegativeSource):
    """MoCo's queue: a ring buffer of the K most recent keys, on the training device.

    Any K >= 1 and any batch size B: a batch wraps around the end of the buffer, a batch larger
    than K keeps its last K keys, and a ragged last batch is just a smaller B (no ``K % B == 0``
    rule). The buffer starts as random unit vectors, as in the paper's code.

    Buffers (persistent, in ``state_dict``):
        keys: (K, D) the stored keys, oldest overwritten first.
        ptr: () int64, the slot the next key goes to.
    """

    def __init__(self, size: int, dim: int, generator: torch.Generator | None = None) -> None:
        super().__init__()
        if size < 1 or dim < 1:
            raise ValueError(f"queue needs K >= 1 and D >= 1, got K={size}, D={dim}")
        self.size = size
        self.dim = dim
        self.register_buffer("keys", F.normalize(torch.randn(size, dim, generator=generator), dim=1))
        self.register_buffer("ptr", torch.zeros((), dtype=torch.long))

    def negatives(self) -> Tensor:
        """(K, D). ``update`` writes out of place, so this tensor is never modified later."""
        return self.keys

    @torch.no_grad()
    def update(self, keys: Tensor, indices: Tensor | None = None) -> None:
        """Enqueue keys (B, D): slot ``(ptr + i) % K`` gets key i; ptr advances by B."""
        b = keys.shape[0]
        if b == 0:
            return
        if keys.shape[1] != self.dim:
            raise ValueError(f"queue holds keys of dimension {self.dim}, got {tuple(keys.shape)}")
        # Of more than K keys only the last K survive; dropping the rest first keeps the
        # written slots distinct (index_copy with repeated indices has no defined winner).
        kept = keys[-self.size :] if b > self.size else keys
        start = self.ptr + (b - kept.shape[0])
        slots = (start + torch.arange(kept.shape[0], device=self.keys.device)) % self.size
        # Out of place: a snapshot handed out by negatives() may still be saved by autograd.
        self.keys = self.keys.index_copy(0, slots, kept.detach().to(self.keys.dtype))
        self.ptr = (self.ptr + b) % self.size
