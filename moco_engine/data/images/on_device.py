"""The in-memory data path (``data.pipeline=device``): decode once, augment on the device.

A data set that fits in device memory (CIFAR-10: 50,000 × 3 × 32 × 32 uint8 = 154 MB) is decoded
once into one uint8 tensor on the training device; each step gathers its batch from it and
:mod:`moco_engine.data.images.augment` makes both views there, batched. No loader processes, no per-step
host-to-device copy of pixels, no host synchronisation.

The iterables here yield what the DataLoaders of the CPU path yield (``(views, targets, indices)``
batches), so the trainer and the evaluation code take either.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch
from torch import Tensor

from moco_engine.data.errors import DataError
from moco_engine.data.images.augment import apply_views, plain_views, random_views
from moco_engine.data.images.recipes import ViewSpec
from moco_engine.data.images.sets import ArrayImages, ImageSet
from moco_engine.data.sampling import EpochSampler
from moco_engine.runtime import compiling


def to_device_tensor(images: ImageSet, device: torch.device) -> Tensor:
    """All images of ``images`` as one (N, 3, H, W) uint8 tensor on ``device``.

    Raises:
        DataError: the images are not held in memory at one size (an image folder read from
            disk, or mixed sizes): those need ``data.pipeline=cpu``.
    """
    if not isinstance(images, ArrayImages) or not isinstance(images.images, np.ndarray):
        raise DataError(
            "config key 'data.pipeline' = 'device' needs a data set decoded into memory at one image size "
            "(cifar10, synthetic, embedded, or a .tar archive of equal-size images); use data.pipeline=cpu"
        )
    return torch.from_numpy(images.images).permute(0, 3, 1, 2).contiguous().to(device)


def step_generator(device: torch.device, seed: int, epoch: int, step: int, rank: int = 0) -> torch.Generator:
    """The generator of one step's views on one rank, seeded from (seed, epoch, step, rank): a
    run resumed mid-epoch draws exactly the views an uninterrupted one would, and the ranks of a
    torchrun job draw different views of their images (rank 0 draws what a single process draws)."""
    entropy = [seed, epoch, step] + ([rank] if rank else [])
    state = int(np.random.SeedSequence(entropy).generate_state(2, dtype=np.uint64)[0] >> 1)
    return torch.Generator(device=device).manual_seed(state)


class DeviceTwoViews:
    """Training batches ``((x_q, x_k), targets, indices)`` from images held on the device.

    The order is :class:`EpochSampler`'s (the same shuffle, rank split and mid-epoch skip as the
    CPU path), cut into batches (the last partial one dropped unless ``drop_last=False``).
    Both views of a batch are made in one call on the 2B images (two, for a recipe whose views differ).
    """

    def __init__(self, images: Tensor, targets: list[int], spec: ViewSpec | tuple[ViewSpec, ViewSpec], batch_size: int,
                 sampler: EpochSampler, seed: int, compile: bool = False, drop_last: bool = True):
        self.images = images  # (N, 3, H, W) uint8
        # Compiled, the ~150 small ops of a batch's views become a few fused kernels: on a GPU
        # the eager version is bound by the host's time to launch them, not by the GPU.
        self.apply = torch.compile(apply_views, dynamic=False, backend=compiling.BACKEND) if compile else apply_views
        self.targets = torch.tensor(targets, device=images.device)
        # The two views' specs: one recipe's (MoCo v3's views differ).
        self.specs = spec if isinstance(spec, tuple) else (spec, spec)
        self.spec, self.batch_size, self.sampler, self.seed = self.specs[0], batch_size, sampler, seed
        self.drop_last = drop_last

    def apply_to(self, images: Tensor, generator: torch.Generator) -> Tensor:
        """The views of ``images`` (2n, 3, H, W) uint8 under ``generator``, as a step draws them:
        its first half under the first view's spec, its second half under the second's (one
        call, the same draws, when the two specs are one)."""
        if self.specs[0] == self.specs[1]:
            return random_views(images, self.spec, generator, self.apply)
        n = len(images) // 2
        return torch.cat([random_views(images[:n], self.specs[0], generator, self.apply),
                          random_views(images[n:], self.specs[1], generator, self.apply)])

    def __len__(self) -> int:
        share = self.sampler.share_size()
        return share // self.batch_size if self.drop_last else -(-share // self.batch_size)

    def __iter__(self) -> Iterator[tuple[tuple[Tensor, Tensor], Tensor, Tensor]]:
        device = self.images.device
        epoch = self.sampler.epoch
        # The epoch's order goes to the device once; each step slices it.
        order = torch.tensor([i for _, i in self.sampler], device=device, dtype=torch.long)
        first_step = self.sampler.skip // self.batch_size
        steps = len(order) // self.batch_size if self.drop_last else -(-len(order) // self.batch_size)
        for k in range(steps):
            idx = order[k * self.batch_size : (k + 1) * self.batch_size]
            batch = self.images[idx]
            g = step_generator(device, self.seed, epoch, first_step + k, self.sampler.rank)
            views = self.apply_to(torch.cat([batch, batch]), g)
            yield (views[: len(idx)], views[len(idx) :]), self.targets[idx], idx


class DevicePlain:
    """Evaluation batches ``(x, targets, indices)`` in index order, as the CPU path's
    ``Indexed(images, eval_transform)`` loader yields them."""

    def __init__(self, images: Tensor, targets: list[int], batch_size: int, size: int, mean, std):
        self.images = images
        self.targets = torch.tensor(targets, device=images.device)
        self.batch_size, self.size, self.mean, self.std = batch_size, size, mean, std

    def __len__(self) -> int:
        return -(-len(self.images) // self.batch_size)

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor, Tensor]]:
        n = len(self.images)
        for start in range(0, n, self.batch_size):
            idx = torch.arange(start, min(start + self.batch_size, n), device=self.images.device)
            yield plain_views(self.images[start : start + self.batch_size], self.size, self.mean, self.std), self.targets[idx], idx
