"""The shards source's one door into ``wids`` (WebDataset's indexed reader): opening a shard,
fetching a remote one into the cache, and the shards a process keeps open.

wids' public API (``wids.ShardListDataset`` and its samplers) keeps its open shards in an LRU that
takes a lock file beside a local shard and copies it into its cache: a read-only disk fails, and a
large set is copied. So the engine keeps its own LRU (:class:`OpenShards`) and uses two of wids'
internals (wids 0.1.11), named once, in :data:`INTERNALS`:

- ``wids.wids.IndexedTarSamples``: a shard's samples by index, the tar memory-mapped and indexed
  on opening (the reason for wids);
- ``wids.wids_dl.download_and_open``: a URL fetched once into a local file (curl, gsutil, aws,
  ...), under a lock file, so concurrent loader processes fetch it once.

:func:`changed_internals` says in words what an upgrade of wids changed of them
(``tests/test_wids_cache.py`` runs it); using one that is gone is one line naming it, not an
``AttributeError`` inside a loader worker.
"""

from __future__ import annotations

import importlib
import inspect
import os
from collections import OrderedDict
from pathlib import Path
from typing import Any
from urllib.parse import quote

import numpy as np

#: wids' internals the engine uses: (module, name, the parameters it passes them by name or place).
INTERNALS = (("wids.wids", "IndexedTarSamples", ("path",)), ("wids.wids_dl", "download_and_open", ("remote", "local")))
#: What an opened shard must offer: its sample count, sample k (a dict: ``"__key__"`` and a
#: ``BytesIO`` per member, keyed by its extension, ``".jpg"``), and closing its file and map.
SHARD_METHODS = ("__len__", "__getitem__", "close")


def internal(module: str, name: str) -> Any:
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as e:
        raise RuntimeError(f"{module}.{name} is gone from wids {wids_version()} ({e}): moco_engine/data/shards/wids_cache.py "
                           "adapts the shards source to wids 0.1.11") from None


def wids_version() -> str:
    try:
        return importlib.import_module("wids").__version__
    except (ImportError, AttributeError):
        return "(not installed)"


def changed_internals() -> list[str]:
    """What this wids lacks of :data:`INTERNALS` and :data:`SHARD_METHODS`, one line each (none:
    the adapter fits)."""
    changes = []
    for module, name, params in INTERNALS:
        try:
            found = internal(module, name)
        except RuntimeError as e:
            changes.append(str(e))
            continue
        signature = inspect.signature(found)
        missing = [p for p in params if p not in signature.parameters]
        if missing:
            changes.append(f"{module}.{name}{signature} takes no {', '.join(missing)}")
        if inspect.isclass(found):
            changes += [f"{module}.{name} has no {m}" for m in SHARD_METHODS if not callable(getattr(found, m, None))]
    return changes


def cache_path(url: str) -> str:
    """Where a remote shard is fetched to: ``$WIDS_CACHE`` (default ``~/.cache/moco_engine/wids``),
    under its whole URL quoted (a basename alone would let train/ and test/ shards of one name
    overwrite each other). The quoting is wids' own default naming, so a cache filled by earlier
    versions of the engine stays valid."""
    folder = os.environ.get("WIDS_CACHE") or str(Path.home() / ".cache" / "moco_engine" / "wids")
    os.makedirs(folder, exist_ok=True)
    return os.path.join(folder, quote(url, safe="+-"))


def fetch(url: str) -> str:
    """A remote shard's local copy, fetched once."""
    download_and_open = internal("wids.wids_dl", "download_and_open")
    local = cache_path(url)
    with download_and_open(url, local):
        pass
    return local


def open_shard(url: str) -> Any:
    """A shard's samples by index: a local one read where it lies, a URL from its cached copy."""
    return internal("wids.wids", "IndexedTarSamples")(path=fetch(url) if "://" in url else url)


class OpenShards:
    """Items of tar shards by index: item i is sample i - (the items before its shard) of its
    shard, with ``"__shard__"``, the shard's URL. The ``size`` shards used last stay open (an LRU).

    Args:
        shards: per shard ``{"url": path or URL, "nsamples": items}``, in item order.
    """

    def __init__(self, shards: list[dict[str, Any]], size: int):
        self.urls = [s["url"] for s in shards]
        self.ends = np.cumsum([s["nsamples"] for s in shards])
        self.size = size
        self.open: OrderedDict[str, Any] = OrderedDict()

    def __getitem__(self, i: int) -> dict[str, Any]:
        k = int(np.searchsorted(self.ends, i, side="right"))
        sample = self.shard(self.urls[k])[int(i) - (int(self.ends[k - 1]) if k else 0)]
        sample["__shard__"] = self.urls[k]
        return sample

    def shard(self, url: str) -> Any:
        if url in self.open:
            self.open.move_to_end(url)
        else:
            self.open[url] = open_shard(url)
            if len(self.open) > self.size:
                self.open.popitem(last=False)[1].close()
        return self.open[url]

    def close(self) -> None:
        while self.open:
            self.open.popitem()[1].close()
