"""Image–text retrieval of a run's two towers: every image of a split and every caption of them
encoded, then ranked both ways (``image_text.pair_recalls``). The run's monitor (``monitor.py``,
on ``eval.retrieval_split``) and ``moco-eval pairs`` (on ``eval.split``) both call it.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from moco_engine.evaluation.image_text import pair_recalls
from moco_engine.runtime.batches import to_device
from moco_engine.runtime.precision import autocast


@torch.no_grad()
def encode_pairs(towers: nn.Module, images: Iterable, captions: Any, batch_size: int, device: torch.device,
                 amp_dtype: torch.dtype | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """(image embeddings (N, D), caption embeddings (M, D), each caption's image (M,)), unit
    vectors in float32 on ``device``, the towers in eval mode (their state restored after).

    Args:
        towers: ``itc.TwoTowers`` (``.image``, ``.text``).
        images: the split's plain image batches ``(x, targets, indices)`` in index order.
        captions: the split's ``CaptionTokens`` (``rows``, ``owners``).
    """
    was_training = towers.training
    towers.eval()
    try:
        with autocast(device, amp_dtype):
            image = torch.cat([towers.image(to_device(x, device)).float() for x, _, _ in images])
            count = len(captions.lengths)
            text = torch.cat([towers.text(to_device(captions.rows(start, min(start + batch_size, count)), device)).float()
                              for start in range(0, count, batch_size)])
    finally:
        towers.train(was_training)
    return F.normalize(image, dim=1), F.normalize(text, dim=1), captions.owners().to(device)


def rank_pairs(towers: nn.Module, images: Iterable, captions: Any, batch_size: int, device: torch.device,
               amp_dtype: torch.dtype | None = None) -> dict[str, float]:
    """Image→text and text→image R@1, R@5, R@10 (%) and rsum of the split's images and captions."""
    image, text, owners = encode_pairs(towers, images, captions, batch_size, device, amp_dtype)
    return pair_recalls(image, text, owners)
