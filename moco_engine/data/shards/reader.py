"""Image sets in WebDataset tar shards (``data.name=shards``), read through ``wids``.

``data.root`` is a folder ``moco-shard`` wrote (``manifest.json``; ``<split>/shard-NNNNNN.tar``,
``data.train_split`` and ``data.test_split`` pick the splits) or a ``.txt`` listing shard paths
(relative to the list's folder) or URLs, one a line: the train split, unlabelled unless its
samples carry a ``.cls``.

Why ``wids`` (WebDataset's indexed reader): it gives the shards as a map-style data set, item i
at a fixed place, fetching and caching remote shards and memory-mapping local ones
(``wids_cache.py``, the one module that touches wids). The engine's
own :class:`~moco_engine.data.sampling.EpochSampler` then orders every epoch as for any other
source: each rank reads a disjoint part, the order does not depend on the loader processes, a
resume goes on mid-epoch exactly, and the memory bank and the kNN monitor see stable indices.
(Streaming readers that iterate shards own the order and make the same harder.)

An unreadable image is skipped with ``data.on_bad_image=skip`` (the next item stands in, one
line per item, counted); past ``data.max_bad_images`` of the items a process has read, the run
stops. Shards are checked when opened: a missing one, or one whose size is not the manifest's
(truncated), is one line. A checkpoint keeps the shards' fingerprint; a resume onto rewritten
shards is refused, naming the first that changed.
"""

from __future__ import annotations

import io
import json
import sys
import tarfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from moco_engine.config.schema import DataConfig
from moco_engine.data.errors import DataError
from moco_engine.data.images.sets import IMAGE_EXTENSIONS, ImageSet, decode, first_readable
from moco_engine.data.pairs.read import caption_lines
from moco_engine.data.shards.wids_cache import OpenShards, fetch, open_shard

MANIFEST = "manifest.json"
MANIFEST_FORMAT = "moco-shard/1"
EXTENSIONS = IMAGE_EXTENSIONS  # a wids sample's keys: ".jpg", ".cls", "__key__", ...


def shard_name(k: int) -> str:
    return f"shard-{k:06d}.tar"


def read_manifest(folder: Path) -> dict[str, Any]:
    path = folder / MANIFEST
    try:
        manifest = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DataError(f"{path}: not a moco-shard manifest ({e})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != MANIFEST_FORMAT:
        raise DataError(f"{path}: not a moco-shard manifest (format {manifest.get('format')!r}, "
                        f"expected {MANIFEST_FORMAT!r})" if isinstance(manifest, dict) else f"{path}: not a moco-shard manifest")
    return manifest


class ShardImages(ImageSet):
    """N images in tar shards: ``load(i)`` is item i as a PIL image, ``load_encoded(i)`` its
    bytes as a uint8 tensor (decoded on the training device: ``shards/decode.py``).

    Args:
        shards: per shard ``{"url": path or URL, "nsamples": items}``, in item order.
        targets, classes: the items' class indices and the class names (empty: unlabelled).
        on_bad: ``fail`` or ``skip`` (``data.on_bad_image``).
        max_bad: the share of the items read past which skipped ones stop the run.
        captions: each item's captions (its sample's ``.txt``), or None: the shards have none.
    """

    def __init__(self, shards: list[dict[str, Any]], targets: list[int], classes: list[str], on_bad: str = "fail",
                 max_bad: float = 0.01, captions: list[tuple[str, ...]] | None = None):
        self.shards, self.targets, self.classes, self.captions = shards, targets, classes, captions
        self.on_bad, self.max_bad = on_bad, max_bad
        self.reads = 0
        self.bad: set[int] = set()
        self.dataset = None  # opened in the process that reads (each loader worker its own)

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "dataset": None}  # open files and memory maps stay in their process

    def open(self) -> OpenShards:
        """The shards by item: item i -> (shard, place in it), the open shards in an LRU."""
        if self.dataset is None:
            self.dataset = OpenShards(self.shards, LRU_SHARDS)
        return self.dataset

    def sample_bytes(self, i: int) -> bytes:
        sample = self.open()[i]
        for ext in EXTENSIONS:
            if ext in sample:
                return sample[ext].getvalue()  # wids gives each member as a BytesIO
        raise DataError(f"shard {sample['__shard__']}: item {sample['__key__']} has no image "
                        f"(members: {', '.join(k for k in sample if not k.startswith('__'))})")

    def load_encoded(self, i: int) -> torch.Tensor:
        return torch.frombuffer(bytearray(self.sample_bytes(i)), dtype=torch.uint8)

    def load(self, i: int) -> Image.Image:
        return first_readable(i, len(self.targets), self.decode_item, self.skip, f"the 100 items from {i} on")

    def decode_item(self, i: int) -> Image.Image:
        data = self.sample_bytes(i)
        self.reads += 1
        return decode(io.BytesIO(data))

    def skip(self, i: int, error: Exception | str) -> None:
        """Count item ``i`` as unreadable; stop when skipping is off or past the share allowed."""
        where = f"item {i} of {self.shards[int(np.searchsorted(self.offsets, i, side='right'))]['url']}"
        if self.on_bad == "fail":
            raise DataError(f"cannot read image {where}: {error} (data.on_bad_image=skip leaves such images out)")
        if i not in self.bad:
            self.bad.add(i)
            print(f"warning: skipping unreadable image {where}: {error}", file=sys.stderr, flush=True)
        if len(self.bad) > max(1.0, self.max_bad * self.reads):
            raise DataError(f"{len(self.bad)} unreadable images among {self.reads} read, more than "
                            f"data.max_bad_images = {self.max_bad} of them: the shards are damaged")

    @property
    def offsets(self) -> np.ndarray:
        return np.cumsum([s["nsamples"] for s in self.shards])


LRU_SHARDS = 16  # shards a process keeps open (memory-mapped)


def check_local(shards: list[dict[str, Any]], where: str) -> None:
    """One line for a local shard that is missing, or whose size is not the manifest's."""
    for shard in shards:
        if "://" in shard["url"]:
            continue
        path = Path(shard["url"])
        if not path.is_file():
            raise DataError(f"{where}: shard {path} is missing")
        size = path.stat().st_size
        if "filesize" in shard and size != shard["filesize"]:
            raise DataError(f"{where}: shard {path} has {size} bytes, the manifest {shard['filesize']}: "
                            "it was truncated or rewritten (run moco-shard again to finish it)")


def manifest_split(root: Path, manifest: dict[str, Any], split: str, cfg: DataConfig) -> ShardImages:
    entry = manifest["splits"].get(split)
    if entry is None:
        raise DataError(f"{root / MANIFEST}: no split '{split}' (it has {', '.join(manifest['splits'])})")
    done = sum(s["nsamples"] for s in entry["shards"])
    if done != entry["items"]:
        raise DataError(f"{root / split}: {done} of {entry['items']} images are in shards: moco-shard did not "
                        f"finish (run it again with the same source to finish)")
    shards = [{"url": str(root / split / s["name"]), "label": f"{split}/{s['name']}", "nsamples": s["nsamples"],
               "filesize": s["filesize"], "sha256": s["sha256"]} for s in entry["shards"]]
    check_local(shards, str(root / MANIFEST))
    targets = np.load(root / split / "targets.npy").tolist()
    captions = None
    if manifest.get("captions"):
        captions = shard_captions(shards, str(root / split))
        if captions is None:
            raise DataError(f"{root / split}: no sample has a .txt, and {root / MANIFEST} says its shards carry "
                            "captions: they were rewritten (run moco-shard again)")
    return ShardImages(shards, targets, list(manifest["classes"]), cfg.on_bad_image, cfg.max_bad_images, captions)


def listed_split(path: Path, cfg: DataConfig) -> ShardImages:
    """The shards a ``.txt`` lists (paths, or URLs fetched into the cache once): counted, and their
    classes read, from the shards themselves."""
    lines = [(n, line.strip()) for n, line in enumerate(path.read_text().splitlines(), 1) if line.strip()]
    if not lines:
        raise DataError(f"{path}: lists no shards")
    urls = [u if "://" in u else str((path.parent / u).resolve()) for _, u in lines]
    for (n, _), url in zip(lines, urls):
        if "://" not in url and not Path(url).is_file():
            raise DataError(f"{path}, line {n}: shard {url} is missing")
    counts, targets = [], []
    for (n, _), url in zip(lines, urls):
        try:
            shard = open_shard(url)
        except Exception as e:  # a failed fetch, a truncated or foreign tar (wids asserts on its index)
            raise DataError(f"{path}, line {n}: shard {url} cannot be read as a tar of samples ({e or type(e).__name__})") from None
        counts.append(len(shard))
        targets += [int(s[".cls"].getvalue()) if ".cls" in s else -1 for s in (shard[i] for i in range(len(shard)))]
        shard.close()
    if not targets:
        raise DataError(f"{path}: its {len(urls)} shard(s) hold no samples")
    labelled = all(t >= 0 for t in targets)
    classes = [str(c) for c in range(max(targets) + 1)] if labelled else []
    shards = [{"url": u, "nsamples": c, **({} if "://" in u else {"bytes": Path(u).stat().st_size})}
              for u, c in zip(urls, counts)]
    return ShardImages(shards, targets if labelled else [-1] * len(targets), classes, cfg.on_bad_image,
                       cfg.max_bad_images, shard_captions(shards, str(path)))


# ============================================================================ captions
def sample_key(name: str) -> tuple[str, str] | None:
    """(sample key, extension) of a tar member as WebDataset groups members into samples: the
    key is the path up to the first dot of the base name (``a/000001.seg.png``: ``a/000001``,
    ``.seg.png``); None for a name without one."""
    folder, slash, base = name.rpartition("/")
    stem, dot, ext = base.partition(".")
    return (folder + slash + stem, dot + ext) if dot else None


def sample_texts(path: str) -> list[tuple[str, bytes | None]]:
    """(key, its ``.txt`` bytes or None) of each sample of a local shard, in order: the tar's
    headers and its ``.txt`` members are read, the other members skipped over."""
    samples: list[list[Any]] = []
    with tarfile.open(path) as tar:
        for member in tar:
            found = sample_key(member.name) if member.isfile() else None
            if found is None:
                continue
            if not samples or samples[-1][0] != found[0]:  # consecutive members of one key: one sample
                samples.append([found[0], None])
            if found[1] == ".txt":
                samples[-1][1] = tar.extractfile(member).read()
    return [(key, data) for key, data in samples]


def shard_captions(shards: list[dict[str, Any]], where: str) -> list[tuple[str, ...]] | None:
    """Each item's captions, from its sample's ``.txt`` (one caption a line), or None when no
    sample has a ``.txt``.

    Raises:
        DataError: some samples have a ``.txt`` and some have none (both named); an empty or
            undecodable one; a shard whose samples wids counts otherwise (named).
    """
    captions: list[tuple[str, ...] | None] = []
    having: dict[bool, str] = {}  # with a .txt or without: the first such sample
    for shard in shards:
        url = shard["url"]
        label = shard.get("label", url)
        try:
            samples = sample_texts(fetch(url) if "://" in url else url)
        except (tarfile.TarError, OSError) as e:
            raise DataError(f"{where}: shard {label} cannot be read as a tar of samples ({e})") from None
        if len(samples) != shard["nsamples"]:
            raise DataError(f"{where}: shard {label} holds {len(samples)} samples by their keys, not {shard['nsamples']}")
        for key, data in samples:
            having.setdefault(data is not None, f"sample {key} of shard {label}")
            if len(having) == 2:
                raise DataError(f"{where}: {having[True]} has a .txt of captions and {having[False]} has none: "
                                "the samples have captions all or none")
            captions.append(None if data is None else caption_lines(data, f"{where}: sample {key} of shard {label}"))
    return captions if having.get(True) else None
