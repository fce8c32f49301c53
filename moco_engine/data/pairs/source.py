"""The pairs source, ``data.name=pairs``: images with their captions (``read.py``'s layouts).

An item is an image with all its captions. Its splits are image sets of the split's images, viewed
through the ``data.augmentation`` recipe as every image source's are.

- A method on pairs (``MethodEntry.pairs``: ``method=itc``) trains on (images, captions): one
  view of each image by the recipe's first transform, and one of its captions, drawn by a hash of
  (seed, epoch, item) (``captions.caption_index``) as the batch leaves the loader
  (``captioned.py``'s ``CaptionedBatches``). The monitor is image–text recall on ``eval.retrieval_split``
  (``ranked_pairs``).
- A one-tower image method (``method=moco``) trains an image tower on exactly the training
  split's images; the captions are then unused, and one warning line says so. The items are
  unlabelled: the kNN monitor is off.

The captions' tokenizer is the source's state, kept in checkpoints and read back on a resume.
"""

from __future__ import annotations

import io
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from torch import Tensor
from torch.utils.data import DataLoader

from moco_engine.config.schema import Config, DataConfig
from moco_engine.data.errors import DataError
from moco_engine.data.images.sets import ImageSet, decode, first_readable, skip_bad
from moco_engine.data.images.source import ImageSource
from moco_engine.data.images.sources import IMAGE_SETTINGS
from moco_engine.data.items import Splits
from moco_engine.data.loaders import Loaders, refuse_gpu_decode
from moco_engine.data.pairs.captioned import CaptionedImages
from moco_engine.data.pairs.captions import CaptionTokens
from moco_engine.data.pairs.read import Pair, PairsData, read_pairs
from moco_engine.data.sources import register_data_source


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
class PairsSource(CaptionedImages, ImageSource):
    """Images and their captions: the image source over the split's images, and the captions'
    tokens (``captions``, the training split's) with their tokenizer as the source's state
    (``state``/``misfit``/``write``: ``tokenizer.json``; a resume reads it back from ``saved``),
    through ``captioned.py``'s :class:`CaptionedImages`.

    Args:
        cfg: the run's config.
        saved: on a resume, the snapshot its checkpoint holds (its tokenizer); None when fresh.
    """

    pairs = True

    def __init__(self, cfg: Config, saved: dict[str, Any] | None = None):
        self.data, splits = pair_splits(cfg.data)
        super().__init__(cfg, splits)
        self.open_captions(saved, splits.train.captions)

    def loaders(self, device: torch.device, rank: int, world: int, view: Callable | None = None) -> Loaders:
        if not self.captioned:
            loaders = super().loaders(device, rank, world, view)
            self.warn_captions_unused(loaders)
            return loaders
        refuse_gpu_decode(self.cfg.data)
        return self.captioned_loaders(device, rank, world, view)

    def input_shape(self) -> Any:
        """Images (3, S, S) and, with captions, their token views: {"image": ..., "text": ...}."""
        return self.captioned_shape(super().input_shape())

    def ranked_pairs(self, split: str, batch_size: int) -> tuple[DataLoader, CaptionTokens]:
        """Split ``split``'s images (plain views, in index order) and all their captions, tokenised
        by the run's tokenizer (read once, then kept)."""
        def read() -> PairImages:  # the test split may come from data.test_root
            if split == self.cfg.data.test_split and self.splits.test is not None:
                return self.splits.test
            return PairImages(self.data.split(split), self.cfg.data.on_bad_image)

        return self.ranked_captions(split, batch_size, read)

    def ranked_splits(self) -> tuple[str, ...]:
        return tuple(self.data.splits)

    def image_batches(self) -> Any:
        """The image batches under the captions (the preview draws from them)."""
        return self.captioned_batches()

    def preview_pairs(self, n: int, seed: int) -> Tensor:
        """On the CPU path with captions a step sees one view of an image: the first n images'
        views of epochs 0 and 1 then stand side by side (2n, 3, S, S), two draws of the recipe as
        training makes them; otherwise the image source's pairs of views."""
        if not self.captioned or self.on_device:
            return super().preview_pairs(n, seed)
        return self.one_view_preview(n)

    def state(self) -> dict[str, Any]:
        return self.captions_state()

    def misfit(self, saved: dict[str, Any]) -> str | None:
        return self.captions_misfit(saved)

    def write(self, run_dir: Path) -> None:
        self.write_tokenizer(run_dir)
