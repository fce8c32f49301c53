"""The augmentation recipes of images, each written once as a :class:`ViewSpec`, and their
registry (``data.augmentation``).

A recipe (``data.augmentation``) is a distribution of random views. It is stated here once, as
data; the two pipelines are built from that one statement:

- the CPU path (``data.pipeline=cpu``): :func:`view_transform` turns a spec into torchvision's
  PIL transforms, run per image in loader workers;
- the device path (``data.pipeline=device``): :mod:`moco_engine.data.images.augment` draws the same
  distribution as batched tensor ops (``random_views(images, spec, generator)``).

The evaluation view (no randomness) follows one resize rule, :func:`eval_resize`, on both paths.

Presets:

- ``cifar``: the MoCo CIFAR-10 demo's: RandomResizedCrop, flip, colour jitter 0.4/0.4/0.4/0.1
  with p=0.8, grayscale p=0.2.
- ``moco_v1``: MoCo v1's ImageNet recipe (crop scale 0.2-1, grayscale 0.2 then jitter 0.4).
- ``moco_v2``: MoCo v2's "aug+" (jitter with p=0.8, Gaussian blur with p=0.5).
- ``moco_v3``: MoCo v3's, its two views different (blur on the first, rarer blur and solarize
  on the second).
- ``moco_v3_cifar``: MoCo v3's two views for 32 px as solo-learn's CIFAR recipes draw them
  (``scripts/pretrain/cifar/augmentations/asymmetric.yaml``): no blur, solarize 0.2 on the
  second view, CIFAR normalisation.
- ``cifar_light``: ``cifar`` made easier for runs of a few hundred steps (crops of 35-100% of
  the image instead of 8-100%, jitter and grayscale half as often): the embedded default run's.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace

from torchvision import transforms as T

from moco_engine.config.registry import Registry

CIFAR_MEAN, CIFAR_STD = (0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010)
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class ViewSpec:
    """The distribution of one random view; the fields are the torchvision ops' arguments."""

    size: int
    scale: tuple[float, float] = (0.08, 1.0)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    flip_p: float = 0.5
    jitter: tuple[float, float, float, float] = (0.4, 0.4, 0.4, 0.1)  # brightness, contrast, saturation, hue
    jitter_p: float = 0.8
    gray_p: float = 0.2
    gray_before_jitter: bool = False  # MoCo v1 converts to grayscale first, then jitters
    blur_p: float = 0.0
    blur_sigma: tuple[float, float] = (0.1, 2.0)
    blur_kernel: int = 3
    solarize_p: float = 0.0  # PIL's solarize: every channel value >= 128 (of 255) inverted
    mean: tuple[float, float, float] = CIFAR_MEAN
    std: tuple[float, float, float] = CIFAR_STD


def blur_kernel(size: int) -> int:
    """MoCo v2's blur kernel: odd, about 10% of the image side, at least 3 taps."""
    return max(3, int(0.1 * size) // 2 * 2 + 1)


RECIPES = Registry("data.augmentation", "view recipe")


def register_recipe(name: str, build: Callable[[int], ViewSpec | tuple[ViewSpec, ViewSpec]] | None = None, *,
                    replace: bool = False):
    """Register ``build(size) -> ViewSpec`` under ``name`` (``data.augmentation=<name>``); a
    decorator without ``build``. Both input paths draw the views it states. A recipe whose two
    views differ returns a pair: (the first view's spec, the second's)."""
    return RECIPES.add(name, build, lambda fn: fn, replace)


register_recipe("cifar", lambda size: ViewSpec(size))
register_recipe("cifar_light", lambda size: ViewSpec(size, scale=(0.35, 1.0), jitter_p=0.4, gray_p=0.1))
register_recipe("moco_v1", lambda size: ViewSpec(size, scale=(0.2, 1.0), jitter=(0.4, 0.4, 0.4, 0.4), jitter_p=1.0,
                                                 gray_before_jitter=True, mean=IMAGENET_MEAN, std=IMAGENET_STD))
register_recipe("moco_v2", lambda size: ViewSpec(size, scale=(0.2, 1.0), blur_p=0.5, blur_kernel=blur_kernel(size),
                                                 mean=IMAGENET_MEAN, std=IMAGENET_STD))


@register_recipe("moco_v3")
def moco_v3(size: int) -> tuple[ViewSpec, ViewSpec]:
    """MoCo v3's two views (main_moco.py's augmentation1 and augmentation2): crops of 8-100%
    (``data.crop_min`` 0.2 for its ResNets), jitter (0.4, 0.4, 0.2, 0.1) with p 0.8, grayscale
    0.2, flip; Gaussian blur σ ∈ [0.1, 2] with p 1.0 on the first view and 0.1 on the second;
    solarize with p 0.2 on the second only."""
    first = ViewSpec(size, scale=(0.08, 1.0), jitter=(0.4, 0.4, 0.2, 0.1), blur_p=1.0, blur_kernel=blur_kernel(size),
                     mean=IMAGENET_MEAN, std=IMAGENET_STD)
    return first, replace(first, blur_p=0.1, solarize_p=0.2)


@register_recipe("moco_v3_cifar")
def moco_v3_cifar(size: int) -> tuple[ViewSpec, ViewSpec]:
    """solo-learn's views for MoCo v3 on CIFAR (its ``asymmetric.yaml``): ``moco_v3``'s crops,
    jitter, grayscale and flip; no blur (a 32 px image has little to blur); solarize with p 0.2 on
    the second view only; normalised by solo-learn's CIFAR-10 statistics."""
    first = ViewSpec(size, scale=(0.08, 1.0), jitter=(0.4, 0.4, 0.2, 0.1), std=(0.247, 0.243, 0.261))
    return first, replace(first, solarize_p=0.2)


def view_specs(preset: str, size: int, crop_min: float = 0.0) -> tuple[ViewSpec, ViewSpec]:
    """The specs of the two views of a ``data.augmentation`` recipe at crop size ``size`` (the
    same one twice for a symmetric recipe); ``crop_min`` > 0 replaces the crops' smallest scale."""
    built = RECIPES[preset](size)
    pair = built if isinstance(built, tuple) else (built, built)
    return tuple(replace(s, scale=(crop_min, s.scale[1])) if crop_min > 0 else s for s in pair)


def view_spec(preset: str, size: int) -> ViewSpec:
    """The :class:`ViewSpec` of a recipe's first view (its normalisation is both views')."""
    return view_specs(preset, size)[0]


def eval_resize(size: int) -> int:
    """The evaluation view's short side before the centre crop of ``size``: small images
    (CIFAR) are used whole; large ones get ImageNet's resize-256-crop-224 ratio."""
    return size if size <= 64 else size * 256 // 224


def view_transform(preset: str, size: int, spec: ViewSpec | None = None) -> Callable:
    """One random view of a PIL image, as torchvision ops built from :func:`view_spec` (or ``spec``).

    The order is crop, flip, the colour ops, blur, solarize. torchvision's recipes put the flip
    elsewhere for the ImageNet presets; the flip commutes with every colour op, the blur and the
    solarize, so the distribution of views is the same.
    """
    spec = spec or view_spec(preset, size)
    jitter = T.ColorJitter(*spec.jitter)
    gray = T.RandomGrayscale(p=spec.gray_p)
    ops: list[Callable] = [T.RandomResizedCrop(size, scale=spec.scale, ratio=spec.ratio),
                           T.RandomHorizontalFlip(spec.flip_p)]
    if spec.gray_before_jitter:
        ops.append(gray)
    ops.append(jitter if spec.jitter_p >= 1 else T.RandomApply([jitter], p=spec.jitter_p))
    if not spec.gray_before_jitter:
        ops.append(gray)
    if spec.blur_p > 0:
        blur = T.GaussianBlur(spec.blur_kernel, sigma=spec.blur_sigma)
        ops.append(blur if spec.blur_p >= 1 else T.RandomApply([blur], p=spec.blur_p))
    if spec.solarize_p > 0:
        ops.append(T.RandomSolarize(threshold=128, p=spec.solarize_p))
    return T.Compose([*ops, T.ToTensor(), T.Normalize(spec.mean, spec.std)])


def view_transforms(preset: str, size: int, crop_min: float = 0.0) -> tuple[Callable, Callable]:
    """The two views' transforms of a recipe (:func:`view_specs`)."""
    return tuple(view_transform(preset, size, spec) for spec in view_specs(preset, size, crop_min))


def eval_transform(preset: str, size: int) -> Callable:
    """The deterministic view of a PIL image used for kNN and linear evaluation."""
    spec = view_spec(preset, size)
    return T.Compose([T.Resize(eval_resize(size)), T.CenterCrop(size), T.ToTensor(), T.Normalize(spec.mean, spec.std)])


def probe_transform(preset: str, size: int) -> Callable:
    """The linear probe's training augmentation: MoCo's RandomResizedCrop and flip for large
    images; for small ones (CIFAR) the usual 4-pixel-padded random crop and flip."""
    spec = view_spec(preset, size)
    crop = T.RandomCrop(size, padding=size // 8) if size <= 64 else T.RandomResizedCrop(size)
    return T.Compose([crop, T.RandomHorizontalFlip(), T.ToTensor(), T.Normalize(spec.mean, spec.std)])
