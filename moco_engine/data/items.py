"""What every data source hands the loaders: item sets and their splits, whatever the items are.

An item set holds N items; ``load(i)`` returns item i in whatever form its views take (a PIL
image for the image sources, a tensor or a dict of tensors for others) and ``targets`` its class,
or -1 for every item of an unlabelled set (``classes`` then empty: the kNN monitor is off).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from torch.utils.data import Dataset


class ItemSet(Dataset):
    """N items and their class targets (-1: unlabelled); ``load(i)`` returns item i."""

    targets: list[int]
    classes: list[str]

    def __len__(self) -> int:
        return len(self.targets)

    def load(self, i: int) -> Any:
        raise NotImplementedError

    @property
    def labelled(self) -> bool:
        return bool(self.classes)


class TensorItems(ItemSet):
    """Items held as one tensor (N, ...) or a dict of such tensors (item i: their i-th rows)."""

    def __init__(self, items: Any, targets: list[int] | None = None, classes: list[str] | None = None):
        self.items = items
        n = len(next(iter(items.values()))) if isinstance(items, dict) else len(items)
        self.targets = [int(t) for t in targets] if targets is not None else [-1] * n
        self.classes = list(classes or [])
        if len(self.targets) != n:
            raise ValueError(f"{n} items but {len(self.targets)} targets")

    def load(self, i: int) -> Any:
        if isinstance(self.items, dict):
            return {k: v[i] for k, v in self.items.items()}
        return self.items[i]


@dataclass
class Splits:
    """The training items and, if any, the labelled test items the kNN monitor classifies.

    Attributes:
        train, test: the item sets (``test`` None: no kNN monitor).
        view: one random view of an item, for sources whose items are not images (None: images,
            viewed through the ``data.augmentation`` recipe). It draws its randomness from
            torch's global RNG, which the loader seeds per (seed, epoch, item): a resumed run
            sees the views an uninterrupted one would.
        plain: the deterministic view evaluation encodes (None: images, the recipe's).
    """

    train: ItemSet
    test: ItemSet | None
    view: Callable[[Any], Any] | None = None
    plain: Callable[[Any], Any] | None = None

    @property
    def images(self) -> bool:
        """Whether the items are images (viewed through a recipe)."""
        return self.view is None
