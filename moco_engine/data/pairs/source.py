"""The pairs source, ``data.name=pairs``: images with their captions (``read.py``'s layouts).

Its splits are image sets of the split's images, viewed through the ``data.augmentation`` recipe
as every image source's are, so a one-tower image method (``method=moco``) trains an image tower
on exactly the training split's images; the captions are then unused, and one warning line says
so. The items are unlabelled: the kNN monitor is off. The caption side is ready for a method that
reads it (``captions``: each training image's captions as token ids, one drawn per epoch by
``captions.caption_index``); its tokenizer is the source's state, kept in checkpoints.
"""

from __future__ import annotations

import io
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from moco_engine.config.schema import Config, DataConfig
from moco_engine.data.errors import DataError
from moco_engine.data.images.sets import ImageSet, decode, first_readable, skip_bad
from moco_engine.data.images.source import ImageSource
from moco_engine.data.images.sources import IMAGE_SETTINGS
from moco_engine.data.items import Splits
from moco_engine.data.loaders import Loaders
from moco_engine.data.pairs.captions import CaptionTokens, pairs_tokenizer
from moco_engine.data.pairs.read import Pair, PairsData, read_pairs
from moco_engine.data.sources import register_data_source
from moco_engine.data.text.source import tokenizer_misfit
from moco_engine.runtime.distributed import is_main


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

    def __init__(self, cfg: Config, saved: dict[str, Any] | None = None):
        self.data, splits = pair_splits(cfg.data)
        super().__init__(cfg, splits)
        train_captions = splits.train.captions
        self.tokenizer = pairs_tokenizer(cfg, saved, [c for item in train_captions for c in item])
        self.captions = CaptionTokens.encode(self.tokenizer, train_captions, cfg.data.text.max_length)

    def loaders(self, device: torch.device, rank: int, world: int, view: Callable | None = None) -> Loaders:
        loaders = super().loaders(device, rank, world, view)
        if is_main():  # no method reads captions yet: say so once, where the run starts
            print(f"warning: data.name=pairs: method={self.cfg.method} trains on the {loaders.num_items} images of "
                  f"split '{self.cfg.data.train_split}' alone; their {len(self.captions.ids)} captions are unused",
                  file=sys.stderr, flush=True)
        return loaders

    def state(self) -> dict[str, Any]:
        return {"tokenizer": self.tokenizer.json}

    def misfit(self, saved: dict[str, Any]) -> str | None:
        return tokenizer_misfit(saved, self.tokenizer)

    def write(self, run_dir: Path) -> None:
        self.tokenizer.save(run_dir)
