"""The caption side of pairs: which caption an item shows in an epoch, and the captions as token ids.

An item has all its captions; the one a step sees is drawn by a hash of (seed, epoch, item)
(:func:`caption_index`, the text views' hashed uniforms), not by a generator: it depends on
nothing but the item and the epoch, whatever batch, rank or resume it falls in.

The tokenizer is the text path's (``data/text/tokenizer.py``): a WordPiece trained on the training
captions (``data.text.vocab_size``, ``lowercase``) or the one ``data.text.tokenizer`` names. It is
the pairs source's state: kept in checkpoints, and on a resume read back from the checkpoint,
never trained again (``text/source.py``'s ``resumed_tokenizer``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from moco_engine.config.schema import Config
from moco_engine.data.text.source import resumed_tokenizer
from moco_engine.data.text.tokenizer import TextTokenizer, load_tokenizer, train_wordpiece
from moco_engine.data.text.views import item_keys, uniform

# The hash slot of the caption draw: far from the slots a view of the caption may use (0, 1, ...).
CAPTION_SLOT = 0x7FFF


def caption_index(seed: int, epoch: int, items: Tensor, counts: Tensor) -> Tensor:
    """Which of its captions each item shows in ``epoch``: (B,) long in [0, counts).

    Args:
        items: the items' indices (B,), on any device.
        counts: how many captions each has (B,), each at least 1.
    """
    u = uniform(item_keys(seed, epoch, items), torch.tensor([CAPTION_SLOT], device=items.device))[:, 0]  # (B,) in [0, 1)
    counts = counts.to(items.device).long()
    return torch.minimum((u * counts).long(), counts - 1)  # the min guards float rounding at u near 1


def pairs_tokenizer(cfg: Config, saved: dict[str, Any] | None, captions: list[str]) -> TextTokenizer:
    """The run's tokenizer: on a resume its checkpoint's (``saved``, a snapshot), else the one
    ``data.text.tokenizer`` names, else a WordPiece trained on ``captions`` (the training split's).

    Raises:
        ConfigError: a resume whose checkpoint's tokenizer was made with other settings (named).
        DataError: a named tokenizer that cannot be read.
    """
    kept = resumed_tokenizer(cfg, saved) if saved is not None else None
    if kept:
        return TextTokenizer.from_json(kept, "the checkpoint's tokenizer")
    t = cfg.data.text
    return load_tokenizer(t.tokenizer, t.lowercase) if t.tokenizer else train_wordpiece(captions, t.vocab_size, t.lowercase)


@dataclass
class CaptionTokens:
    """Every caption of a split as token ids, [CLS] ... [SEP] cut at ``max_length``.

    Attributes:
        ids: (M, W) long, each caption padded with [PAD]; W the longest (at most ``max_length``).
        lengths: (M,) each caption's tokens, [CLS] and [SEP] included.
        first: (N,) the row of each item's first caption (an item's captions are consecutive rows).
        counts: (N,) each item's captions.
        pad_id: the padding id.
    """

    ids: Tensor
    lengths: Tensor
    first: Tensor
    counts: Tensor
    pad_id: int

    @classmethod
    def encode(cls, tokenizer: TextTokenizer, captions: list[tuple[str, ...]], max_length: int) -> CaptionTokens:
        """``captions``: each item's captions (N items)."""
        flat = [c for item in captions for c in item]
        rows = [[tokenizer.cls_id, *ids[: max_length - 2], tokenizer.sep_id] for ids in tokenizer.encode(flat)]
        width = max(len(r) for r in rows)
        ids = torch.full((len(rows), width), tokenizer.pad_id, dtype=torch.long)
        for i, row in enumerate(rows):
            ids[i, : len(row)] = torch.tensor(row)
        counts = torch.tensor([len(item) for item in captions])
        first = torch.cumsum(counts, 0) - counts
        return cls(ids, torch.tensor([len(r) for r in rows]), first, counts, tokenizer.pad_id)

    def rows(self, start: int, stop: int) -> dict[str, Tensor]:
        """Captions ``start`` … ``stop − 1`` (every caption, in order: what ranking encodes) as
        ``{"input_ids", "attention_mask"}`` (n, W), cut to their longest."""
        lengths = self.lengths[start:stop]
        width = int(lengths.max())
        mask = torch.arange(width)[None, :] < lengths[:, None]
        return {"input_ids": self.ids[start:stop, :width], "attention_mask": mask.long()}

    def owners(self) -> Tensor:
        """(M,) long: the item (image) each caption belongs to."""
        return torch.repeat_interleave(torch.arange(len(self.counts)), self.counts)

    def drawn(self, seed: int, epoch: int, items: Tensor) -> dict[str, Tensor]:
        """The caption each of ``items`` (B,) on the CPU shows in ``epoch``: ``{"input_ids", "attention_mask"}``
        (B, W), the batch cut to its longest caption."""
        rows = self.first[items] + caption_index(seed, epoch, items, self.counts[items])
        lengths = self.lengths[rows]
        width = int(lengths.max())  # the loader's host tensors: no device sync
        mask = torch.arange(width)[None, :] < lengths[:, None]
        return {"input_ids": self.ids[rows, :width], "attention_mask": mask.long()}
