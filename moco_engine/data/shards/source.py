"""The shards source, ``data.name=shards``: a moco-shard folder (``manifest.json``) or a ``.txt``
of shards, read through ``reader.py``; the shards' fingerprint kept in checkpoints."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from moco_engine.config.schema import DataConfig
from moco_engine.data.errors import DataError
from moco_engine.data.images.sources import IMAGE_SETTINGS, match_classes
from moco_engine.data.items import Splits
from moco_engine.data.shards.reader import (
    MANIFEST,
    ShardImages,
    listed_split,
    manifest_split,
    read_manifest,
)
from moco_engine.data.sources import register_data_source


class ShardOrigin:
    """The shards' fingerprint, kept in checkpoints: a resume onto rewritten shards is refused.
    A moco-shard folder's shards are named within it (the folder may move) and known by their
    SHA-256; a listed one by its path and its size (a URL's by its path alone)."""

    def __init__(self, images: ShardImages):
        self.shards = [(s.get("label", s["url"]), s["nsamples"], s.get("sha256") or str(s.get("bytes", "")))
                       for s in images.shards]

    def state(self) -> dict[str, Any]:
        digest = hashlib.sha256(json.dumps(self.shards).encode()).hexdigest()
        return {"shards": {"fingerprint": digest, "list": [list(s) for s in self.shards]}}

    def misfit(self, saved: dict[str, Any]) -> str | None:
        theirs = saved.get("shards")
        if theirs is None or theirs["fingerprint"] == self.state()["shards"]["fingerprint"]:
            return None
        for old, new in zip(theirs["list"], self.shards):
            if list(old) != list(new):
                return (f"was trained on other shards: {new[0]} has changed since (items {old[1]} -> {new[1]}, "
                        f"{old[2][:12] or '?'} -> {new[2][:12] or '?'}); resume on the shards it was trained on")
        return f"was trained on {len(theirs['list'])} shards, and data.root lists {len(self.shards)}"


@register_data_source("shards", reads=(*IMAGE_SETTINGS, "data.root", "data.train_split", "data.test_split",
                                        "data.on_bad_image", "data.max_bad_images", "data.decode"))
def shards(cfg: DataConfig, seed: int) -> Splits:
    root = Path(cfg.root).expanduser()
    if not root.exists():
        raise DataError(f"data path not found: {root}")
    if root.is_file():
        if root.suffix != ".txt":
            raise DataError(f"data.root for data.name=shards: a moco-shard folder or a .txt of shards, not {root}")
        train, test = listed_split(root, cfg), None
    else:
        if not (root / MANIFEST).is_file():
            raise DataError(f"{root}: no {MANIFEST} (write the folder with moco-shard SRC {root})")
        manifest = read_manifest(root)
        train = manifest_split(root, manifest, cfg.train_split, cfg)
        test = manifest_split(root, manifest, cfg.test_split, cfg) if cfg.test_split else None
        if test is not None:
            match_classes(train, test)
    return Splits(train, test, origin=ShardOrigin(train))
