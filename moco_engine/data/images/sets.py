"""Image sets: where the images come from and how bad ones are treated.

The image sources of ``data.name`` (registered in ``sources.py``) read them:
- ``embedded``: a CIFAR-10 sample (4,000 train / 1,000 test JPEGs) shipped inside the package,
  so a fresh install can pretrain on real images with no network and no data folder.
- ``cifar10``: torchvision's CIFAR10 under ``data.root`` (downloads only if ``data.download``).
- ``imagefolder``: ``<root>/<split>/<class>/<image>``, where ``root`` is a folder (images read
  lazily) or a ``.tar``/``.tar.gz``/``.tar.xz`` archive (decoded into memory once: meant for
  small images such as the CIFAR-10 tarballs in ``../shared/data``).
- ``synthetic``: procedural images with class structure, generated from a seed (tests).

How a CPU loader draws from them (indices, views, epochs, workers) is ``sampling.py``'s.
"""

from __future__ import annotations

import io
import sys
import tarfile
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
from PIL import Image

from moco_engine.data.errors import DataError
from moco_engine.data.items import ItemSet

EMBEDDED_ARCHIVE = Path(__file__).parents[2] / "assets" / "cifar10_sample.tar.xz"
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".ppm", ".tif", ".tiff")


# A decompression bomb (more pixels than PIL.Image.MAX_IMAGE_PIXELS: PIL warns, past twice that
# it raises) is a bad image like an unreadable one.
BAD_IMAGE = (OSError, Image.DecompressionBombError, Image.DecompressionBombWarning)


def decode(source) -> Image.Image:
    """An RGB image from a path or a file object; raises one of :data:`BAD_IMAGE` if bad."""
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        with Image.open(source) as img:
            return img.convert("RGB")


# ---------------------------------------------------------------------------------------------
# Image sets: N images with class targets, decoded on demand.
# ---------------------------------------------------------------------------------------------
class ImageSet(ItemSet):
    """N RGB images and their class targets; ``load(i)`` returns image i as a PIL image."""

    def load(self, i: int) -> Image.Image:
        raise NotImplementedError


class ArrayImages(ImageSet):
    """Images held in memory as uint8 arrays (H, W, 3): CIFAR-10, archives, synthetic data."""

    def __init__(self, images: np.ndarray | list[np.ndarray], targets: Sequence[int], classes: list[str]):
        if len(images) == 0:
            raise ValueError("no images")
        self.images = images
        self.targets = [int(t) for t in targets]
        self.classes = classes

    def load(self, i: int) -> Image.Image:
        return Image.fromarray(self.images[i])


class FolderImages(ImageSet):
    """``<folder>/<class>/<image>`` read lazily from disk (any size, e.g. ImageNet).

    An unreadable image is found only when it is read: with ``on_bad="fail"`` that stops the run
    naming the file; with ``"skip"`` the next readable image stands in for it and the file is
    reported once (one line per bad file, from whichever process met it).
    """

    def __init__(self, folder: Path, on_bad: str = "fail"):
        self.on_bad = on_bad
        self.bad: set[str] = set()
        self.classes = sorted(d.name for d in folder.iterdir() if d.is_dir())
        self.paths: list[Path] = []
        self.targets = []
        for target, name in enumerate(self.classes):
            files = sorted(p for p in (folder / name).rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS)
            self.paths += files
            self.targets += [target] * len(files)
        if not self.paths:
            raise DataError(f"no images found in {folder} (expected <class>/<image> sub-folders)")

    def load(self, i: int) -> Image.Image:
        return first_readable(i, len(self.paths), lambda j: decode(self.paths[j]), self.skip,
                              f"the 100 files from {self.paths[i]} on")

    def skip(self, i: int, error: Exception) -> None:
        skip_bad(str(self.paths[i]), error, self.on_bad, self.bad)


def skip_bad(name: str, error: Exception, on_bad: str, seen: set) -> None:
    """An unreadable image ``name`` met by a lazy set: with ``on_bad="fail"`` the run stops
    naming it; with ``"skip"`` it is reported once (``seen``: the names reported so far)."""
    if on_bad == "fail":
        raise DataError(f"cannot read image {name}: {error} (data.on_bad_image=skip leaves such files out)") from None
    if name not in seen:
        seen.add(name)
        print(f"warning: skipping unreadable image {name}: {error}", file=sys.stderr, flush=True)


def first_readable(i: int, n: int, read: Callable[[int], Image.Image], skip: Callable[[int, Exception], None],
                   where: str) -> Image.Image:
    """Item ``i`` decoded, or under skipping the first readable one of the (at most 100) after it:
    ``read(j)`` decodes item j (raising one of :data:`BAD_IMAGE`), ``skip(j, error)`` counts it or
    stops the run. A stand-in keeps the epoch's length, so the sampler's order is unchanged."""
    for offset in range(min(n, 100)):
        j = (i + offset) % n
        try:
            return read(j)
        except BAD_IMAGE as e:
            skip(j, e)
    raise DataError(f"no readable image among {where}")


def read_archive(path: Path, split: str, on_bad: str = "fail") -> ArrayImages:
    """Decode every ``<split>/<class>/<image>`` member of a tar archive into memory.

    An image that does not decode stops with an error naming it (``on_bad="fail"``), or is left
    out, counted and reported in one warning line (``"skip"``).
    """
    by_class: dict[str, list[tuple[str, np.ndarray]]] = {}
    skipped: list[str] = []
    try:
        with tarfile.open(path, "r:*") as tar:
            for member in tar:
                parts = Path(member.name).parts
                parts = parts[1:] if parts and parts[0] == "." else parts
                if not member.isfile() or len(parts) != 3 or parts[0] != split:
                    continue
                if Path(parts[2]).suffix.lower() not in IMAGE_EXTENSIONS:
                    continue
                raw = tar.extractfile(member).read()
                try:
                    array = np.asarray(decode(io.BytesIO(raw)))
                except BAD_IMAGE as e:
                    if on_bad == "skip":
                        skipped.append(member.name)
                        continue
                    raise DataError(
                        f"cannot decode image {member.name} in {path}: {e} (data.on_bad_image=skip leaves such files out)"
                    ) from None
                by_class.setdefault(parts[1], []).append((parts[2], array))
    except (tarfile.TarError, EOFError, OSError, ValueError) as e:
        raise DataError(f"cannot read archive {path}: {e}") from None
    if skipped:
        print(f"warning: skipped {len(skipped)} unreadable image(s) in {path} (first: {skipped[0]})",
              file=sys.stderr, flush=True)
    if not by_class:
        raise DataError(f"no images under '{split}/<class>/' in archive {path}")
    classes = sorted(by_class)
    images, targets = [], []
    for target, name in enumerate(classes):
        for _, array in sorted(by_class[name], key=lambda item: item[0]):
            images.append(array)
            targets.append(target)
    if len({a.shape for a in images}) == 1:
        images = np.stack(images)  # one block of memory: cheap to share with loader workers
    return ArrayImages(images, targets, classes)


def synthetic_images(n: int, num_classes: int, size: int, seed: int) -> ArrayImages:
    """Procedural images with class and instance structure, identical for the same arguments.

    Each class has a fixed coarse colour layout (its prototype, drawn from a fixed seed so train
    and test sets share them) and each item a coarse layout of its own; an item is the mean of
    the two, rolled by a random offset, plus noise. The class part makes kNN meaningful, the
    item part makes instance discrimination learnable within a few steps.
    """
    cells = 4
    blocks = np.ones((size // cells + 1, size // cells + 1, 1))

    def upsample(grids: np.ndarray) -> np.ndarray:  # (M, cells, cells, 3) -> (M, size, size, 3)
        return np.stack([np.kron(g, blocks)[:size, :size] for g in grids])

    prototypes = upsample(np.random.default_rng(12345).uniform(0, 255, size=(num_classes, cells, cells, 3)))
    rng = np.random.default_rng(seed)
    targets = rng.integers(0, num_classes, size=n)
    own = upsample(rng.uniform(0, 255, size=(n, cells, cells, 3)))
    shifts = rng.integers(-size // 8, size // 8 + 1, size=(n, 2))
    images = np.stack([np.roll((prototypes[t] + o) / 2, tuple(s), axis=(0, 1)) for t, o, s in zip(targets, own, shifts)])
    images = images + rng.normal(0, 10, size=images.shape)
    classes = [f"class{c}" for c in range(num_classes)]
    return ArrayImages(np.clip(images, 0, 255).astype(np.uint8), targets.tolist(), classes)


