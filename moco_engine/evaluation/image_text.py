"""Image–text retrieval and zero-shot classification metrics, independent of any model.

Every function takes embeddings, logits or an ``encode_text`` callable, so a CLIP-style run, a
MoCo image encoder beside a text encoder, or a test's hand-made tensors are measured alike.

- :func:`pair_recalls`: image→text and text→image recall@k (%) and their sum, ``rsum``, as the
  COCO/Flickr30k Karpathy-split papers report them. An image hits when ANY of its captions is
  among its k best texts; a caption hits when its own image is among its k best images.
- :func:`chance_recalls`: the same figures for a uniformly random ranking, the floor a trained
  model's numbers are read against.
- :data:`CIFAR_TEMPLATES`, :func:`read_templates`, :func:`class_embeddings`,
  :func:`zeroshot_metrics`: CLIP's prompt ensemble and the accuracies of its logits.

Ties, everywhere in this module: an item's rank is the number of negatives scored as high or
higher, so a positive tied with negatives counts as ranked after them (the pessimistic rule:
collapsed towers, which score everything alike, rank last). It needs no sort, and continuous
embeddings of trained towers rarely tie.

``CIFAR_TEMPLATES`` were checked against openai/CLIP's ``data/prompts.md`` (its CIFAR10 and
CIFAR100 sections list the same 18 templates, in this order).
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

from moco_engine.config.schema import UserError

DEFAULT_KS = (1, 5, 10)
#: Rows of the similarity matrix held at once: a chunk is (CHUNK, M) or (CHUNK, N), never (N, M).
CHUNK = 1024

CIFAR_TEMPLATES = (
    "a photo of a {}.",
    "a blurry photo of a {}.",
    "a black and white photo of a {}.",
    "a low contrast photo of a {}.",
    "a high contrast photo of a {}.",
    "a bad photo of a {}.",
    "a good photo of a {}.",
    "a photo of a small {}.",
    "a photo of a big {}.",
    "a photo of the {}.",
    "a blurry photo of the {}.",
    "a black and white photo of the {}.",
    "a low contrast photo of the {}.",
    "a high contrast photo of the {}.",
    "a bad photo of the {}.",
    "a good photo of the {}.",
    "a photo of the small {}.",
    "a photo of the big {}.",
)


# --- retrieval ---------------------------------------------------------------------------------

def recall_keys(ks: Sequence[int]) -> list[str]:
    """The keys of :func:`pair_recalls` and :func:`chance_recalls`, in their order:
    ``i2t_R@k`` for each k, ``t2i_R@k`` for each k, then ``rsum``."""
    return [f"{d}_R@{k}" for d in ("i2t", "t2i") for k in ks] + ["rsum"]


def check_ks(ks: Sequence[int]) -> tuple[int, ...]:
    """``ks`` as a tuple of positive ints; a ValueError otherwise."""
    ks = tuple(ks)
    if not ks or any(isinstance(k, bool) or not isinstance(k, int) or k < 1 for k in ks):
        raise ValueError(f"ks must be positive integers, got {ks!r}")
    return ks


def caption_counts(text_image: Tensor, num_images: int) -> Tensor:
    """Captions per image (N,) long of ``text_image`` (M,), each caption's image index.

    A ValueError for an index outside [0, N) or an image with no caption: that image could never
    hit, and silently scoring it 0 would understate every image→text recall.
    """
    if text_image.dim() != 1 or text_image.dtype in (torch.bool,) or text_image.is_floating_point():
        raise ValueError(f"text_image must be a 1-D integer tensor, got {tuple(text_image.shape)} {text_image.dtype}")
    if num_images < 1 or text_image.numel() == 0:
        raise ValueError(f"need at least one image and one caption, got {num_images} and {text_image.numel()}")
    if int(text_image.min()) < 0 or int(text_image.max()) >= num_images:
        raise ValueError(f"text_image holds indices outside [0, {num_images}): "
                         f"min {int(text_image.min())}, max {int(text_image.max())}")
    counts = torch.bincount(text_image.long(), minlength=num_images)
    if bool((counts == 0).any()):
        missing = torch.nonzero(counts == 0).flatten()
        raise ValueError(f"{missing.numel()} image(s) have no caption, e.g. image {int(missing[0])}")
    return counts


def ranks_of_best_positive(scores: Tensor, positive: Tensor) -> Tensor:
    """Rank (R,) long of each row's best-scored positive among ``scores`` (R, K): the number of
    negatives scored as high or higher (0 is first). ``positive`` (R, K) bool has a True in each row.

    A tie counts against the positive: towers collapsed to one output score everything alike,
    and must rank last, not first (else a collapsed run would top the monitor and a sweep).
    """
    best = scores.masked_fill(~positive, float("-inf")).amax(dim=1, keepdim=True)
    return ((scores >= best) & ~positive).sum(dim=1)


def hits_at(ranks: Tensor, ks: Sequence[int]) -> list[int]:
    """How many of ``ranks`` (R,) are below each k: the hits at recall@k."""
    return [int((ranks < k).sum()) for k in ks]


def pair_recalls(image_emb: Tensor, text_emb: Tensor, text_image: Tensor,
                 ks: Sequence[int] = DEFAULT_KS, chunk: int = CHUNK) -> dict[str, float]:
    """Recall@k (%) both ways between images and their captions, and ``rsum``, their sum.

    ``image_emb`` (N, D) and ``text_emb`` (M, D) are unit-normalised already, so a similarity is
    their dot product; ``text_image`` (M,) long is each caption's image index in [0, N), every
    image having at least one caption (a ValueError otherwise).

    - image→text: image i hits at k when any caption j with ``text_image[j] == i`` is among its k
      best-scored texts, i.e. its best caption's rank is below k;
    - text→image: caption j hits at k when image ``text_image[j]`` is among its k best images.

    Rank is the number of negatives scored as high or higher (ties counted against the positive).
    Rows go ``chunk`` at a time, so at most (chunk, max(N, M)) scores are held.
    Returns the keys of :func:`recall_keys` (``i2t_R@1`` ... ``t2i_R@10``, ``rsum``).
    """
    ks = check_ks(ks)
    if image_emb.dim() != 2 or text_emb.dim() != 2 or image_emb.shape[1] != text_emb.shape[1]:
        raise ValueError(f"need image_emb (N, D) and text_emb (M, D), got {tuple(image_emb.shape)} "
                         f"and {tuple(text_emb.shape)}")
    if text_image.shape != (text_emb.shape[0],):
        raise ValueError(f"text_image must be ({text_emb.shape[0]},), one image index per caption, "
                         f"got {tuple(text_image.shape)}")
    if chunk < 1:
        raise ValueError(f"chunk must be positive, got {chunk}")
    n, m = image_emb.shape[0], text_emb.shape[0]
    caption_counts(text_image, n)
    # A NaN compares False with everything: its rank would be 0 and count as a perfect hit.
    if not (bool(torch.isfinite(image_emb).all()) and bool(torch.isfinite(text_emb).all())):
        raise ValueError("image_emb or text_emb holds a NaN or infinity")
    # Half-precision scores tie far more often than float32 ones; float64 stays as it is.
    dtype = torch.promote_types(torch.promote_types(image_emb.dtype, text_emb.dtype), torch.float32)
    images, texts = image_emb.to(dtype), text_emb.to(dtype)
    owner = text_image.to(device=images.device, dtype=torch.long)

    i2t = [0] * len(ks)
    for start in range(0, n, chunk):
        rows = torch.arange(start, min(start + chunk, n), device=images.device)
        scores = images[rows] @ texts.T                                   # (c, M)
        positive = owner[None, :] == rows[:, None]                        # (c, M)
        i2t = [a + b for a, b in zip(i2t, hits_at(ranks_of_best_positive(scores, positive), ks))]

    t2i = [0] * len(ks)
    for start in range(0, m, chunk):
        stop = min(start + chunk, m)
        scores = texts[start:stop] @ images.T                             # (c, N)
        own = scores.gather(1, owner[start:stop, None])                   # (c, 1)
        ranks = (scores >= own).sum(dim=1) - 1                              # (c,) ties against the own image
        t2i = [a + b for a, b in zip(t2i, hits_at(ranks, ks))]

    return as_recalls([100.0 * h / n for h in i2t], [100.0 * h / m for h in t2i], ks)


def as_recalls(i2t: Sequence[float], t2i: Sequence[float], ks: Sequence[int]) -> dict[str, float]:
    """The recall dict of :func:`recall_keys` from percentages per k each way, ``rsum`` added."""
    values = [*i2t, *t2i]
    return dict(zip(recall_keys(ks), [*values, sum(values)]))


def log_comb(n: int, k: int) -> float:
    """log C(n, k) for 0 <= k <= n, through lgamma: exact products overflow floats by n ~ 200."""
    return math.lgamma(n + 1) - math.lgamma(k + 1) - math.lgamma(n - k + 1)


#: Up to this many factors the miss probability is a sum of log1p terms, else lgamma's.
PRODUCT_TERMS = 10_000


def chance_hit(m: int, c: int, k: int) -> float:
    """The probability that k texts drawn without replacement from m, c of them positive, hold
    at least one positive: 1 - C(m - c, k) / C(m, k).

    The ratio equals prod_{j < min(c, k)} (1 - max(c, k) / (m - j)) (it is symmetric in c and
    k), so a handful of log1p terms and expm1 give it to full relative precision; 1 - exp of an
    lgamma difference would lose about 8 digits to cancellation when the answer is near 0.
    """
    k = min(k, m)
    if m - c < k:
        return 1.0  # fewer negatives than draws: a positive is always drawn
    few, many = min(c, k), max(c, k)
    if few <= PRODUCT_TERMS:
        log_miss = math.fsum(math.log1p(-many / (m - j)) for j in range(few))
    else:
        log_miss = log_comb(m - c, k) - log_comb(m, k)
    return -math.expm1(log_miss)


def chance_recalls(text_image: Tensor, num_images: int, ks: Sequence[int] = DEFAULT_KS) -> dict[str, float]:
    """The expected recalls (%) of a uniformly random ranking, keyed as :func:`pair_recalls`.

    ``text_image`` (M,) is each caption's image index; ``num_images`` is N.

    - text→image: a caption's one image among N lands in the top k with probability
      min(k, N) / N;
    - image→text: an image with c captions among M misses the top k with probability
      C(M - c, k) / C(M, k) (k texts drawn without replacement); its recall is 1 minus that,
      averaged over images. Computed in log space (:func:`chance_hit`), so M in the millions
      is fine.

    With every image holding c captions both ways come to about k / N: for N = 1000 images of 5
    captions each, i2t R@10 = 1 - prod_{j<10} (4995 - j) / (5000 - j) ≈ 0.996 %, t2i R@10 = 1 %.
    """
    ks = check_ks(ks)
    counts = caption_counts(text_image, num_images)
    m = int(text_image.numel())
    # Images sharing a caption count share a probability: one computed per distinct count.
    by_count = Counter(counts.tolist())
    i2t = [100.0 * sum(n * chance_hit(m, c, k) for c, n in by_count.items()) / num_images for k in ks]
    t2i = [100.0 * min(k, num_images) / num_images for k in ks]
    return as_recalls(i2t, t2i, ks)


# --- zero-shot classification ------------------------------------------------------------------

def read_templates(path: str) -> list[str]:
    """Prompt templates from a text file, one a line, each with ``{}`` where the class name goes.

    Blank lines and lines starting with ``#`` are skipped and the rest stripped of surrounding
    whitespace. A UserError names the file (and the line, for a bad template) when the file is
    missing or unreadable, holds no template, or a line lacks ``{}`` or cannot be filled with
    one class name (another ``{...}`` field, or two ``{}``).
    """
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"{path}: cannot read the templates file: {e}") from None
    templates = []
    for n, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if "{}" not in line:
            raise UserError(f"{path}, line {n}: a template needs {{}} for the class name: {line!r}")
        try:
            line.format("x")
        except (IndexError, KeyError, ValueError):
            raise UserError(f"{path}, line {n}: a template takes one {{}} and no other {{...}} field "
                            f"(write {{{{ and }}}} for literal braces): {line!r}") from None
        templates.append(line)
    if not templates:
        raise UserError(f"{path}: no templates in the file (one a line, each with {{}} for the class name)")
    return templates


def class_embeddings(encode_text: Callable[[list[str]], Tensor], classnames: Sequence[str],
                     templates: Sequence[str]) -> Tensor:
    """Zero-shot class embeddings (C, D), unit rows, one per class name, in order.

    For each class, ``'_'`` in its name becomes ``' '`` (folder-style names read as words), each
    template is filled with the name, ``encode_text`` maps those P prompts to (P, D) embeddings
    (not necessarily normalised), each is normalised, they are averaged, and the mean normalised
    again: the prompt ensemble as open_clip's ``zero_shot_classifier`` builds its weights.
    Logits are then ``image_emb (N, D) @ class_embeddings(...).T`` (N, C).
    """
    if not classnames or not templates:
        raise ValueError(f"need at least one class name and one template, got {len(classnames)} and {len(templates)}")
    rows = []
    for name in classnames:
        prompts = [t.format(name.replace("_", " ")) for t in templates]
        emb = encode_text(prompts)
        if emb.dim() != 2 or emb.shape[0] != len(prompts):
            raise ValueError(f"encode_text must return ({len(prompts)}, D) for {len(prompts)} prompts, "
                             f"got {tuple(emb.shape)}")
        rows.append(F.normalize(F.normalize(emb.float(), dim=-1).mean(dim=0), dim=-1))
    return torch.stack(rows)


def zeroshot_metrics(logits: Tensor, targets: Tensor) -> dict[str, float]:
    """Top-1, top-5 and mean per-class recall (%) of ``logits`` (N, C) against ``targets`` (N,),
    with their chance levels.

    ``top5`` is top-min(5, C). A sample's rank is the number of other classes scored as high or
    higher than its target (ties against it). ``mean_per_class_recall`` averages the top-1 recall of the
    classes present in ``targets``; a class with no sample has no recall and is left out.
    Chance: ``chance_top1`` = ``chance_mean_per_class_recall`` = 100 / C, ``chance_top5`` =
    100 · min(5, C) / C.
    """
    if logits.dim() != 2 or logits.shape[0] == 0 or logits.shape[1] == 0:
        raise ValueError(f"logits must be (N, C) with N, C > 0, got {tuple(logits.shape)}")
    n, c = logits.shape
    if targets.shape != (n,) or targets.is_floating_point():
        raise ValueError(f"targets must be ({n},) integer class indices, got {tuple(targets.shape)} {targets.dtype}")
    targets = targets.to(device=logits.device, dtype=torch.long)
    if int(targets.min()) < 0 or int(targets.max()) >= c:
        raise ValueError(f"targets hold classes outside [0, {c}): min {int(targets.min())}, max {int(targets.max())}")
    if not bool(torch.isfinite(logits).all()):
        raise ValueError("logits hold a NaN or infinity")
    ranks = (logits >= logits.gather(1, targets[:, None])).sum(dim=1) - 1  # (N,) ties against the target
    top1, k5 = ranks == 0, min(5, c)
    samples = torch.bincount(targets, minlength=c)                         # (C,)
    correct = torch.bincount(targets, weights=top1.double(), minlength=c)  # (C,)
    present = samples > 0
    return {
        "top1": 100.0 * float(top1.double().mean()),
        "top5": 100.0 * float((ranks < k5).double().mean()),
        "mean_per_class_recall": 100.0 * float((correct[present] / samples[present]).mean()),
        "chance_top1": 100.0 / c,
        "chance_top5": 100.0 * k5 / c,
        "chance_mean_per_class_recall": 100.0 / c,
    }
