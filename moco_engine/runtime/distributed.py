"""Process-group helpers that are the identity on one process (no process group needed).

Everything here works when ``torch.distributed`` is unavailable or not initialised, so the same
training code runs under ``python``, ``moco-train`` and ``torchrun``.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from moco_engine.runtime.batches import View, batch_size, first_tensor, map_tensors


def launched_by_torchrun() -> bool:
    """True when torchrun (or another launcher) set WORLD_SIZE > 1 for this process."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


def setup(device_type: str) -> None:
    """Join the process group torchrun describes (RANK, WORLD_SIZE, MASTER_ADDR/PORT in the
    environment): NCCL for CUDA, gloo for CPU. A no-op for a single process."""
    if not launched_by_torchrun() or (dist.is_available() and dist.is_initialized()):
        return
    if device_type == "cuda":
        torch.cuda.set_device(local_rank())
    backend = "nccl" if device_type == "cuda" else "gloo"
    if _one_agent_shares_its_store():
        # torchrun's agent keeps one store for the whole job, and the process group's keys (each
        # rank's gloo address, NCCL's unique id) carry no round: a worker group restarted by
        # --max-restarts could read its dead predecessors' addresses and hang or be refused.
        # One agent means one restart count for every worker, so it names a fresh key space.
        store, rank_, world = next(dist.rendezvous("env://"))
        store = dist.PrefixStore(f"moco_engine/restart{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}", store)
        dist.init_process_group(backend=backend, store=store, rank=rank_, world_size=world)
    else:
        dist.init_process_group(backend=backend)


def _one_agent_shares_its_store() -> bool:
    """True under a single-node torchrun whose agent shares its store with the workers.

    With several nodes each agent counts its own restarts (an agent whose workers were still
    healthy restarts them without counting), so the count cannot name a round there; the
    multi-node command of docs/scale.md sets TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 instead, which gives
    every round its own store.
    """
    return (os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"
            and os.environ.get("LOCAL_WORLD_SIZE") == os.environ.get("WORLD_SIZE"))


def teardown() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def restarted() -> bool:
    """True in a process that torchrun restarted after a failure (``--max-restarts``)."""
    return int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")) > 0


@torch.no_grad()
def all_reduce_mean(t: Tensor) -> Tensor:
    """The mean of ``t`` over the ranks (``t`` itself on one process)."""
    if not is_distributed():
        return t
    t = t.clone()
    dist.all_reduce(t)
    return t / world_size()


def any_rank(flag: bool, device: torch.device) -> bool:
    """True when ``flag`` is true on any rank (a collective: every rank must call it)."""
    if not is_distributed():
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def all_gather_objects(obj: Any) -> list[Any]:
    """Every rank's ``obj`` (picklable; tensors on the CPU) in rank order, a collective;
    ``[obj]`` on one process."""
    if not is_distributed():
        return [obj]
    out: list[Any] = [None] * world_size()
    dist.all_gather_object(out, obj)
    return out


@contextlib.contextmanager
def rank_mean_buffers(*modules: torch.nn.Module | None) -> Iterator[None]:
    """Inside, every floating-point buffer of ``modules`` (BatchNorm's running statistics) holds
    its mean over the ranks; on leaving, each rank's own values come back, so how often this
    runs never changes training. One all-reduce; the identity on one process.

    DDP's buffer broadcast is off, so each rank's statistics follow its own batches: the mean
    is what evaluation uses and what checkpoints hold as the model's.
    """
    buffers = [b for m in modules if m is not None for b in m.buffers() if b.is_floating_point()]
    if not is_distributed() or not buffers:
        yield
        return
    own = [b.clone() for b in buffers]
    flat = torch.cat([b.reshape(-1).float() for b in buffers])
    dist.all_reduce(flat)
    flat /= world_size()
    with torch.no_grad():
        for b, part in zip(buffers, flat.split([b.numel() for b in buffers])):
            b.copy_(part.view_as(b))
    try:
        yield
    finally:
        with torch.no_grad():
            torch._foreach_copy_(buffers, own)


def barrier() -> None:
    """Wait for every rank (a no-op on one process)."""
    if is_distributed():
        dist.barrier()


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


def gather_sizes(n: int, device: torch.device) -> list[int]:
    """Every rank's n, in rank order (a collective with a host sync)."""
    if not is_distributed():
        return [n]
    sizes = [torch.zeros(1, dtype=torch.long, device=device) for _ in range(world_size())]
    dist.all_gather(sizes, torch.tensor([n], device=device))
    return [int(s.item()) for s in sizes]


@torch.no_grad()
def all_gather_cat(t: Tensor, same_size: bool = False) -> Tensor:
    """Concatenate ``t`` (B_r, ...) from every rank in rank order -> (sum_r B_r, ...).

    Ranks may hold different B_r (a ragged last batch): each pads to the largest, gathers, and
    the padding is cut off again. ``same_size=True`` promises equal B_r and skips exchanging
    the sizes (and its host sync). No gradients flow through the result.
    """
    if not is_distributed():
        return t
    if same_size:
        parts = [torch.empty_like(t) for _ in range(world_size())]
        dist.all_gather(parts, t.contiguous())
        return torch.cat(parts)
    counts = gather_sizes(t.shape[0], t.device)
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


def shuffle_batch(x: View, same_size: bool = True) -> tuple[View, Callable[[Tensor], Tensor]]:
    """Shuffle-BN's permutation of the key batch, across all ranks when there are several.

    x: (B, ...) this rank's inputs (a tensor, or a dict of tensors permuted alike) -> (x',
    restore): x' is this rank's share of the global batch after a random permutation (so its
    BatchNorm sees samples of other ranks, as in the official MoCo), and ``restore(y)`` takes any
    per-sample output y (B', ...) computed on x' back to this rank's original B samples, in
    order. On one process the permutation matters together with split-BN
    (``model.bn_splits > 1``), whose slices then differ from the query encoder's.
    """
    b = batch_size(x)
    device = first_tensor(x).device
    if not is_distributed():
        perm = torch.randperm(b, device=device)
        unshuffle = torch.argsort(perm)
        return map_tensors(x, lambda t: t[perm]), lambda y: y[unshuffle]
    counts = [b] * world_size() if same_size else gather_sizes(b, device)
    everything = map_tensors(x, lambda t: all_gather_cat(t, same_size))
    perm = torch.randperm(sum(counts), device=device)
    dist.broadcast(perm, src=0)  # one permutation for all ranks: rank 0's
    unshuffle = torch.argsort(perm)
    start = sum(counts[: rank()])
    mine = slice(start, start + counts[rank()])

    def restore(y: Tensor) -> Tensor:
        return all_gather_cat(y, same_size)[unshuffle[mine]]

    return map_tensors(everything, lambda t: t[perm[mine]]), restore
