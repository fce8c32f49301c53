"""An image set, or image–caption pairs, written as WebDataset tar shards that ``data.name=shards``
reads (``moco-shard SRC OUT``, ``tools/shard.py``, is its command line).

SRC is an ImageFolder tree (``<split>/<class>/<image>``) or a ``.tar``, ``.tar.gz`` or ``.tar.xz``
archive of one (in one top folder or not); or pairs in the first two layouts of
``data/pairs/read.py``: a Karpathy-split JSON folder or archive (told from an ImageFolder by the
``*.json`` at its top), or a ``.csv``/``.tsv`` of image paths and captions (its columns
``keys``: ``data.pairs``'s; without a split column, every row in split ``split``). Each split
becomes ``OUT/<split>/``:

    shard-000000.tar ...   WebDataset's layout (``webdataset.TarWriter``): per item ``<key>.<ext>``,
                           the image's own bytes (never re-encoded), and ``<key>.cls``, its class
                           index, or for pairs ``<key>.txt``, all of the image's captions, one a
                           line (``pairs.read.caption_text``); the key is the item's index in the
                           split, 9 digits
    index.json             the shard list as ``wids`` reads it (``wids-shard-index-v1``)
    targets.npy            every item's class index, int32, in item order (-1: pairs, unlabelled)

and ``OUT/manifest.json`` records the source (path and SHA-256: of the archive's bytes, or of a
folder's sorted file list with sizes; for pairs of the JSON or table and its images' sizes, the
keys included), the classes (none for pairs, whose manifest says ``"captions": true``), and per
split the items and every finished shard (name, items, bytes, SHA-256). Items are in a fixed
order: a folder's sorted by class and name, an archive's in archive order, pairs in their
file's order. Shard k holds items [k·S, (k+1)·S) for ``--shard-size`` S, and is written under a
temporary name and renamed when whole; the manifest is rewritten after each. So a stopped run,
rerun on the same source, writes only the shards that are missing; into a folder written from
another source it refuses, naming both.
"""

from __future__ import annotations

import hashlib
import json
import os
import tarfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from moco_engine.config.schema import PairsDataConfig, UserError
from moco_engine.data.images.sets import IMAGE_EXTENSIONS
from moco_engine.data.pairs.read import TABLE_SUFFIXES, caption_text, read_pairs
from moco_engine.data.shards.reader import MANIFEST, MANIFEST_FORMAT, read_manifest, shard_name
from moco_engine.data.text.corpus import Files


class Item(NamedTuple):
    """An item to write: its name in the source, its class index (-1: none), its captions (None: none)."""

    name: str
    target: int
    captions: tuple[str, ...] | None


@dataclass
class Listing:
    """What moco-shard writes from a source, whatever its layout.

    Attributes:
        splits: per split its items, in item order.
        classes: the class names (none: pairs).
        digest: the source's SHA-256 (a rerun into the same folder checks it).
        read: the bytes of the items ``wanted`` (name -> index in its split), in any order.
        captions: the items have captions (pairs).
    """

    splits: dict[str, list[Item]]
    classes: list[str]
    digest: str
    read: Callable[[dict[str, int]], Iterator[tuple[str, bytes]]]
    captions: bool = False


def file_hash(path: Path, digest: Any) -> Any:
    """``digest`` updated with the bytes of the file ``path``."""
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest


def source_hash(src: Path, listing: dict[str, list[tuple[str, str]]]) -> str:
    """SHA-256 of an archive's bytes, or of a folder's sorted (path, size) list."""
    digest = hashlib.sha256()
    if src.is_file():
        file_hash(src, digest)
    else:
        for split in sorted(listing):
            for path, _ in listing[split]:
                digest.update(f"{path}\t{(src / path).stat().st_size}\n".encode())
    return digest.hexdigest()


def split_parts(name: str) -> tuple[str, str] | None:
    """(split, class) of an archive member ``[top/]<split>/<class>/<image>``, or None."""
    parts = name.strip("/").split("/")
    if len(parts) < 3 or Path(name).suffix.lower() not in IMAGE_EXTENSIONS:
        return None
    return parts[-3], parts[-2]


def list_source(src: Path) -> dict[str, list[tuple[str, str]]]:
    """Per split, its images as (path in the source, class name), in item order."""
    listing: dict[str, list[tuple[str, str]]] = {}
    if src.is_file():
        with tarfile.open(src) as tar:  # one pass over the members' headers (a compressed one reads it all)
            for member in tar:
                found = split_parts(member.name) if member.isfile() else None
                if found:
                    listing.setdefault(found[0], []).append((member.name, found[1]))
    else:
        for split in sorted(d for d in src.iterdir() if d.is_dir()):
            for cls in sorted(d for d in split.iterdir() if d.is_dir()):
                for image in sorted(p for p in cls.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS):
                    listing.setdefault(split.name, []).append((str(image.relative_to(src)), cls.name))
    if not listing:
        raise UserError(f"{src}: no images in <split>/<class>/<image> layout")
    return listing


def image_bytes(src: Path, wanted: dict[str, int]) -> Iterator[tuple[str, bytes]]:
    """(path, bytes) of the ``wanted`` images (path -> item index), in item order."""
    if src.is_file():
        with tarfile.open(src) as tar:  # archive order is item order
            for member in tar:
                if member.name in wanted:
                    yield member.name, tar.extractfile(member).read()
    else:
        for path in wanted:
            yield path, (src / path).read_bytes()


def image_folder(src: Path) -> Listing:
    """An ImageFolder tree or archive's items: labelled images."""
    listing = list_source(src)
    classes = sorted({cls for items in listing.values() for _, cls in items})
    index = {name: i for i, name in enumerate(classes)}
    splits = {split: [Item(path, index[cls], None) for path, cls in items] for split, items in sorted(listing.items())}
    return Listing(splits, classes, source_hash(src, listing), lambda wanted: image_bytes(src, wanted))


def is_pairs(src: Path) -> bool:
    """Whether ``src`` holds image–caption pairs: a table, or a folder or archive with a JSON at
    its top (in its one top folder or not), where an ImageFolder has only folders."""
    if src.is_file() and src.suffix.lower() in TABLE_SUFFIXES:
        return True
    return any("/" not in name and name.endswith(".json") for name in Files(src).names)


def pairs_folder(src: Path, keys: PairsDataConfig, split: str) -> Listing:
    """Image–caption pairs' items (``pairs.read.read_pairs``): unlabelled images, each with all its
    captions. The digest is an archive's bytes', or the JSON's or table's with every image's path
    (relative to the source) and size, the table's keys and split included."""
    data = read_pairs(src, keys, split)
    images = {p.name: p.image for pairs in data.splits.values() for p in pairs}
    digest = hashlib.sha256(json.dumps(["pairs", keys.image_key, keys.caption_key, keys.split_key, split]).encode())
    tabled = src.suffix.lower() in TABLE_SUFFIXES
    if src.is_file() and not tabled:
        file_hash(src, digest)
    else:
        file_hash(Path(data.source), digest)  # the table, or the folder's JSON
        base = src.parent if tabled else src
        for name, image in images.items():
            digest.update(f"{os.path.relpath(name, base)}\t{image.stat().st_size}\n".encode())

    def read(wanted: dict[str, int]) -> Iterator[tuple[str, bytes]]:
        for name in wanted:
            image = images[name]
            yield name, image if isinstance(image, bytes) else image.read_bytes()

    splits = {s: [Item(p.name, -1, p.captions) for p in pairs] for s, pairs in sorted(data.splits.items())}
    return Listing(splits, [], digest.hexdigest(), read, captions=True)


def write_shard(path: Path, first: int, images: list[tuple[str, bytes]], items: list[Item]) -> dict[str, Any]:
    """Write one shard (under a temporary name, renamed when whole); its manifest entry.
    ``images``: the shard's (name, bytes), ``items`` those of its split."""
    from webdataset import TarWriter

    tmp = path.with_suffix(".tar.partial")
    with open(tmp, "wb") as stream:
        with TarWriter(stream, mtime=0, user="moco", group="moco", mode=0o644) as writer:
            for offset, (name, data) in enumerate(images):
                item = items[first + offset]
                ext = Path(name).suffix.lower().lstrip(".").replace("jpeg", "jpg")
                sample: dict[str, Any] = {"__key__": f"{first + offset:09d}", ext: data}
                if item.target >= 0:
                    sample["cls"] = item.target
                if item.captions is not None:
                    sample["txt"] = caption_text(item.captions)
                writer.write(sample)
        stream.flush()
        os.fsync(stream.fileno())
    os.replace(tmp, path)
    data = path.read_bytes()
    return {"name": path.name, "nsamples": len(images), "filesize": len(data), "sha256": hashlib.sha256(data).hexdigest()}


def write_json(path: Path, value: Any) -> None:
    """Write ``value`` as JSON, whole or not at all (a temporary file renamed)."""
    tmp = path.with_name(path.name + ".partial")
    tmp.write_text(json.dumps(value, indent=1) + "\n")
    os.replace(tmp, path)


def write_shards(src: Path, out: Path, shard_size: int, progress: bool = True, keys: PairsDataConfig | None = None,
                 split: str = "train") -> dict[str, Any]:
    """Write (or finish writing) ``out`` from ``src``; returns the manifest. ``keys`` and
    ``split``: a table of pairs' columns, and the split of its rows when it has no split column."""
    from tqdm import tqdm

    if not src.exists():
        raise UserError(f"moco-shard: source not found: {src}")
    source = pairs_folder(src, keys or PairsDataConfig(), split) if is_pairs(src) else image_folder(src)
    digest = source.digest
    manifest = read_manifest(out) if (out / MANIFEST).is_file() else None
    if manifest is not None and manifest["source_sha256"] != digest:
        raise UserError(f"moco-shard: {out} was written from {manifest['source']} (sha256 {manifest['source_sha256'][:12]}…), "
                        f"not from {src} (sha256 {digest[:12]}…): choose another output folder")
    if manifest is None or manifest["shard_size"] != shard_size:
        manifest = {"format": MANIFEST_FORMAT, "source": str(src.resolve()), "source_sha256": digest,
                    "shard_size": shard_size, "classes": source.classes, **({"captions": True} if source.captions else {}),
                    "splits": {s: {"items": len(items), "shards": []} for s, items in source.splits.items()}}
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / MANIFEST, manifest)
    total = sum(len(items) for items in source.splits.values())
    done = sum(sh["nsamples"] for split in manifest["splits"].values() for sh in split["shards"])
    bar = tqdm(total=total, initial=done, unit="img", desc=f"moco-shard {out}", disable=not progress)
    for split, items in source.splits.items():
        entry, folder = manifest["splits"][split], out / split
        folder.mkdir(exist_ok=True)
        np.save(folder / "targets.npy", np.array([item.target for item in items], dtype=np.int32))
        finished = {sh["name"] for sh in entry["shards"] if (folder / sh["name"]).is_file()
                    and (folder / sh["name"]).stat().st_size == sh["filesize"]}
        entry["shards"] = [sh for sh in entry["shards"] if sh["name"] in finished]
        todo = [k for k in range(-(-len(items) // shard_size)) if shard_name(k) not in finished]
        wanted = {items[i].name: i for k in todo for i in range(k * shard_size, min((k + 1) * shard_size, len(items)))}
        pending: dict[int, list[tuple[str, bytes]]] = {}
        for name, data in source.read(wanted):
            k = wanted[name] // shard_size
            pending.setdefault(k, []).append((name, data))
            if len(pending[k]) == min(shard_size, len(items) - k * shard_size):
                entry["shards"].append(write_shard(folder / shard_name(k), k * shard_size, pending.pop(k), items))
                entry["shards"].sort(key=lambda sh: sh["name"])
                write_json(out / MANIFEST, manifest)
                bar.update(min(shard_size, len(items) - k * shard_size))
        write_json(folder / "index.json", {
            "__kind__": "wids-shard-index-v1", "wids_version": 1, "name": split,
            "shardlist": [{"url": sh["name"], "nsamples": sh["nsamples"], "filesize": sh["filesize"]} for sh in entry["shards"]],
        })
    bar.close()
    return manifest
