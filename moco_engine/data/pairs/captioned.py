"""What captions add to an image source: the pairs source's (``pairs/source.py``), and the shards
source's when its samples carry ``.txt`` captions (``shards/source.py``).

:class:`CaptionedImages` is a mixin of an :class:`~moco_engine.data.images.source.ImageSource`
whose training items have captions. Its methods are helpers that the source's own protocol
methods call (``loaders``, ``input_shape``, ``ranked_pairs``, ``state``, ``misfit``, ``write``), so
that a source with captions only some of the time (shards) stays the plain image source
otherwise:

- :meth:`~CaptionedImages.open_captions`: the tokenizer (a resume's from its checkpoint, a named
  one, or a WordPiece trained on the training captions: ``captions.pairs_tokenizer``), the
  training split's captions as tokens, whether the method trains on pairs
  (``MethodEntry.pairs``), and so the monitor (``"pairs"``: image–text recall);
- :meth:`~CaptionedImages.captioned_loaders`: ``((images, captions), targets, indices)`` batches
  (:class:`CaptionedBatches`) over the image batches of any of the image paths: the CPU path
  (the recipe's first view of each image), the in-memory device path, or the source's own
  stream (``data.decode=gpu`` on shards), the last two making pairs of views of which the first
  is kept;
- the token views' input shape, the ranked split's images and captions, the preview's image
  batches, and the tokenizer as the source's state (``tokenizer.json``; another one on a resume
  refused in one line).
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import DataLoader

from moco_engine.config.registry import registry
from moco_engine.data.images.source import resolve_pipeline
from moco_engine.data.items import ItemSet
from moco_engine.data.loaders import Loaders, item_loaders
from moco_engine.data.pairs.captions import CaptionTokens, pairs_tokenizer
from moco_engine.data.sampling import EpochSampler, Indexed, make_loader
from moco_engine.data.text.source import tokenizer_misfit
from moco_engine.data.text.tokenizer import TextTokenizer
from moco_engine.runtime.distributed import is_main


class CaptionedBatches:
    """Image batches with one caption an image: ``((images (B, 3, S, S), captions {"input_ids",
    "attention_mask"} (B, W)), targets, indices)``, the caption of item i in epoch e the one
    ``CaptionTokens.drawn`` picks for (seed, e, i), whatever batch, worker or resume it falls in.

    Args:
        batches: the image batches ``(x, targets, indices)`` (x a view, or a pair of views of
            which the first is kept: the device paths').
        captions: the training split's captions as tokens.
        sampler: the epoch order the batches follow (its ``epoch`` is the draw's).
    """

    def __init__(self, batches: Any, captions: CaptionTokens, seed: int, sampler: Any):
        self.batches, self.captions, self.seed, self.sampler = batches, captions, seed, sampler

    def __len__(self) -> int:
        return len(self.batches)

    def __iter__(self):
        # The items in the sampler's order, on the host: the batches follow it (a prefix of it with
        # drop_last), so a batch's items are its next slice, and the device path's indices, which
        # live on the device, are never read back to draw captions.
        order = torch.tensor([i for _, i in self.sampler], dtype=torch.long)
        start = 0
        for views, targets, indices in self.batches:
            images = views[0] if isinstance(views, (tuple, list)) else views
            items = order[start : start + len(indices)]
            start += len(indices)
            yield (images, self.captions.drawn(self.seed, self.sampler.epoch, items)), targets, indices


class CaptionedImages:
    """The captions of an image source's items (a mixin before ``ImageSource``; see the module).

    Attributes (once :meth:`open_captions` has run):
        tokenizer: the captions' tokenizer, the source's state.
        captions: the training split's captions as tokens.
        captioned: the method trains on (images, captions); False leaves the captions unused.
        pairs: True: the source has captions (``DataSource.pairs``).
    """

    captioned = False
    tokenizer: TextTokenizer | None = None

    def open_captions(self, saved: dict[str, Any] | None, captions: list[tuple[str, ...]]) -> None:
        """Read the training split's ``captions`` (each item's) with the run's tokenizer (on a
        resume its checkpoint's, from ``saved``)."""
        cfg = self.cfg
        self.pairs = True
        self.tokenizer = pairs_tokenizer(cfg, saved, [c for item in captions for c in item])
        self.captions = CaptionTokens.encode(self.tokenizer, captions, cfg.data.text.max_length)
        self.captioned = registry("method")[cfg.method].pairs  # the method trains on (images, captions)
        self.monitor = "pairs" if self.captioned else "knn"
        self.ranked: dict[str, tuple[ItemSet, CaptionTokens]] = {}

    def captioned_loaders(self, device: torch.device, rank: int, world: int, view: Callable | None = None,
                          stream: Callable[[EpochSampler], Iterable] | None = None) -> Loaders:
        """This rank's loaders, the training batches :class:`CaptionedBatches` over the image
        batches of ``stream`` (the source's own pairs of views in a sampler's order), or else of
        ``data.pipeline``'s path: the device path's pairs of views, or the CPU path's one view
        an image (``view``, or the recipe's first)."""
        cfg = self.cfg
        seed = cfg.train.seed
        self.on_device = stream is None and resolve_pipeline(cfg.data) == "device"
        if stream is not None:
            loaders = item_loaders(self, device, rank, world,
                                   make_train=lambda sampler: CaptionedBatches(stream(sampler), self.captions, seed, sampler))
        elif self.on_device:
            loaders = self.device_loaders(device, rank, world)
            loaders.train = CaptionedBatches(loaders.train, self.captions, seed, loaders.sampler)
        else:
            first = view or self.item_views()[0]  # one view an image: the recipe's first

            def captioned(sampler: EpochSampler) -> CaptionedBatches:
                images = make_loader(Indexed(self.splits.train, first, seed), cfg.optim.batch_size,
                                     cfg.data.num_workers, sampler, drop_last=cfg.data.drop_last,
                                     pin_memory=device.type == "cuda")
                return CaptionedBatches(images, self.captions, seed, sampler)

            loaders = item_loaders(self, device, rank, world, make_train=captioned)
        loaders.input_shape = self.input_shape()
        self.train_views = loaders.train
        return loaders

    def warn_captions_unused(self, loaders: Loaders) -> None:
        """One warning line, on the first process: a one-tower method trains on the images alone."""
        cfg = self.cfg
        if is_main():
            print(f"warning: data.name={cfg.data.name}: method={cfg.method} trains on the {loaders.num_items} images "
                  f"of split '{cfg.data.train_split}' alone; their {len(self.captions.ids)} captions are unused",
                  file=sys.stderr, flush=True)

    def captioned_shape(self, image: Any) -> Any:
        """The input shape for ``image``'s: with captions trained on, {"image": ..., "text": the
        token views'}."""
        if not self.captioned:
            return image
        width = int(self.captions.ids.shape[1])
        return {"image": image, "text": {"input_ids": (width,), "attention_mask": (width,),
                                         "vocab_size": (self.tokenizer.vocab_size,)}}

    def ranked_captions(self, split: str, batch_size: int, images: Callable[[], ItemSet]) -> tuple[DataLoader, CaptionTokens]:
        """Split ``split``'s images (plain views, in index order) and all their captions, tokenised
        by the run's tokenizer. ``images()`` reads the split (an image set with ``captions``),
        once: then it is kept."""
        if split not in self.ranked:
            found = images()
            self.ranked[split] = found, CaptionTokens.encode(self.tokenizer, found.captions, self.cfg.data.text.max_length)
        found, captions = self.ranked[split]
        return self.plain_loader(found, batch_size), captions

    def captioned_batches(self) -> Any:
        """The image batches under the captions (the preview draws from them), or the training
        batches themselves without captions trained on."""
        return self.train_views.batches if self.captioned else self.train_views

    def one_view_preview(self, n: int) -> Tensor:
        """The CPU path with captions, where a step sees one view of an image: the first n images'
        views of epochs 0 and 1 side by side (2n, 3, S, S), two draws of the recipe as training
        makes them."""
        dataset = self.captioned_batches().dataset  # Indexed(first view): (epoch, i) -> (view, target, i)
        return torch.stack([dataset[(epoch, i)][0] for i in range(n) for epoch in (0, 1)])

    def captions_state(self) -> dict[str, Any]:
        """The tokenizer, as checkpoints keep it."""
        return {"tokenizer": self.tokenizer.json}

    def captions_misfit(self, saved: dict[str, Any]) -> str | None:
        """Why a checkpoint's tokenizer cannot continue with this one, or None."""
        return tokenizer_misfit(saved, self.tokenizer)

    def write_tokenizer(self, run_dir: Path) -> None:
        """``tokenizer.json`` in the run folder."""
        self.tokenizer.save(run_dir)
