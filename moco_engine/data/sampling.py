"""What a CPU loader draws from an item set: items with their index, two views of each, an
epoch's order, and the DataLoader around them (workers that outlast a stop signal).

- :class:`Indexed`: item i is ``(transform(image_i), target_i, i)``, its randomness seeded by
  (seed, epoch, i), so a resumed run sees the views an uninterrupted one would;
- :class:`TwoViews`: the query and key views of one image (the recipes are in ``images/recipes.py``);
- :class:`EpochSampler`: each epoch's permutation, sharded over the ranks in equal shares;
- :func:`make_loader`, :func:`quiet_worker_signals`.

The image sets themselves (embedded, CIFAR-10, folders, archives, synthetic) are ``images/sets.py``'s.
"""

from __future__ import annotations

import contextlib
import os
import signal
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from moco_engine.data.items import ItemSet


class TwoViews:
    """Two independent random views (x_q, x_k) of one item: ``transform`` twice, or, for a
    recipe whose views differ (MoCo v3's), ``transform`` then ``second``."""

    def __init__(self, transform: Callable, second: Callable | None = None):
        self.transform, self.second = transform, second or transform

    def __call__(self, item: Any) -> tuple[Any, Any]:
        return self.transform(item), self.second(item)


class Indexed(Dataset):
    """``items`` seen through ``transform``; item i is ``(transform(item_i), target_i, i)``.

    Keyed by ``(epoch, i)`` (as :class:`EpochSampler` yields), the transform's randomness is
    seeded from ``(seed, epoch, i)``: an item's augmentation is the same whichever worker draws
    it, so a run resumed mid-epoch sees exactly the views an uninterrupted run would have.
    """

    def __init__(self, items: ItemSet, transform: Callable, seed: int = 0):
        self.items = items
        self.transform = transform
        self.seed = seed

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, key: int | tuple[int, int]):
        if isinstance(key, tuple):
            epoch, i = key
            # The CPU generator keeps 32 bits of a seed: hash the triple into them.
            seed = int(np.random.SeedSequence([self.seed, epoch, i]).generate_state(1)[0])
            # A loader worker's RNG is its own; in the main process, leave the training's alone.
            in_worker = torch.utils.data.get_worker_info() is not None
            with contextlib.nullcontext() if in_worker else torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)
                view = self.transform(self.items.load(i))
        else:
            i = key
            view = self.transform(self.items.load(i))
        return view, self.items.targets[i], i


# ---------------------------------------------------------------------------------------------
# Sampling and loading
# ---------------------------------------------------------------------------------------------
class EpochSampler(Sampler[tuple[int, int]]):
    """A seeded shuffle per epoch that can resume mid-epoch, split across ranks.

    It yields ``(epoch, index)`` keys, so :class:`Indexed` can seed each item's augmentation.

    Epoch e's order is ``randperm(N)`` drawn from ``seed + e``, so it is the same on every rank
    and after a restart; rank r takes positions r, r + W, r + 2W, ... (as DistributedSampler
    does: with W > 1 the order is first padded with its own first items to a multiple of W, so
    every rank has the same number of items and of steps), and ``skip`` drops the first items of
    this rank's share (the part of the epoch done before a checkpoint).
    """

    def __init__(self, n: int, seed: int = 0, shuffle: bool = True, rank: int = 0, world: int = 1):
        self.n, self.seed, self.shuffle, self.rank, self.world = n, seed, shuffle, rank, world
        self.epoch = 0
        self.skip = 0

    def set_epoch(self, epoch: int, skip: int = 0) -> None:
        self.epoch, self.skip = epoch, skip

    def _share(self) -> list[int]:
        if self.shuffle:
            g = torch.Generator().manual_seed(self.seed + self.epoch)
            order = torch.randperm(self.n, generator=g).tolist()
        else:
            order = list(range(self.n))
        order += order[: self.share_size() * self.world - self.n]  # equal shares on every rank
        return order[self.rank :: self.world]

    def share_size(self) -> int:
        """Items per rank per epoch, before ``skip``: ceil(N / W)."""
        return -(-self.n // self.world)

    def __iter__(self) -> Iterator[tuple[int, int]]:
        return ((self.epoch, i) for i in self._share()[self.skip :])

    def __len__(self) -> int:
        return max(self.share_size() - self.skip, 0)


class ReshuffledEpochs(EpochSampler):
    """A fresh seeded shuffle each time it is iterated: one pass of a loader is one epoch (the
    linear probe's)."""

    def __iter__(self) -> Iterator[tuple[int, int]]:
        keys = list(super().__iter__())
        self.epoch += 1
        return iter(keys)


def make_loader(
    dataset: Dataset,
    batch_size: int,
    num_workers: int,
    sampler: Sampler | None = None,
    drop_last: bool = False,
    pin_memory: bool = False,
) -> DataLoader:
    """A DataLoader with persistent workers (epochs do not pay the worker start-up again).

    It has a generator of its own, so starting an iteration draws nothing from the global RNG:
    a run resumed mid-epoch then continues the very random stream an uninterrupted run would
    (augmentations are seeded per item, see :class:`Indexed`).
    """
    return DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=sampler,
        shuffle=False,
        num_workers=num_workers,
        drop_last=drop_last,
        pin_memory=pin_memory,
        persistent_workers=num_workers > 0,
        generator=torch.Generator().manual_seed(0),
        worker_init_fn=quiet_worker_signals,
    )


def end_workers(loader: Any) -> None:
    """End a :func:`make_loader` DataLoader's persistent workers now, cleanly (anything else is
    left as it is). torch has no public call for it: its persistent iterator shuts its workers
    down when dropped, and ``tests/test_data.py`` checks that the attribute holding it is still
    there (an upgrade that renames it fails there, not silently here)."""
    if isinstance(loader, DataLoader) and getattr(loader, "_iterator", None) is not None:
        loader._iterator = None


WORKER_GRACE_S = 10  # how long a loader worker serves on after SIGTERM (the main process's stop)


def quiet_worker_signals(worker_id: int = 0) -> None:
    """A loader worker's ``worker_init_fn``. SIGTERM/SIGINT sent to the whole process group
    (Ctrl-C, a scheduler) must not kill a worker outright: torch would then raise in the main
    process wherever it is, mid-step too. A worker ignores SIGINT (the main process decides),
    and on SIGTERM serves on for :data:`WORKER_GRACE_S` seconds (the main process finishes its
    step with the batches under way, saves, and ends the workers) before it leaves with exit
    code 0, which torch does not count as a failure."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, _leave_after_grace)


def _leave_after_grace(signum: int, frame) -> None:
    signal.signal(signal.SIGALRM, lambda *_: os._exit(0))
    signal.alarm(WORKER_GRACE_S)
