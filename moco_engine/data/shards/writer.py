"""An image set written as WebDataset tar shards that ``data.name=shards`` reads (``moco-shard SRC OUT``,
``tools/shard.py``, is its command line).

SRC is an ImageFolder tree (``<split>/<class>/<image>``) or a ``.tar``, ``.tar.gz`` or ``.tar.xz``
archive of one (in one top folder or not). Each split folder (``train/``, ``test/``, ...) becomes
``OUT/<split>/``:

    shard-000000.tar ...   WebDataset's layout (``webdataset.TarWriter``): per item ``<key>.<ext>``,
                           the image's own bytes (never re-encoded), and ``<key>.cls``, its class
                           index; the key is the item's index in the split, 9 digits
    index.json             the shard list as ``wids`` reads it (``wids-shard-index-v1``)
    targets.npy            every item's class index, int32, in item order

and ``OUT/manifest.json`` records the source (path and SHA-256: of the archive's bytes, or of a
folder's sorted file list with sizes), the classes, and per split the items and every finished
shard (name, items, bytes, SHA-256). Items are in a fixed order: a folder's sorted by class and
name, an archive's in archive order. Shard k holds items [k·S, (k+1)·S) for ``--shard-size`` S, and
is written under a temporary name and renamed when whole; the manifest is rewritten after each.
So a stopped run, rerun on the same source, writes only the shards that are missing; into a folder
written from another source it refuses, naming both.
"""

from __future__ import annotations

import hashlib
import json
import os
import tarfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from moco_engine.config.schema import UserError
from moco_engine.data.images.sets import IMAGE_EXTENSIONS
from moco_engine.data.shards.reader import MANIFEST, MANIFEST_FORMAT, read_manifest, shard_name


def source_hash(src: Path, listing: dict[str, list[tuple[str, str]]]) -> str:
    """SHA-256 of an archive's bytes, or of a folder's sorted (path, size) list."""
    digest = hashlib.sha256()
    if src.is_file():
        with open(src, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
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


def write_shard(path: Path, first: int, images: list[tuple[str, bytes]], targets: np.ndarray) -> dict[str, Any]:
    """Write one shard (under a temporary name, renamed when whole); its manifest entry."""
    from webdataset import TarWriter

    tmp = path.with_suffix(".tar.partial")
    with open(tmp, "wb") as stream:
        with TarWriter(stream, mtime=0, user="moco", group="moco", mode=0o644) as writer:
            for offset, (name, data) in enumerate(images):
                ext = Path(name).suffix.lower().lstrip(".").replace("jpeg", "jpg")
                writer.write({"__key__": f"{first + offset:09d}", ext: data, "cls": int(targets[first + offset])})
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


def write_shards(src: Path, out: Path, shard_size: int, progress: bool = True) -> dict[str, Any]:
    """Write (or finish writing) ``out`` from ``src``; returns the manifest."""
    from tqdm import tqdm

    if not src.exists():
        raise UserError(f"moco-shard: source not found: {src}")
    listing = list_source(src)
    digest = source_hash(src, listing)
    classes = sorted({cls for items in listing.values() for _, cls in items})
    manifest = read_manifest(out) if (out / MANIFEST).is_file() else None
    if manifest is not None and manifest["source_sha256"] != digest:
        raise UserError(f"moco-shard: {out} was written from {manifest['source']} (sha256 {manifest['source_sha256'][:12]}…), "
                        f"not from {src} (sha256 {digest[:12]}…): choose another output folder")
    if manifest is None or manifest["shard_size"] != shard_size:
        manifest = {"format": MANIFEST_FORMAT, "source": str(src.resolve()), "source_sha256": digest,
                    "shard_size": shard_size, "classes": classes,
                    "splits": {s: {"items": len(items), "shards": []} for s, items in sorted(listing.items())}}
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / MANIFEST, manifest)
    index = {name: i for i, name in enumerate(classes)}
    total = sum(len(items) for items in listing.values())
    done = sum(sh["nsamples"] for split in manifest["splits"].values() for sh in split["shards"])
    bar = tqdm(total=total, initial=done, unit="img", desc=f"moco-shard {out}", disable=not progress)
    for split, items in sorted(listing.items()):
        entry, folder = manifest["splits"][split], out / split
        folder.mkdir(exist_ok=True)
        targets = np.array([index[cls] for _, cls in items], dtype=np.int32)
        np.save(folder / "targets.npy", targets)
        finished = {sh["name"] for sh in entry["shards"] if (folder / sh["name"]).is_file()
                    and (folder / sh["name"]).stat().st_size == sh["filesize"]}
        entry["shards"] = [sh for sh in entry["shards"] if sh["name"] in finished]
        todo = [k for k in range(-(-len(items) // shard_size)) if shard_name(k) not in finished]
        wanted = {items[i][0]: i for k in todo for i in range(k * shard_size, min((k + 1) * shard_size, len(items)))}
        pending: dict[int, list[tuple[str, bytes]]] = {}
        for name, data in image_bytes(src, wanted):
            k = wanted[name] // shard_size
            pending.setdefault(k, []).append((name, data))
            if len(pending[k]) == min(shard_size, len(items) - k * shard_size):
                entry["shards"].append(write_shard(folder / shard_name(k), k * shard_size, pending.pop(k), targets))
                entry["shards"].sort(key=lambda sh: sh["name"])
                write_json(out / MANIFEST, manifest)
                bar.update(min(shard_size, len(items) - k * shard_size))
        write_json(folder / "index.json", {
            "__kind__": "wids-shard-index-v1", "wids_version": 1, "name": split,
            "shardlist": [{"url": sh["name"], "nsamples": sh["nsamples"], "filesize": sh["filesize"]} for sh in entry["shards"]],
        })
    bar.close()
    return manifest
