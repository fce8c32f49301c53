"""Images that stay encoded until the training device (``data.decode=gpu``).

The loader's processes only read each item's JPEG bytes: no decoding, no augmentation on the
host. The training device decodes a batch at once (``torchvision.io.decode_jpeg``: nvJPEG on
CUDA, libjpeg-turbo on the CPU, so the same code runs and is tested on a CPU) and makes both
views there with the device path's augmentations (``augment.ragged_views``: each image cropped
from its own size, the colour operations on the whole batch). A step's views are seeded by
(seed, epoch, step, rank), as ``images/on_device.py``'s in-memory path seeds them, and the items come in
:class:`~moco_engine.data.sampling.EpochSampler`'s order: a resume goes on mid-epoch exactly.

``data.decode=cpu`` (PIL in the loader, the recipe's PIL transforms) stays the fallback. The two
decoders give the same pixels up to their rounding (BENCHMARKS.md: measured on CPU; nvJPEG's on
the GPU is pending), and from the same pixels these views are the device path's exactly.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator

import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset
from torchvision.io import ImageReadMode, decode_jpeg

from moco_engine.data.errors import DataError
from moco_engine.data.images.augment import ragged_views
from moco_engine.data.images.on_device import step_generator
from moco_engine.data.images.recipes import ViewSpec
from moco_engine.data.sampling import EpochSampler, quiet_worker_signals


class EncodedItems(Dataset):
    """Item i as ``(its encoded bytes (L,) uint8, target, i)``, keyed ``(epoch, i)`` as
    :class:`EpochSampler` yields (the key's epoch is not needed: nothing random happens here)."""

    def __init__(self, items):
        self.items = items  # a set with ``load_encoded(i)`` (reader.ShardImages)

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, key: tuple[int, int]) -> tuple[Tensor, int, int]:
        i = key[1] if isinstance(key, tuple) else key
        return self.items.load_encoded(i), self.items.targets[i], i


def collate_encoded(batch: list[tuple[Tensor, int, int]]) -> tuple[list[Tensor], Tensor, Tensor]:
    data, targets, indices = zip(*batch)
    return list(data), torch.tensor(targets), torch.tensor(indices)


def decode_batch(data: list[Tensor], indices: Tensor, device: torch.device, items) -> list[Tensor]:
    """A batch of JPEG bytes as uint8 (3, H_i, W_i) images on ``device``, decoded there. An
    image that does not decode is ``items.skip``'s to judge (stop, or count it and go on): it
    is replaced by the batch's next good image, so the batch keeps its size."""
    items.reads += len(data)  # the share of bad images is of those decoded in this process
    with warnings.catch_warnings():
        # torchvision 0.29 deprecates its image decoders for TorchCodec's; this function is the
        # one place that decodes, to move when TorchCodec's JPEG decoding is measured on the GPU.
        warnings.simplefilter("ignore", DeprecationWarning)
        return decode_each(data, indices, device, items)


def decode_each(data: list[Tensor], indices: Tensor, device: torch.device, items) -> list[Tensor]:
    try:
        return decode_jpeg(data, mode=ImageReadMode.RGB, device=device)
    except RuntimeError:  # one bad image fails the batched call: find it
        pass
    images: list[Tensor | None] = []
    for x, i in zip(data, indices.tolist()):
        try:
            images.append(decode_jpeg(x, mode=ImageReadMode.RGB, device=device))
        except RuntimeError as e:
            items.skip(i, f"{e} (decoded on {device}; data.decode=cpu reads any format PIL reads)")
            images.append(None)
    good = [x for x in images if x is not None]
    if not good:
        raise DataError(f"no image of a batch of {len(data)} decodes on {device}")
    return [x if x is not None else good[k % len(good)] for k, x in enumerate(images)]


class StreamTwoViews:
    """Training batches ``((x_q, x_k), targets, indices)`` from encoded images: read by the
    loader's workers in ``sampler``'s order, decoded and viewed on ``device``."""

    def __init__(self, items, specs: tuple[ViewSpec, ViewSpec], batch_size: int, sampler: EpochSampler, seed: int,
                 num_workers: int, device: torch.device, drop_last: bool = True):
        self.loader = DataLoader(EncodedItems(items), batch_size=batch_size, sampler=sampler, num_workers=num_workers,
                                 drop_last=drop_last, collate_fn=collate_encoded, persistent_workers=num_workers > 0,
                                 generator=torch.Generator().manual_seed(0),
                                 worker_init_fn=quiet_worker_signals)
        self.items = items
        self.specs, self.batch_size, self.sampler, self.seed, self.device = specs, batch_size, sampler, seed, device

    def __len__(self) -> int:
        return len(self.loader)

    def views(self, images: list[Tensor], generator: torch.Generator) -> tuple[Tensor, Tensor]:
        """Both views of a batch under one step's generator: the 2n images in one call when the
        specs are one (as the in-memory device path draws them)."""
        n = len(images)
        if self.specs[0] == self.specs[1]:
            views = ragged_views(images + images, self.specs[0], generator)
            return views[:n], views[n:]
        return ragged_views(images, self.specs[0], generator), ragged_views(images, self.specs[1], generator)

    def __iter__(self) -> Iterator[tuple[tuple[Tensor, Tensor], Tensor, Tensor]]:
        epoch, first_step = self.sampler.epoch, self.sampler.skip // self.batch_size
        for k, (data, targets, indices) in enumerate(self.loader):
            images = decode_batch(data, indices, self.device, self.items)
            generator = step_generator(self.device, self.seed, epoch, first_step + k, self.sampler.rank)
            yield self.views(images, generator), targets, indices
