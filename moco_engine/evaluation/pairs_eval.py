"""Image–text evaluation of a run's two towers (``itc.TwoTowers``).

- Retrieval: every image of a split and every caption of them encoded, then ranked both ways
  (``image_text.pair_recalls``). The run's monitor (``monitor.py``, on ``eval.retrieval_split``)
  calls :func:`rank_pairs`; ``moco-eval pairs`` (:func:`evaluate_pairs`, on ``eval.split``) also
  ranks the towers at their initialisation and gives chance beside them.
- Zero-shot classification, ``moco-eval zeroshot`` (:func:`evaluate_zeroshot`): an ImageFolder
  split's images against one embedding a class, CLIP's prompt ensemble through the text tower.

Both encode with the towers in eval mode (BatchNorm's running statistics) and tokenise with the
checkpoint's tokenizer (never trained again), each text [CLS] ... [SEP] cut at
``data.text.max_length`` (``CaptionTokens.encode``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from moco_engine.config.schema import Config, UserError
from moco_engine.data.images.recipes import eval_transform
from moco_engine.data.images.sources import imagefolder_split
from moco_engine.data.loaders import plain_items
from moco_engine.data.pairs.captions import CaptionTokens
from moco_engine.data.sources import open_source
from moco_engine.data.text.tokenizer import TextTokenizer
from moco_engine.evaluation.image_text import (
    CIFAR_TEMPLATES,
    chance_recalls,
    class_embeddings,
    pair_recalls,
    recall_keys,
    zeroshot_metrics,
)
from moco_engine.method.itc import TwoTowers, build_two_towers
from moco_engine.runtime.batches import to_device
from moco_engine.runtime.precision import autocast, autocast_dtype, resolve_device

ZEROSHOT_KEYS = ("top1", "top5", "mean_per_class_recall")


def encode_images(tower: nn.Module, images: Iterable, device: torch.device) -> Tensor:
    """Unit embeddings (N, D) float32 of plain image batches ``(x, targets, indices)`` (autocast and
    the tower's mode are the caller's)."""
    return F.normalize(torch.cat([tower(to_device(x, device)).float() for x, _, _ in images]), dim=1)


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
            image = encode_images(towers.image, images, device)
            count = len(captions.lengths)
            text = torch.cat([towers.text(to_device(captions.rows(start, min(start + batch_size, count)), device)).float()
                              for start in range(0, count, batch_size)])
    finally:
        towers.train(was_training)
    return image, F.normalize(text, dim=1), captions.owners().to(device)


def rank_pairs(towers: nn.Module, images: Iterable, captions: Any, batch_size: int, device: torch.device,
               amp_dtype: torch.dtype | None = None) -> dict[str, float]:
    """Image→text and text→image R@1, R@5, R@10 (%) and rsum of the split's images and captions."""
    image, text, owners = encode_pairs(towers, images, captions, batch_size, device, amp_dtype)
    return pair_recalls(image, text, owners)


# --- moco-eval pairs | zeroshot ----------------------------------------------------------------

def two_towers(mode: str, cfg: Config, model: nn.Module, where: Any) -> TwoTowers:
    """``model`` when it is an image–text run's two towers; else a UserError naming ``where``."""
    if not isinstance(model, TwoTowers):
        raise UserError(f"moco-eval {mode} judges an image-text run's two towers (method=itc), and {where} is not "
                        f"one (method={cfg.method}, data.name={cfg.data.name})")
    return model


def untrained_towers(cfg: Config, input_shape: Any) -> TwoTowers:
    """The run's towers as they started: built from ``train.seed`` as the Trainer builds f_q
    (``model.init_from`` not applied: a random initialisation)."""
    torch.manual_seed(cfg.train.seed)
    return build_two_towers(cfg, input_shape)


def evaluate_pairs(cfg: Config, towers: TwoTowers, state: dict[str, Any]) -> dict[str, Any]:
    """Both ways' R@1, R@5, R@10 and rsum on the ``eval.split`` pairs of the run's data (as its
    source ranks them: a pairs folder's or table's split, ``data.test_root`` for the test split,
    a shard folder's ``OUT/<split>/``), for the run, chance (``chance_recalls``) and the untrained
    towers. ``state``: the checkpoint's (its tokenizer, read back by the source; ``input_shape``).

    Raises:
        DataError: unreadable data, or a split with no items (named).
    """
    device = resolve_device(cfg.train.device)
    dtype = autocast_dtype(cfg.train.precision, device)
    split = cfg.eval.split
    loader, captions = open_source(cfg, state).ranked_pairs(split, cfg.eval.batch_size)
    owners = captions.owners()
    images = len(captions.counts)
    result: dict[str, Any] = {"data": str(cfg.data.root), "split": split, "images": images,
                              "captions": int(owners.numel())}
    result["run"] = rank_pairs(towers.to(device), loader, captions, cfg.eval.batch_size, device, dtype)
    result["chance"] = chance_recalls(owners, images)
    result["untrained"] = rank_pairs(untrained_towers(cfg, state["input_shape"]).to(device), loader, captions,
                                     cfg.eval.batch_size, device, dtype)
    return result


def prompt_encoder(towers: TwoTowers, tokenizer: TextTokenizer, max_length: int,
                   device: torch.device) -> Callable[[list[str]], Tensor]:
    """``encode_text`` of ``class_embeddings``: prompts -> the text tower's (P, D), each prompt
    tokenised as a caption."""

    def encode_text(prompts: list[str]) -> Tensor:
        rows = CaptionTokens.encode(tokenizer, [tuple(prompts)], max_length).rows(0, len(prompts))
        return towers.text(to_device(rows, device)).float()

    return encode_text


@torch.no_grad()
def evaluate_zeroshot(cfg: Config, towers: TwoTowers, state: dict[str, Any],
                      templates: Sequence[str] = CIFAR_TEMPLATES) -> dict[str, Any]:
    """Zero-shot top-1, top-5 and mean per-class recall (%), and their chance, of the images of
    ``data.root``'s split ``data.test_split`` (ImageFolder's layout, ``<root>/<split>/<class>/...``,
    a folder or a .tar/.tar.gz/.tar.xz archive) at the run's evaluation view, each class's
    embedding the text tower's prompt ensemble of ``templates`` (``class_embeddings``).

    Raises:
        UserError: fewer than two classes; DataError: no such folder or split, no image (named).
    """
    device = resolve_device(cfg.train.device)
    dtype = autocast_dtype(cfg.train.precision, device)
    data = cfg.data
    images = imagefolder_split(data.root, data.test_split, data.on_bad_image)
    if len(images.classes) < 2:
        raise UserError(f"{data.root}: zero-shot classification needs at least two classes under "
                        f"'{data.test_split}/' (data.test_split), found {len(images.classes)}: {', '.join(images.classes)}")
    tokenizer = TextTokenizer.from_json(state["tokenizer"], "the checkpoint's tokenizer")
    loader = plain_items(cfg, images, eval_transform(data.augmentation, data.image_size), cfg.eval.batch_size)
    towers = towers.to(device)
    was_training = towers.training
    towers.eval()
    try:
        with autocast(device, dtype):
            classes = class_embeddings(prompt_encoder(towers, tokenizer, data.text.max_length, device),
                                       images.classes, templates)  # (C, D)
            embeddings = encode_images(towers.image, loader, device)  # (N, D)
    finally:
        towers.train(was_training)
    metrics = zeroshot_metrics(embeddings @ classes.T, torch.tensor(images.targets))
    return {"data": str(data.root), "split": data.test_split, "images": len(images), "classes": len(images.classes),
            "templates": len(templates), "run": {k: metrics[k] for k in ZEROSHOT_KEYS},
            "chance": {k: metrics[f"chance_{k}"] for k in ZEROSHOT_KEYS}}


def evaluate_image_text(mode: str, cfg: Config, model: nn.Module, state: dict[str, Any], where: Any,
                        templates: Sequence[str] | None = None) -> dict[str, Any]:
    """``moco-eval pairs`` or ``zeroshot`` (``templates``: None, CLIP's CIFAR ones) of the
    checkpoint ``where``'s f_q ``model``; a UserError when it is not an image–text run's."""
    towers = two_towers(mode, cfg, model, where)
    if mode == "pairs":
        return evaluate_pairs(cfg, towers, state)
    return evaluate_zeroshot(cfg, towers, state, templates or CIFAR_TEMPLATES)


def image_text_lines(result: dict[str, Any]) -> list[str]:
    """The report of ``moco-eval pairs|zeroshot``: what was judged, the columns, one line a system."""
    if result["mode"] == "zeroshot":
        keys, names = ZEROSHOT_KEYS, ("run", "chance")
        head = (f"zero-shot on {result['data']} '{result['split']}' ({result['images']} images, {result['classes']} "
                f"classes, {result['templates']} templates), %:")
    else:
        keys, names = tuple(recall_keys((1, 5, 10))), ("run", "chance", "untrained")
        head = f"{result['data']} '{result['split']}' ({result['images']} images, {result['captions']} captions), %:"
    widths = [max(len(k), 7) for k in keys]
    columns = " " * 12 + "  ".join(f"{k:>{w}}" for k, w in zip(keys, widths))
    return [head, columns] + [f"  {name:<10}" + "  ".join(f"{result[name][k]:{w}.2f}" for k, w in zip(keys, widths))
                              for name in names]
