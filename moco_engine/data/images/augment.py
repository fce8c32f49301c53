"""Batched two-view augmentations on tensors, for data sets held in device memory.

The CPU path (``recipes.py``'s PIL transforms, in ``sampling.py``'s loader workers) augments
one PIL image at a time; on a GPU that cannot keep up with a CIFAR-sized step (the MoCo
authors' demo spends half its epoch waiting for 16 workers). Here a whole batch is augmented
at once, on whatever device holds it, with per-sample random parameters drawn from the
distribution of a recipe's
:class:`~moco_engine.data.images.recipes.ViewSpec` (the same spec the CPU path's PIL transforms are built from):

- random resized crop: area fraction ~ U(scale), log aspect ratio ~ U(log ratio), ten tries
  then the centre-crop fallback, integer pixel boxes as torchvision rounds them; resampled
  bilinearly (one ``grid_sample`` per batch, the horizontal flip folded into the same affine
  map, which is exact because every later op is symmetric under the flip);
- colour jitter with probability p: brightness, contrast, saturation ~ U(1−x, 1+x), hue ~
  U(−h, h), applied in a random order drawn per sample (torchvision draws one per call, i.e.
  per image), each followed by a clamp to [0, 1];
- grayscale with probability p (luma with torchvision's weights, kept as 3 channels);
- Gaussian blur with probability p, sigma ~ U(0.1, 2.0), reflect padding (MoCo v2's aug+);
- normalisation by the preset's mean and std.

Randomness comes from an explicit ``torch.Generator`` on the images' device, so a batch's
views depend only on the generator's seed (the trainer seeds it from (seed, epoch, step)).
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from moco_engine.data.images.recipes import ViewSpec, eval_resize

GRAY_WEIGHTS = (0.2989, 0.587, 0.114)  # as torchvision's rgb_to_grayscale (tensor path)
BRIGHTNESS, CONTRAST, SATURATION, HUE = range(4)


def _const(values: tuple[float, ...], device: torch.device) -> Tensor:
    """A small constant on ``device``, made once: building it from a Python list each step
    would be a blocking host-to-device copy, a host sync per step on CUDA. Inside a compiled
    graph it is a constant of the graph (dynamo would trace through the cache, and warn)."""
    if torch.compiler.is_compiling():
        return torch.tensor(values, device=device)
    return _cached_const(values, device)


@functools.lru_cache(maxsize=64)
def _cached_const(values: tuple[float, ...], device: torch.device) -> Tensor:
    return torch.tensor(values, device=device)


# ---------------------------------------------------------------------------------------------
# Parameters
# ---------------------------------------------------------------------------------------------
def crop_boxes(n: int, height: int, width: int, scale, ratio, generator: torch.Generator) -> Tensor:
    """Random resized crop boxes as torchvision's ``RandomResizedCrop.get_params`` draws them,
    for n images of one size: :func:`crop_boxes_each` with every size (height, width).

    Returns:
        (n, 4) float tensor of (top, left, h, w) in whole pixels, on the generator's device.
    """
    device = generator.device
    return crop_boxes_each(torch.full((n,), height, device=device), torch.full((n,), width, device=device),
                           scale, ratio, generator)


def crop_boxes_each(heights: Tensor, widths: Tensor, scale, ratio, generator: torch.Generator) -> Tensor:
    """Random resized crop boxes for n images of their own sizes ``heights``, ``widths`` (n,), as
    torchvision's ``RandomResizedCrop.get_params`` draws them for each: area fraction ~ U(scale),
    log aspect ratio ~ U(log ratio), the first of ten tries that fits, else the whole image cut to
    the nearest allowed ratio. Returns (n, 4) float (top, left, h, w) in whole pixels."""
    device = generator.device
    tries = 10
    height, width = heights.to(device).float()[:, None], widths.to(device).float()[:, None]  # (n, 1)
    u = torch.rand(len(heights), tries, 4, device=device, generator=generator)
    target_area = height * width * (scale[0] + (scale[1] - scale[0]) * u[..., 0])
    log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
    aspect = torch.exp(log_lo + (log_hi - log_lo) * u[..., 1])
    w = torch.round(torch.sqrt(target_area * aspect))
    h = torch.round(torch.sqrt(target_area / aspect))
    ok = (w > 0) & (w <= width) & (h > 0) & (h <= height)
    top = torch.floor(u[..., 2] * (height - h + 1))
    left = torch.floor(u[..., 3] * (width - w + 1))
    first = torch.where(ok, torch.arange(tries, device=device), tries).amin(dim=1)
    pick = first.clamp(max=tries - 1)[:, None]
    box = torch.stack([t.gather(1, pick)[:, 0] for t in (top, left, h, w)], dim=1)
    height, width = height[:, 0], width[:, 0]
    in_ratio = width / height
    narrow, wide = in_ratio < ratio[0], in_ratio > ratio[1]
    fw = torch.where(wide, torch.round(height * ratio[1]), width)
    fh = torch.where(narrow, torch.round(width / ratio[0]), height)
    fallback = torch.stack([torch.div(height - fh, 2, rounding_mode="floor"), torch.div(width - fw, 2, rounding_mode="floor"),
                            fh, fw], dim=1)
    return torch.where((first < tries)[:, None], box, fallback)


def crop_flip_grid(boxes: Tensor, flip: Tensor, height: int, width: int, size: int) -> Tensor:
    """The sampling grid that crops ``boxes`` (n, 4), flips where ``flip`` (n,) and resizes to
    ``size``: (n, size, size, 2) for ``grid_sample(align_corners=False)``.

    Output pixel u of a box (left j, width w) samples input x = j + (u + ½)·w/size − ½, which in
    normalised coordinates is the affine map x̂ = (w/W)·û + (2j + w)/W − 1.
    """
    top, left, h, w = boxes.unbind(1)
    theta = torch.zeros(boxes.shape[0], 2, 3, device=boxes.device)
    theta[:, 0, 0] = torch.where(flip, -1.0, 1.0) * w / width
    theta[:, 0, 2] = (2 * left + w) / width - 1
    theta[:, 1, 1] = h / height
    theta[:, 1, 2] = (2 * top + h) / height - 1
    return F.affine_grid(theta, [boxes.shape[0], 3, size, size], align_corners=False)


def jitter_params(n: int, spec: ViewSpec, generator: torch.Generator) -> tuple[Tensor, Tensor]:
    """Per-sample colour-jitter draws: ((n, 4) factors, (n, 4) op order).

    Factors are brightness, contrast, saturation ~ U(max(0, 1 − x), 1 + x) and hue ~ U(−h, h);
    with probability 1 − ``jitter_p`` a sample gets the identity (1, 1, 1, 0) instead.
    """
    device = generator.device
    b, c, s, h = spec.jitter
    lo = _const((max(0.0, 1 - b), max(0.0, 1 - c), max(0.0, 1 - s), -h), device)
    hi = _const((1 + b, 1 + c, 1 + s, h), device)
    factors = lo + (hi - lo) * torch.rand(n, 4, device=device, generator=generator)
    applied = torch.rand(n, 1, device=device, generator=generator) < spec.jitter_p
    factors = torch.where(applied, factors, _const((1.0, 1.0, 1.0, 0.0), device))
    order = torch.rand(n, 4, device=device, generator=generator).argsort(dim=1)
    return factors, order


# ---------------------------------------------------------------------------------------------
# Colour operations on (n, 3, H, W) images in [0, 1], per-sample factors of shape (n,)
# ---------------------------------------------------------------------------------------------
def grayscale(x: Tensor) -> Tensor:
    """(n, 3, H, W) -> (n, 1, H, W) luma."""
    r, g, b = x.unbind(1)
    return (GRAY_WEIGHTS[0] * r + GRAY_WEIGHTS[1] * g + GRAY_WEIGHTS[2] * b).unsqueeze(1)


def _per_sample(v: Tensor) -> Tensor:
    return v.view(-1, 1, 1, 1)


def adjust_hue(x: Tensor, shift: Tensor) -> Tensor:
    """Rotate the hue by ``shift`` (n,) turns, through HSV as torchvision does."""
    r, g, b = x.unbind(1)
    maxc, _ = x.max(dim=1)
    minc, _ = x.min(dim=1)
    delta = maxc - minc
    value = maxc
    sat = torch.where(maxc > 0, delta / torch.where(maxc > 0, maxc, 1.0), 0.0)
    safe = torch.where(delta > 0, delta, 1.0)
    rc, gc, bc = (maxc - r) / safe, (maxc - g) / safe, (maxc - b) / safe
    hue = torch.where(maxc == r, bc - gc, torch.where(maxc == g, 2.0 + rc - bc, 4.0 + gc - rc))
    hue = torch.where(delta > 0, (hue / 6.0) % 1.0, 0.0)
    hue = (hue + shift.view(-1, 1, 1)) % 1.0
    # HSV -> RGB: channel c = v − v·s·clamp(min(k, 4 − k), 0, 1), k = (n + 6h) mod 6, n = 5, 3, 1.
    k = (_const((5.0, 3.0, 1.0), x.device).view(1, 3, 1, 1) + 6.0 * hue.unsqueeze(1)) % 6.0
    ramp = torch.minimum(k, 4.0 - k).clamp(0.0, 1.0)
    return value.unsqueeze(1) * (1.0 - sat.unsqueeze(1) * ramp)


def color_jitter(x: Tensor, factors: Tensor, order: Tensor) -> Tensor:
    """torchvision's ColorJitter with per-sample factors and a per-sample order.

    Args:
        x: (n, 3, H, W) in [0, 1].
        factors: (n, 4) brightness, contrast, saturation factors and hue shift; (1, 1, 1, 0) is
            the identity (samples the jitter skips carry it).
        order: (n, 4) a permutation of the four ops per sample.

    Brightness, contrast and saturation are all of the form ``a·x + (1 − a)·base`` (base 0, the
    image's mean luma, its per-pixel luma), so each stage is one blend with the stage's op chosen
    per sample, plus a hue rotation kept only for the samples whose stage is hue.
    """
    for stage in range(4):
        op = order[:, stage]
        factor = factors.gather(1, op[:, None])[:, 0]
        gray = grayscale(x)
        base = torch.where(_per_sample(op == CONTRAST), gray.mean(dim=(2, 3), keepdim=True), gray)
        base = torch.where(_per_sample(op == BRIGHTNESS), 0.0, base)
        a = _per_sample(torch.where(op == HUE, 1.0, factor))
        x = (a * x + (1 - a) * base).clamp(0.0, 1.0)
        x = torch.where(_per_sample(op == HUE), adjust_hue(x, factor), x)
    return x


def gaussian_blur(x: Tensor, sigma: Tensor, kernel: int) -> Tensor:
    """Blur each image with its own sigma (n,), a separable ``kernel``-tap filter, reflect padding."""
    n, c, h, w = x.shape
    half = (kernel - 1) / 2
    taps = torch.linspace(-half, half, kernel, device=x.device)
    weights = torch.exp(-0.5 * (taps / sigma[:, None]) ** 2)
    weights = weights / weights.sum(dim=1, keepdim=True)  # (n, kernel)
    weights = weights.repeat_interleave(c, dim=0)  # one filter per (image, channel) group
    pad = kernel // 2
    flat = F.pad(x.reshape(1, n * c, h, w), (pad, pad, pad, pad), mode="reflect")
    flat = F.conv2d(flat, weights.view(n * c, 1, 1, kernel), groups=n * c)
    flat = F.conv2d(flat, weights.view(n * c, 1, kernel, 1), groups=n * c)
    return flat.view(n, c, h, w)


# ---------------------------------------------------------------------------------------------
# The view
# ---------------------------------------------------------------------------------------------
@dataclass
class ViewParams:
    """Every random draw of a batch of n views (tensors on the images' device)."""

    boxes: Tensor  # (n, 4) crop (top, left, h, w)
    flip: Tensor  # (n,) bool
    gray: Tensor  # (n,) bool
    factors: Tensor  # (n, 4) colour-jitter factors
    order: Tensor  # (n, 4) colour-jitter op order
    blur: Tensor  # (n,) bool
    sigma: Tensor  # (n,) blur sigma
    solarize: Tensor | None = None  # (n,) bool; drawn only by specs that solarize


def draw_params(n: int, height: int | Tensor, width: int | Tensor, spec: ViewSpec, generator: torch.Generator) -> ViewParams:
    """All random parameters of n views of (height, width) images, from ``generator``; with
    ``height`` and ``width`` (n,) tensors, of images of their own sizes."""
    device = generator.device

    def coin(p: float) -> Tensor:
        return torch.rand(n, device=device, generator=generator) < p

    if isinstance(height, Tensor):
        boxes = crop_boxes_each(height, width, spec.scale, spec.ratio, generator)
    else:
        boxes = crop_boxes(n, height, width, spec.scale, spec.ratio, generator)
    flip, gray = coin(spec.flip_p), coin(spec.gray_p)
    factors, order = jitter_params(n, spec, generator)
    lo, hi = spec.blur_sigma
    sigma = lo + (hi - lo) * torch.rand(n, device=device, generator=generator)
    blur = coin(spec.blur_p)
    return ViewParams(boxes, flip, gray, factors, order, blur, sigma, coin(spec.solarize_p) if spec.solarize_p > 0 else None)


def apply_views(x: Tensor, p: ViewParams, spec: ViewSpec) -> Tensor:
    """The views of images x (n, 3, H, W) float in [0, 1] under parameters p: a pure function of
    tensors, so ``torch.compile`` can fuse it. Returns (n, 3, size, size) normalised."""
    height, width = x.shape[-2:]
    grid = crop_flip_grid(p.boxes, p.flip, height, width, spec.size)
    return finish_views(F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False), p, spec)


def finish_views(x: Tensor, p: ViewParams, spec: ViewSpec) -> Tensor:
    """Everything of a view after its crop, on crops x (n, 3, size, size) in [0, 1]: colour,
    grayscale, blur, solarize, normalisation."""
    if spec.gray_before_jitter:
        x = torch.where(_per_sample(p.gray), grayscale(x).expand_as(x), x)
    x = color_jitter(x, p.factors, p.order)
    if not spec.gray_before_jitter:
        x = torch.where(_per_sample(p.gray), grayscale(x).expand_as(x), x)
    if spec.blur_p > 0:
        x = torch.where(_per_sample(p.blur), gaussian_blur(x, p.sigma, spec.blur_kernel), x)
    if p.solarize is not None:  # PIL's solarize(threshold=128): a value v >= 128/255 becomes 1 - v
        x = torch.where(_per_sample(p.solarize), torch.where(x >= 128 / 255, 1.0 - x, x), x)
    return (x - _const(spec.mean, x.device).view(1, 3, 1, 1)) / _const(spec.std, x.device).view(1, 3, 1, 1)


def random_views(images: Tensor, spec: ViewSpec, generator: torch.Generator, apply=apply_views) -> Tensor:
    """One random view of each image.

    Args:
        images: (n, 3, H, W) uint8 (or float in [0, 1]) on the generator's device.
        spec: the distribution of the view.
        generator: the source of every random parameter.
        apply: :func:`apply_views` or a compiled version of it.

    Returns:
        (n, 3, size, size) float32, normalised with ``spec.mean`` and ``spec.std``.
    """
    n, _, height, width = images.shape
    x = images.float() / 255.0 if images.dtype == torch.uint8 else images.float()
    return apply(x, draw_params(n, height, width, spec, generator), spec)


def ragged_crops(images: list[Tensor], sizes: Tensor, boxes: Tensor, flip: Tensor, size: int) -> Tensor:
    """The crops ``boxes`` (n, 4) of n images of their own sizes, flipped where ``flip``, resized
    to ``size``: (n, 3, size, size) float in [0, 1], as ``grid_sample`` (bilinear, border
    padding, align_corners=False) makes them from each image alone, in a few batched gathers.

    Output pixel u of a box (left j, width w) samples x = j + (u + ½)·w/size − ½ (mirrored,
    u → size − 1 − u), clipped to [0, W − 1] as border padding clips it; the four neighbours
    are read from all images laid end to end, so the memory is the output's, whatever the sizes.
    ``sizes`` (n, 2) are the images' (H_i, W_i) on the boxes' device.
    """
    device = boxes.device
    heights, widths = sizes.long().unbind(1)
    flat = torch.cat([x.reshape(3, -1) for x in images], dim=1)  # (3, Σ H_i·W_i) uint8
    offsets = torch.cumsum(heights * widths, 0) - heights * widths
    top, left, h, w = boxes.unbind(1)
    u = torch.arange(size, device=device, dtype=torch.float32)
    ux = torch.where(flip[:, None], size - 1 - u, u)

    def axis(start: Tensor, extent: Tensor, steps: Tensor, limit: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Each output pixel's two source rows (or columns) and the weight of the second: (n, size)."""
        pos = start[:, None] + (steps + 0.5) * extent[:, None] / size - 0.5
        pos = torch.minimum(pos.clamp(min=0), (limit - 1)[:, None].float())
        low = pos.floor()
        return low.long(), torch.minimum(low.long() + 1, (limit - 1)[:, None]), pos - low

    y0, y1, wy = axis(top, h, u.expand(len(images), -1), heights)
    x0, x1, wx = axis(left, w, ux, widths)

    def read(rows: Tensor, cols: Tensor) -> Tensor:  # (n, size) each -> (n, 3, size, size)
        index = offsets[:, None, None] + rows[:, :, None] * widths[:, None, None] + cols[:, None, :]
        return flat[:, index.flatten()].view(3, len(images), size, size).transpose(0, 1).float() / 255.0

    wy, wx = wy[:, None, :, None], wx[:, None, None, :]
    return ((1 - wy) * ((1 - wx) * read(y0, x0) + wx * read(y0, x1))
            + wy * ((1 - wx) * read(y1, x0) + wx * read(y1, x1)))


def ragged_views(images: list[Tensor], spec: ViewSpec, generator: torch.Generator) -> Tensor:
    """One random view of each of n images of their own sizes (decoded JPEGs): the draws of
    :func:`random_views`, each crop box within its own image, the crops by :func:`ragged_crops`,
    the rest on the whole batch. Images of one size take :func:`random_views` itself.

    Args:
        images: n uint8 (3, H_i, W_i) tensors on the generator's device.

    Returns:
        (n, 3, size, size) float32, normalised with ``spec.mean`` and ``spec.std``.
    """
    if len({tuple(x.shape) for x in images}) == 1:
        return random_views(torch.stack(images), spec, generator)
    sizes = torch.tensor([tuple(x.shape[-2:]) for x in images], dtype=torch.float32).to(generator.device)
    p = draw_params(len(images), sizes[:, 0], sizes[:, 1], spec, generator)
    return finish_views(ragged_crops(images, sizes, p.boxes, p.flip, spec.size), p, spec)


def plain_views(images: Tensor, size: int, mean, std) -> Tensor:
    """The evaluation view: (n, 3, H, W) uint8 -> (n, 3, size, size) normalised float32.

    As ``recipes.eval_transform``: resized to ``recipes.eval_resize(size)`` on the short side,
    then centre-cropped.
    """
    x = images.float() / 255.0
    height, width = x.shape[-2:]
    short = eval_resize(size)
    if min(height, width) != short:
        scale = short / min(height, width)
        x = F.interpolate(x, size=(round(height * scale), round(width * scale)), mode="bilinear",
                          antialias=True, align_corners=False)
    height, width = x.shape[-2:]
    top, left = (height - size) // 2, (width - size) // 2
    x = x[..., top : top + size, left : left + size]
    return (x - _const(tuple(mean), x.device).view(1, 3, 1, 1)) / _const(tuple(std), x.device).view(1, 3, 1, 1)


def view_statistics(x: Tensor) -> dict[str, Tensor]:
    """Per-view summaries of (n, 3, H, W) pixels in [0, 1], each (n,): brightness (mean luma),
    contrast (luma std), saturation (mean (max − min) / max over pixels), sharpness (mean
    absolute difference of neighbouring pixels) and grayness (1 where the channels agree). For
    comparing two augmentation pipelines by distribution (``tools/compare_views.py``)."""
    luma = grayscale(x)[:, 0]
    high, low = x.amax(1), x.amin(1)
    return {
        "luma_mean": luma.mean((1, 2)),
        "luma_std": luma.std((1, 2)),
        "saturation": torch.where(high > 0, (high - low) / high.clamp(min=1e-6), 0.0).mean((1, 2)),
        "sharpness": (x[..., 1:] - x[..., :-1]).abs().mean((1, 2, 3)) + (x[..., 1:, :] - x[..., :-1, :]).abs().mean((1, 2, 3)),
        "gray": ((high - low).amax((1, 2)) < 1e-3).float(),
    }
