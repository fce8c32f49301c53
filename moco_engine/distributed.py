"""Process-group helpers that are the identity on one process (no process group needed).

Everything here works when ``torch.distributed`` is unavailable or not initialised, so the same
training code runs under ``python``, ``moco-train`` and ``torchrun``.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor


def is_distributed() -> bool:
    """True when a process group with more than one process is up."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def is_main() -> bool:
    """True on the process that writes files and prints (rank 0)."""
    return rank() == 0


@torch.no_grad()
def all_gather_cat(t: Tensor) -> Tensor:
    """Concatenate ``t`` (B_r, ...) from every rank in rank order -> (sum_r B_r, ...).

    Ranks may hold different B_r (a ragged last batch): each pads to the largest, gathers, and
    the padding is cut off again. No gradients flow through the result.
    """
    if not is_distributed():
        return t
    sizes = [torch.zeros(1, dtype=torch.long, device=t.device) for _ in range(world_size())]
    dist.all_gather(sizes, torch.tensor([t.shape[0]], device=t.device))
    counts = [int(s.item()) for s in sizes]
    padded = t.new_zeros((max(counts), *t.shape[1:]))
    padded[: t.shape[0]] = t
    parts = [torch.empty_like(padded) for _ in counts]
    dist.all_gather(parts, padded.contiguous())
    return torch.cat([p[:n] for p, n in zip(parts, counts)])


def all_gather_with_grad(t: Tensor) -> Tensor:
    """Concatenate ``t`` (B, ...) from every rank, keeping the gradient of this rank's part.

    Used by in-batch negatives, where every key of the global batch is a negative with gradients.
    Needs the same B on every rank.
    """
    if not is_distributed():
        return t
    from torch.distributed.nn.functional import all_gather

    return torch.cat(all_gather(t.contiguous()))


def shuffle_batch(x: Tensor) -> tuple[Tensor, Tensor]:
    """Shuffle-BN's permutation of the key batch (one process).

    x: (B, ...) -> (x[perm], unshuffle) with ``y[unshuffle]`` restoring the original order of any
    per-sample output y computed on ``x[perm]``. On one process the permutation only matters
    together with split-BN (``model.bn_splits > 1``), which then sees other slices than the
    query encoder's.
    """
    perm = torch.randperm(x.shape[0], device=x.device)
    return x[perm], torch.argsort(perm)
