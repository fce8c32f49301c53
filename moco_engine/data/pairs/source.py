"""The pairs source, ``data.name=pairs``: images with their captions (``read.py``'s layouts).

An item is an image with all its captions. Its splits are image sets of the split's images, viewed
through the ``data.augmentation`` recipe as every image source's are.

- A method on pairs (``MethodEntry.pairs``: ``method=itc``) trains on (images, captions): one
  view of each image by the recipe's first transform, and one of its captions, drawn by a hash of
  (seed, epoch, item) (``captions.caption_index``) as the batch leaves the loader
  (:class:`CaptionedBatches`). The monitor is image–text recall on ``eval.retrieval_split``
  (``ranked_pairs``).
- A one-tower image method (``method=moco``) trains an image tower on exactly the training
  split's images; the captions are then unused, and one warning line says so. The items are
  unlabelled: the kNN monitor is off.

The captions' tokenizer is the source's state, kept in checkpoints and read back on a resume.
"""

from __future__ import annotations

import io
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from torch import Tensor
from torch.utils.data import DataLoader

from moco_engine.config.registry import registry
from moco_engine.config.schema import Config, DataConfig
from moco_engine.data.errors import DataError
from moco_engine.data.images.sets import ImageSet, decode, first_readable, skip_bad
from moco_engine.data.images.source import ImageSource, resolve_pipeline
from moco_engine.data.images.sources import IMAGE_SETTINGS
from moco_engine.data.items import Splits
from moco_engine.data.loaders import Loaders, item_loaders, refuse_gpu_decode
from moco_engine.data.pairs.captions import CaptionTokens, pairs_tokenizer
from moco_engine.data.pairs.read import Pair, PairsData, read_pairs
from moco_engine.data.sampling import EpochSampler, Indexed, make_loader
from moco_engine.data.sources import register_data_source
from moco_engine.data.text.source import tokenizer_misfit
from moco_engine.data.text.tokenizer import TextTokenizer
from moco_engine.runtime.distributed import is_main


class CaptionedBatches:
    """Image batches with one caption an image: ``((images (B, 3, S, S), captions {"input_ids",
    "attention_mask"} (B, W)), targets, indices)``, the caption of item i in epoch e the one
    ``CaptionTokens.drawn`` picks for (seed, e, i), whatever batch, worker or resume it falls in.

    Args:
        batches: the image batches ``(x, targets, indices)`` (x a view, or a pair of views of
            which the first is kept: the device path's).
        captions: the training split's captions as tokens.
        sampler: the epoch order the batches follow (its ``epoch`` is the draw's).
    """

    def __init__(self, batches: Any, captions: CaptionTokens, seed: int, sampler: Any):
        self.batches, self.captions, self.seed, self.sampler = batches, captions, seed, sampler

    def __len__(self) -> int:
        return len(self.batches)

    def __iter__(self):
        for views, targets, indices in self.batches:
            images = views[0] if isinstance(views, (tuple, list)) else views
            yield (images, self.captions.drawn(self.seed, self.sampler.epoch, indices.cpu())), targets, indices


class PairImages(ImageSet):
    """The images of a split's pairs (unlabelled), each decoded with PIL when read; an unreadable
    one stops the run naming it, or with ``on_bad="skip"`` the next readable one stands in for it
    (``sets.first_readable``, as an image folder's)."""

    def __init__(self, pairs: list[Pair], on_bad: str = "fail"):
        self.pairs, self.on_bad = pairs, on_bad
        self.targets, self.classes = [-1] * len(pairs), []
        self.bad: set[str] = set()

    @property
    def captions(self) -> list[tuple[str, ...]]:
        """Each image's captions."""
        return [p.captions for p in self.pairs]

    def load(self, i: int) -> Image.Image:
        return first_readable(i, len(self.pairs), self.read, self.skip, f"the 100 images from {self.pairs[i].name} on")

    def read(self, i: int) -> Image.Image:
        image = self.pairs[i].image
        return decode(io.BytesIO(image) if isinstance(image, bytes) else image)

    def skip(self, i: int, error: Exception) -> None:
        skip_bad(self.pairs[i].name, error, self.on_bad, self.bad)


def pair_splits(cfg: DataConfig) -> tuple[PairsData, Splits]:
    """The pairs ``data.root`` holds, and the train and test splits' images.

    The test split is ``data.test_split`` of ``data.test_root`` when set, else of ``data.root``;
    none when ``data.test_split`` is "" or ``data.root`` is a table without a split column (and
    no ``data.test_root``).

    Raises:
        DataError: no ``data.root``, unreadable or bad data (named), a split with no items.
    """
    if not cfg.root:
        raise DataError("data.name=pairs needs data.root: a folder or archive holding a Karpathy-split JSON, "
                        "or a .csv/.tsv of image paths and captions")
    data = read_pairs(cfg.root, cfg.pairs, cfg.train_split)
    train = PairImages(data.split(cfg.train_split), cfg.on_bad_image)
    test = None
    if cfg.test_split and cfg.test_root:
        test = PairImages(read_pairs(cfg.test_root, cfg.pairs, cfg.test_split).split(cfg.test_split), cfg.on_bad_image)
    elif cfg.test_split and data.named_splits:
        test = PairImages(data.split(cfg.test_split), cfg.on_bad_image)
    return data, Splits(train, test)


def ranked_split(data: PairsData, split: str, tokenizer: TextTokenizer, cfg: DataConfig) -> tuple[PairImages, CaptionTokens]:
    """Split ``split``'s images of ``data`` and all their captions, tokenised by ``tokenizer`` and
    cut at ``data.text.max_length``: what ranking encodes (the monitor, ``moco-eval pairs``).

    Raises:
        DataError: the split has no items (the data's splits listed).
    """
    images = PairImages(data.split(split), cfg.on_bad_image)
    return images, CaptionTokens.encode(tokenizer, images.captions, cfg.text.max_length)


@register_data_source("pairs", reads=(*IMAGE_SETTINGS, "data.root", "data.test_root", "data.train_split",
                                       "data.test_split", "data.pairs", "data.text", "data.on_bad_image"))
class PairsSource(ImageSource):
    """Images and their captions: the image source over the split's images, and the captions'
    tokens (``captions``, the training split's) with their tokenizer as the source's state
    (``state``/``misfit``/``write``: ``tokenizer.json``; a resume reads it back from ``saved``).

    Args:
        cfg: the run's config.
        saved: on a resume, the snapshot its checkpoint holds (its tokenizer); None when fresh.
    """

    pairs = True

    def __init__(self, cfg: Config, saved: dict[str, Any] | None = None):
        self.data, splits = pair_splits(cfg.data)
        super().__init__(cfg, splits)
        train_captions = splits.train.captions
        self.tokenizer = pairs_tokenizer(cfg, saved, [c for item in train_captions for c in item])
        self.captions = CaptionTokens.encode(self.tokenizer, train_captions, cfg.data.text.max_length)
        self.captioned = registry("method")[cfg.method].pairs  # the method trains on (images, captions)
        self.monitor = "pairs" if self.captioned else "knn"
        self.ranked: dict[str, tuple[PairImages, CaptionTokens]] = {}

    def loaders(self, device: torch.device, rank: int, world: int, view: Callable | None = None) -> Loaders:
        if not self.captioned:
            loaders = super().loaders(device, rank, world, view)
            if is_main():  # say so once, where the run starts
                print(f"warning: data.name=pairs: method={self.cfg.method} trains on the {loaders.num_items} images "
                      f"of split '{self.cfg.data.train_split}' alone; their {len(self.captions.ids)} captions are "
                      "unused", file=sys.stderr, flush=True)
            return loaders
        cfg = self.cfg
        refuse_gpu_decode(cfg.data)
        self.on_device = resolve_pipeline(cfg.data) == "device"
        if self.on_device:  # the device path's pairs of views: the first is kept
            loaders = self.device_loaders(device, rank, world)
            loaders.train = CaptionedBatches(loaders.train, self.captions, cfg.train.seed, loaders.sampler)
        else:
            first = view or self.item_views()[0]  # one view an image: the recipe's first

            def captioned(sampler: EpochSampler) -> CaptionedBatches:
                images = make_loader(Indexed(self.splits.train, first, cfg.train.seed), cfg.optim.batch_size,
                                     cfg.data.num_workers, sampler, drop_last=cfg.data.drop_last,
                                     pin_memory=device.type == "cuda")
                return CaptionedBatches(images, self.captions, cfg.train.seed, sampler)

            loaders = item_loaders(self, device, rank, world, make_train=captioned)
        loaders.input_shape = self.input_shape()
        self.train_views = loaders.train
        return loaders

    def input_shape(self) -> Any:
        """Images (3, S, S) and, with captions, their token views: {"image": ..., "text": ...}."""
        image = super().input_shape()
        if not self.captioned:
            return image
        width = int(self.captions.ids.shape[1])
        return {"image": image, "text": {"input_ids": (width,), "attention_mask": (width,),
                                         "vocab_size": (self.tokenizer.vocab_size,)}}

    def ranked_pairs(self, split: str, batch_size: int) -> tuple[DataLoader, CaptionTokens]:
        """Split ``split``'s images (plain views, in index order) and all their captions, tokenised
        by the run's tokenizer (read once, then kept)."""
        if split not in self.ranked:
            self.ranked[split] = ranked_split(self.data, split, self.tokenizer, self.cfg.data)
        images, captions = self.ranked[split]
        return self.plain_loader(images, batch_size), captions

    def preview(self, loaders: Loaders, n: int, seed: int) -> Tensor | None:
        """The image views of a one-tower run (``ImageSource``'s); none with captions: a step sees
        one view of an image, and the recipe's views are what ``data.augmentation`` documents."""
        return None if self.captioned else super().preview(loaders, n, seed)

    def state(self) -> dict[str, Any]:
        return {"tokenizer": self.tokenizer.json}

    def misfit(self, saved: dict[str, Any]) -> str | None:
        return tokenizer_misfit(saved, self.tokenizer)

    def write(self, run_dir: Path) -> None:
        self.tokenizer.save(run_dir)
