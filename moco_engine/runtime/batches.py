"""A batch of any input. A view is a tensor (B, ...) (images: (B, 3, H, W)) or a dict of such
tensors (token ids and an attention mask, say); these helpers are where the engine looks inside
one, so nothing else asks which it is. A dict may also carry host values beside its tensors (a
text view's lengths, known to the loader): they travel as they are, in batch order."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

View = Tensor | dict[str, Tensor]


def map_tensors(x: View, fn: Callable[[Tensor], Tensor]) -> View:
    """``fn`` applied to the tensor, or to each tensor of the dict (its host values kept as they are)."""
    return {k: fn(v) if isinstance(v, Tensor) else v for k, v in x.items()} if isinstance(x, dict) else fn(x)


def first_tensor(x: View) -> Tensor:
    """The tensor, or the dict's first tensor."""
    return next(v for v in x.values() if isinstance(v, Tensor)) if isinstance(x, dict) else x


def batch_size(x: View) -> int:
    """B, the first dimension (every tensor of a dict shares it)."""
    return first_tensor(x).shape[0]


def to_device(x: View, device: torch.device, memory_format: torch.memory_format = torch.contiguous_format) -> View:
    """``x`` on ``device`` (asynchronously from pinned memory); the memory format applies to
    4-D tensors only, the image batches (``train.channels_last``)."""
    def move(t: Tensor) -> Tensor:
        if t.dim() == 4:
            return t.to(device, memory_format=memory_format, non_blocking=True)
        return t.to(device, non_blocking=True)

    return map_tensors(x, move)


def shape_of(x: Any) -> Any:
    """One item's shape (no batch dimension) of a view of one item: a tuple, or a dict of them."""
    return {k: tuple(v.shape) for k, v in x.items()} if isinstance(x, dict) else tuple(x.shape)
