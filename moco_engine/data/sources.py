"""Data sources: a registry from ``data.name`` to a builder of the train and test splits.

A builder takes the data settings and the run's seed and returns :class:`~moco_engine.data.items.Splits`::

    @register_data_source("points")             # moco_engine.register_data_source
    def points(cfg: DataConfig, seed: int) -> Splits:
        x = torch.randn(1000, 8, generator=torch.Generator().manual_seed(seed))
        noisy = lambda v: v + 0.1 * torch.randn_like(v)
        return Splits(TensorItems(x), None, view=noisy, plain=lambda v: v)

Image sources return image sets and no view: their views are the ``data.augmentation`` recipe
(``recipes.py``), on either input path. Others return their own ``view`` and ``plain``, and
train on the CPU path. ``reads`` names the ``data.*`` settings a source honours among those
other sources read (a changed one the chosen source ignores draws a warning); ``in_memory``
marks the sources whose size is known to fit the device path (``data.pipeline=auto``);
``params`` declares options the schema lacks (``data.params.<name>``, read from ``cfg.params``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from moco_engine.config.registry import Registry
from moco_engine.config.schema import DataConfig
from moco_engine.data.images import (
    EMBEDDED_ARCHIVE,
    ArrayImages,
    DataError,
    FolderImages,
    ImageSet,
    read_archive,
    synthetic_images,
)
from moco_engine.data.items import Splits


@dataclass(frozen=True)
class SourceEntry:
    """A registered data source: ``build(cfg.data, seed) -> Splits``, the settings it reads,
    the defaults of its options the schema lacks (``data.params.<name>``), and whether its size
    is known to fit the device path."""

    build: Callable[[DataConfig, int], Splits]
    reads: tuple[str, ...] = ()
    in_memory: bool = False
    params: dict[str, Any] = field(default_factory=dict)


SOURCES = Registry("data.name", "data source")

#: What every image source reads: its views are a recipe at a crop size, on either input path.
IMAGE_SETTINGS = ("data.augmentation", "data.image_size", "data.pipeline", "data.crop_min")


def register_data_source(name: str, build: Callable | None = None, *, reads: tuple[str, ...] = (),
                         in_memory: bool = False, params: dict[str, Any] | None = None, replace: bool = False):
    """Register ``build(cfg.data, seed) -> Splits`` under ``name``; a decorator without ``build``."""
    return SOURCES.add(name, build, lambda fn: SourceEntry(fn, tuple(reads), in_memory, dict(params or {})), replace)


def build_splits(cfg: DataConfig, seed: int = 0) -> Splits:
    """Open the data source ``cfg.name`` names.

    Raises:
        ConfigError: no such source (the message lists the registered ones).
        DataError: a missing path, an empty folder, or a folder with no images.
    """
    return SOURCES[cfg.name].build(cfg, seed)


# ============================================================================ the image sources
@register_data_source("embedded", reads=IMAGE_SETTINGS, in_memory=True)  # 12 MB decoded
def embedded(cfg: DataConfig, seed: int) -> Splits:
    return Splits(read_archive(EMBEDDED_ARCHIVE, "train"), read_archive(EMBEDDED_ARCHIVE, "test"))


@register_data_source("cifar10", reads=(*IMAGE_SETTINGS, "data.root", "data.download"), in_memory=True)  # 150 MB
def cifar10(cfg: DataConfig, seed: int) -> Splits:
    return Splits(cifar10_split(cfg, True), cifar10_split(cfg, False))


@register_data_source("imagefolder", reads=(*IMAGE_SETTINGS, "data.root", "data.test_root", "data.train_split",
                                             "data.test_split", "data.on_bad_image"))
def imagefolder(cfg: DataConfig, seed: int) -> Splits:
    train = imagefolder_split(cfg.root, cfg.train_split, cfg.on_bad_image)
    test = imagefolder_split(cfg.test_root or cfg.root, cfg.test_split, cfg.on_bad_image) if cfg.test_split else None
    if test is not None:
        match_classes(train, test)
    return Splits(train, test)


@register_data_source("synthetic", reads=(*IMAGE_SETTINGS, "data.synthetic_size", "data.synthetic_classes"))
def synthetic(cfg: DataConfig, seed: int) -> Splits:
    """Procedural images drawn per item (nothing to decode: the CPU path under "auto")."""
    n = cfg.synthetic_size
    return Splits(
        synthetic_images(n, cfg.synthetic_classes, cfg.image_size, seed=seed + 1),
        synthetic_images(max(n // 4, cfg.synthetic_classes), cfg.synthetic_classes, cfg.image_size, seed=seed + 2),
    )


def is_archive(path: Path) -> bool:
    return path.is_file() and any(path.name.endswith(s) for s in (".tar", ".tar.gz", ".tgz", ".tar.xz"))


def imagefolder_split(root: str, split: str, on_bad: str = "fail") -> ImageSet:
    path = Path(root).expanduser()
    if not path.exists():
        raise DataError(f"data path not found: {path}")
    if is_archive(path):
        return read_archive(path, split, on_bad)
    if not path.is_dir():
        raise DataError(f"data path is neither a folder nor a .tar/.tar.gz/.tar.xz archive: {path}")
    folder = path / split if split else path
    if not folder.is_dir():
        raise DataError(f"data folder {path} has no '{split}' sub-folder")
    return FolderImages(folder, on_bad)


def cifar10_split(cfg: DataConfig, train: bool) -> ImageSet:
    from torchvision.datasets import CIFAR10

    root = Path(cfg.root).expanduser()
    if not root.exists() and not cfg.download:
        raise DataError(f"data path not found: {root} (set data.download=true to fetch CIFAR-10)")
    try:
        ds = CIFAR10(str(root), train=train, download=cfg.download)
    except RuntimeError as e:
        raise DataError(f"no CIFAR-10 in {root}: {e}") from None
    return ArrayImages(ds.data, ds.targets, list(ds.classes))


def match_classes(train: ImageSet, test: ImageSet) -> None:
    """Give the test split train's class indices, matched by class name: a test split that
    lacks some of train's classes would otherwise shift every label after the gap.

    Raises:
        DataError: a test class that train does not have (kNN could never predict it).
    """
    index = {name: i for i, name in enumerate(train.classes)}
    foreign = [name for name in test.classes if name not in index]
    if foreign:
        raise DataError(f"the test split has class(es) the train split lacks: {', '.join(foreign[:5])}"
                        f"{' ...' if len(foreign) > 5 else ''} (train has {len(train.classes)} classes)")
    test.targets = [index[test.classes[t]] for t in test.targets]
    test.classes = list(train.classes)
