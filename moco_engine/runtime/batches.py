"""A batch of any input. A view is a tensor (B, ...) (images: (B, 3, H, W)) or a dict of such
tensors (token ids and an attention mask, say); these helpers are where the engine looks inside
one, so nothing else asks which it is."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

View = Tensor | dict[str, Tensor]


def map_tensors(x: View, fn: Callable[[Tensor], Tensor]) -> View:
    """``fn`` applied to the tensor, or to each tensor of the dict."""
    return {k: fn(v) for k, v in x.items()} if isinstance(x, dict) else fn(x)


def batch_size(x: View) -> int:
    """B, the first dimension (every tensor of a dict shares it)."""
    return next(iter(x.values())).shape[0] if isinstance(x, dict) else x.shape[0]


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
