"""The shards source, ``data.name=shards``: a moco-shard folder (``manifest.json``) or a ``.txt``
of shards, read through ``reader.py``; the shards' fingerprint kept in checkpoints.

Shards whose samples carry ``.txt`` captions are image–caption pairs: the source then gives
pairs exactly as the pairs source does (``pairs/captioned.py``'s :class:`CaptionedImages`: the
tokenizer as its state beside the fingerprint, ``(images, captions)`` batches for a method on
pairs over any of its image paths, ``data.decode=gpu`` included, image–text recall on the
``eval.retrieval_split`` split folder as the monitor).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import DataLoader

from moco_engine.config.schema import Config, DataConfig
from moco_engine.data.errors import DataError
from moco_engine.data.images.on_device import step_generator
from moco_engine.data.images.source import ImageSource
from moco_engine.data.images.sources import IMAGE_SETTINGS, match_classes
from moco_engine.data.items import Splits
from moco_engine.data.loaders import Loaders, item_loaders
from moco_engine.data.pairs.captioned import CaptionedImages
from moco_engine.data.pairs.captions import CaptionTokens
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
    if test is not None and train.labelled:
        match_classes(train, test)
    return Splits(train, test)


def shard_split(cfg: DataConfig, split: str) -> ShardImages:
    """Split ``split`` of the moco-shard folder ``data.root`` (``OUT/<split>/``).

    Raises:
        DataError: no such split, or ``data.root`` a ``.txt`` of shards (its one split is the
            training split).
    """
    root = Path(cfg.root).expanduser()
    if root.is_file():
        raise DataError(f"{root}: a .txt of shards is the training split alone, so it has no split '{split}' "
                        f"(data.train_split is '{cfg.train_split}'; moco-shard writes a folder a split)")
    return manifest_split(root, read_manifest(root), split, cfg)


@register_data_source("shards", reads=(*IMAGE_SETTINGS, "data.root", "data.train_split", "data.test_split",
                                        "data.on_bad_image", "data.max_bad_images", "data.decode", "data.text"))
class ShardSource(CaptionedImages, ImageSource):
    """Images in shards, on the image source's paths, and one more: with ``data.decode=gpu`` the
    loader's processes send each image's JPEG bytes and the training device decodes them
    (``decode.py``). Its state is the shards' fingerprint (:class:`ShardOrigin`), and with
    captions (``.txt``) their tokenizer too (``pairs`` then True)."""

    def __init__(self, cfg: Config, saved: dict[str, Any] | None = None):
        super().__init__(cfg, shard_splits(cfg.data))
        self.origin = ShardOrigin(self.splits.train)
        if self.splits.train.captions is not None:
            self.open_captions(saved, self.splits.train.captions)

    def loaders(self, device: torch.device, rank: int, world: int, view: Callable | None = None) -> Loaders:
        stream = self.stream(device) if self.cfg.data.decode == "gpu" else None
        if self.captioned:
            return self.captioned_loaders(device, rank, world, view, stream)
        if stream is None:
            loaders = super().loaders(device, rank, world, view)
        else:  # whatever data.pipeline says: the bytes go to the device
            loaders = item_loaders(self, device, rank, world, make_train=stream)
            self.train_views = loaders.train
        if self.pairs:
            self.warn_captions_unused(loaders)
        return loaders

    def stream(self, device: torch.device) -> Callable[[EpochSampler], StreamTwoViews]:
        """``data.decode=gpu``'s training batches in a sampler's order: both views of each image
        made on ``device`` from its JPEG bytes."""
        cfg = self.cfg

        def make(sampler: EpochSampler) -> StreamTwoViews:
            return StreamTwoViews(self.splits.train, self.specs, cfg.optim.batch_size, sampler, cfg.train.seed,
                                  cfg.data.num_workers, device, cfg.data.drop_last)

        return make

    def input_shape(self) -> Any:
        """Images (3, S, S), and with captions trained on, their token views: {"image", "text"}."""
        return self.captioned_shape(super().input_shape())

    def ranked_pairs(self, split: str, batch_size: int) -> tuple[DataLoader, CaptionTokens]:
        """Split ``split``'s images and captions (``OUT/<split>/``; the training or test split
        already open when it is one of them), plain, in index order."""
        if not self.pairs:
            return super().ranked_pairs(split, batch_size)
        return self.ranked_captions(split, batch_size, lambda: self.captioned_split(split))

    def ranked_splits(self) -> tuple[str, ...]:
        """With captions, a moco-shard folder's splits (a ``.txt`` of shards: the training split)."""
        if not self.pairs:
            return ()
        root = Path(self.cfg.data.root).expanduser()
        return (self.cfg.data.train_split,) if root.is_file() else tuple(read_manifest(root)["splits"])

    def captioned_split(self, split: str) -> ShardImages:
        """Split ``split`` with its captions: the training or test split already open, else read."""
        data = self.cfg.data
        opened = {data.train_split: self.splits.train}
        if self.splits.test is not None:
            opened[data.test_split] = self.splits.test
        images = opened[split] if split in opened else shard_split(data, split)
        if images.captions is None:
            raise DataError(f"{data.root}: split '{split}' has no captions (.txt) to rank")
        return images

    def image_batches(self) -> Any:
        """The image batches under the captions, if any (the preview draws from them)."""
        return self.captioned_batches()

    def preview_pairs(self, n: int, seed: int) -> Tensor:
        """The image source's pairs of views, ``data.decode=gpu``'s made on the device; on the
        CPU path with captions the pairs source's (one view an image: epochs 0 and 1's)."""
        if self.cfg.data.decode != "gpu":
            return self.one_view_preview(n) if self.captioned and not self.on_device else super().preview_pairs(n, seed)
        views = self.image_batches()
        images = decode_batch([views.items.load_encoded(i) for i in range(n)], torch.arange(n), views.device, views.items)
        x_q, x_k = views.views(images, step_generator(views.device, seed, 0, 0))
        return torch.stack([x_q, x_k], dim=1).flatten(0, 1)

    def state(self) -> dict[str, Any]:
        return {**self.origin.state(), **(self.captions_state() if self.pairs else {})}

    def misfit(self, saved: dict[str, Any]) -> str | None:
        return self.origin.misfit(saved) or (self.captions_misfit(saved) if self.pairs else None)

    def write(self, run_dir: Path) -> None:
        if self.pairs:
            self.write_tokenizer(run_dir)
