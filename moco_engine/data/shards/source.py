"""The shards source, ``data.name=shards``: a moco-shard folder (``manifest.json``) or a ``.txt``
of shards, read through ``reader.py``; the shards' fingerprint kept in checkpoints."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from moco_engine.config.schema import Config, DataConfig
from moco_engine.data.errors import DataError
from moco_engine.data.images.on_device import step_generator
from moco_engine.data.images.source import ImageSource
from moco_engine.data.images.sources import IMAGE_SETTINGS, match_classes
from moco_engine.data.items import Splits
from moco_engine.data.loaders import Loaders, item_loaders
from moco_engine.data.sampling import EpochSampler
from moco_engine.data.shards.decode import StreamTwoViews, decode_batch
from moco_engine.data.shards.reader import (
    MANIFEST,
    ShardImages,
    listed_split,
    manifest_split,
    read_manifest,
)
from moco_engine.data.sources import register_data_source


class ShardOrigin:
    """The shards' fingerprint, kept in checkpoints: a resume onto rewritten shards is refused.
    A moco-shard folder's shards are named within it (the folder may move) and known by their
    SHA-256; a listed one by its path and its size (a URL's by its path alone)."""

    def __init__(self, images: ShardImages):
        self.shards = [(s.get("label", s["url"]), s["nsamples"], s.get("sha256") or str(s.get("bytes", "")))
                       for s in images.shards]

    def state(self) -> dict[str, Any]:
        digest = hashlib.sha256(json.dumps(self.shards).encode()).hexdigest()
        return {"shards": {"fingerprint": digest, "list": [list(s) for s in self.shards]}}

    def misfit(self, saved: dict[str, Any]) -> str | None:
        theirs = saved.get("shards")
        if theirs is None or theirs["fingerprint"] == self.state()["shards"]["fingerprint"]:
            return None
        for old, new in zip(theirs["list"], self.shards):
            if list(old) != list(new):
                return (f"was trained on other shards: {new[0]} has changed since (items {old[1]} -> {new[1]}, "
                        f"{old[2][:12] or '?'} -> {new[2][:12] or '?'}); resume on the shards it was trained on")
        return f"was trained on {len(theirs['list'])} shards, and data.root lists {len(self.shards)}"


def shard_splits(cfg: DataConfig) -> Splits:
    """The train (and test) shards ``data.root`` names: a moco-shard folder, or a ``.txt`` list."""
    root = Path(cfg.root).expanduser()
    if not root.exists():
        raise DataError(f"data path not found: {root}")
    if root.is_file():
        if root.suffix != ".txt":
            raise DataError(f"data.root for data.name=shards: a moco-shard folder or a .txt of shards, not {root}")
        return Splits(listed_split(root, cfg), None)
    if not (root / MANIFEST).is_file():
        raise DataError(f"{root}: no {MANIFEST} (write the folder with moco-shard SRC {root})")
    manifest = read_manifest(root)
    train = manifest_split(root, manifest, cfg.train_split, cfg)
    test = manifest_split(root, manifest, cfg.test_split, cfg) if cfg.test_split else None
    if test is not None:
        match_classes(train, test)
    return Splits(train, test)


@register_data_source("shards", reads=(*IMAGE_SETTINGS, "data.root", "data.train_split", "data.test_split",
                                        "data.on_bad_image", "data.max_bad_images", "data.decode"))
class ShardSource(ImageSource):
    """Images in shards, on the image source's paths, and one more: with ``data.decode=gpu`` the
    loader's processes send each image's JPEG bytes and the training device decodes them
    (``decode.py``). Its state is the shards' fingerprint (:class:`ShardOrigin`)."""

    def __init__(self, cfg: Config, saved: dict[str, Any] | None = None):
        super().__init__(cfg, shard_splits(cfg.data))
        self.origin = ShardOrigin(self.splits.train)

    def loaders(self, device: torch.device, rank: int, world: int, view: Callable | None = None) -> Loaders:
        if self.cfg.data.decode != "gpu":
            return super().loaders(device, rank, world, view)
        cfg = self.cfg  # whatever data.pipeline says: the bytes go to the device

        def stream(sampler: EpochSampler) -> StreamTwoViews:
            return StreamTwoViews(self.splits.train, self.specs, cfg.optim.batch_size, sampler, cfg.train.seed,
                                  cfg.data.num_workers, device, cfg.data.drop_last)

        loaders = item_loaders(self, device, rank, world, make_train=stream)
        self.train_views = loaders.train
        return loaders

    def preview_pairs(self, n: int, seed: int) -> Tensor:
        if self.cfg.data.decode != "gpu":
            return super().preview_pairs(n, seed)
        views = self.train_views
        images = decode_batch([views.items.load_encoded(i) for i in range(n)], torch.arange(n), views.device, views.items)
        x_q, x_k = views.views(images, step_generator(views.device, seed, 0, 0))
        return torch.stack([x_q, x_k], dim=1).flatten(0, 1)

    def state(self) -> dict[str, Any]:
        return self.origin.state()

    def misfit(self, saved: dict[str, Any]) -> str | None:
        return self.origin.misfit(saved)
