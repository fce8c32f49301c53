"""The image sources of ``data.name``: the embedded CIFAR-10 sample, CIFAR-10, image folders and
archives, synthetic images. Their items are images (``sets.py``), viewed through the
``data.augmentation`` recipe (``recipes.py``) on either input path."""

from __future__ import annotations

from pathlib import Path

from moco_engine.config.schema import DataConfig
from moco_engine.data.errors import DataError
from moco_engine.data.images.sets import (
    EMBEDDED_ARCHIVE,
    ArrayImages,
    FolderImages,
    ImageSet,
    read_archive,
    synthetic_images,
)
from moco_engine.data.items import Splits
from moco_engine.data.sources import register_data_source

#: What every image source reads: its views are a recipe at a crop size, on either input path.
IMAGE_SETTINGS = ("data.augmentation", "data.image_size", "data.pipeline", "data.crop_min")



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
