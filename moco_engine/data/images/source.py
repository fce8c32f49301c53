"""What every image source is to the run: :class:`ImageSource`, image sets viewed through the
``data.augmentation`` recipe on either input path.

- ``data.pipeline=cpu``: DataLoaders, the items viewed by the recipe's PIL transforms in
  ``data.num_workers`` processes (the loaders' mechanism, ``data/loaders.py``);
- ``data.pipeline=device``: decoded once into device memory and augmented there in batches
  (``on_device.py``; each step's views seeded by (seed, epoch, step, rank));
- ``data.pipeline=auto`` (the default): the device path for the sources registered
  ``in_memory`` (:func:`resolve_pipeline`).

A function registered with :func:`~moco_engine.data.sources.register_data_source` whose items
carry no view of their own is opened as one (the built-in ``embedded``, ``cifar10``,
``imagefolder`` and ``synthetic``); the shards source extends it (``shards/source.py``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import DataLoader, Sampler

from moco_engine.config.schema import Config, DataConfig
from moco_engine.data.images.on_device import (
    DevicePlain,
    DeviceTwoViews,
    step_generator,
    to_device_tensor,
)
from moco_engine.data.images.recipes import (
    eval_transform,
    probe_transform,
    view_specs,
    view_transforms,
)
from moco_engine.data.items import ItemSet, Splits
from moco_engine.data.loaders import (
    Loaders,
    assembled,
    epoch_sampler,
    item_loaders,
    plain_items,
    probe_items,
    refuse_gpu_decode,
)
from moco_engine.data.sources import DataSource, source_entry


def resolve_pipeline(data: DataConfig) -> str:
    """The input path ``data.pipeline`` stands for: "auto" is the device path for the sources
    registered ``in_memory`` (size known and small: the embedded sample 12 MB decoded, CIFAR-10
    150 MB; on 2 CPU cores the embedded run's epochs take 13.5 s instead of 22 s: batched tensor
    ops in the main process against PIL in workers that share its cores), else the CPU path (an
    image folder may not fit; synthetic images are drawn per item: nothing to decode)."""
    if data.pipeline != "auto":
        return data.pipeline
    return "device" if source_entry(data.name).in_memory else "cpu"


class ImageSource(DataSource):
    """Image sets (``splits``) viewed through the ``data.augmentation`` recipe.

    Args:
        cfg: the run's config.
        splits: the train and (optional) test image sets.
    """

    images = True

    def __init__(self, cfg: Config, splits: Splits):
        super().__init__(cfg)
        data = cfg.data
        self.splits = splits
        self.specs = view_specs(data.augmentation, data.image_size, data.crop_min)  # the two views' recipes
        self.train_views: Any = None  # the training batches once built (the preview draws from them)
        self.on_device = False  # whether they are the in-memory device path's

    def item_views(self) -> tuple[Callable, Callable, Callable]:
        """(the first view, the second view, the plain view) of an image: the recipe's PIL transforms."""
        data = self.cfg.data
        first, second = view_transforms(data.augmentation, data.image_size, data.crop_min)
        return first, second, eval_transform(data.augmentation, data.image_size)

    def input_shape(self) -> tuple[int, int, int]:
        return (3, self.cfg.data.image_size, self.cfg.data.image_size)

    def loaders(self, device: torch.device, rank: int, world: int, view: Callable | None = None) -> Loaders:
        refuse_gpu_decode(self.cfg.data)
        self.on_device = resolve_pipeline(self.cfg.data) == "device"
        if self.on_device:
            loaders = self.device_loaders(device, rank, world)
        else:
            loaders = item_loaders(self, device, rank, world, view)
        self.train_views = loaders.train
        return loaders

    def device_loaders(self, device: torch.device, rank: int, world: int) -> Loaders:
        """The in-memory path: every image decoded once into ``device`` memory, views made there."""
        cfg, splits, spec = self.cfg, self.splits, self.specs[0]
        sampler = epoch_sampler(cfg, len(splits.train), rank, world)
        images = to_device_tensor(splits.train, device)
        train = DeviceTwoViews(images, splits.train.targets, self.specs, cfg.optim.batch_size, sampler, cfg.train.seed,
                               compile=cfg.train.compile or cfg.train.cuda_graphs, drop_last=cfg.data.drop_last)
        pixels = {id(splits.train): images}

        def plain(split: ItemSet, indices: list[int] | None) -> DevicePlain:
            whole = pixels.get(id(split))
            if whole is None:
                whole = pixels[id(split)] = to_device_tensor(split, device)
            part, targets = whole, split.targets
            if indices is not None:
                part, targets = whole[torch.tensor(indices, device=whole.device)], [split.targets[i] for i in indices]
            return DevicePlain(part, targets, cfg.eval.batch_size, cfg.data.image_size, spec.mean, spec.std)

        return assembled(cfg, splits, train, sampler, plain, rank, world, self.input_shape(), self)

    def plain_loader(self, split: ItemSet, batch_size: int, sampler: Sampler | None = None,
                     pin_memory: bool = False) -> DataLoader:
        return plain_items(self.cfg, split, self.item_views()[2], batch_size, sampler, pin_memory)

    def probe_loader(self, batch_size: int) -> DataLoader:
        data = self.cfg.data
        return probe_items(self.cfg, self.splits.train, probe_transform(data.augmentation, data.image_size), batch_size)

    @torch.no_grad()
    def preview(self, loaders: Loaders, n: int, seed: int) -> Tensor | None:
        """Query and key views of the first n training images, drawn as training draws them (the
        CPU path: exactly epoch 0's views of those items), un-normalised to [0, 1]."""
        n = min(n, loaders.num_items)
        pairs = self.preview_pairs(n, seed)
        spec = self.specs[0]
        mean = torch.tensor(spec.mean, device=pairs.device).view(1, 3, 1, 1)
        std = torch.tensor(spec.std, device=pairs.device).view(1, 3, 1, 1)
        return (pairs * std + mean).clamp(0, 1).cpu()

    def image_batches(self) -> Any:
        """The training batches of images this source built (what the preview draws from)."""
        return self.train_views

    def preview_pairs(self, n: int, seed: int) -> Tensor:
        """The first n images' normalised views (2n, 3, S, S) as q0, k0, q1, k1, ..., from the
        training batches this source built."""
        batches = self.image_batches()
        if self.on_device:
            images = batches.images[:n]
            views = batches.apply_to(torch.cat([images, images]), step_generator(images.device, seed, 0, 0))
            return torch.stack([views[:n], views[n:]], dim=1).flatten(0, 1)
        dataset = batches.dataset  # Indexed(TwoViews): item (epoch, i) -> ((x_q, x_k), y, i)
        return torch.stack([view for i in range(n) for view in dataset[(0, i)][0]])
