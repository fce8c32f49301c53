"""The shards source's adapter to wids' internals: an upgrade of wids that changes one of them
fails here, naming it, before a run's loader workers meet it."""

from __future__ import annotations

import io
import tarfile

import pytest

from moco_engine.data.shards import wids_cache


def test_the_wids_internals_the_adapter_uses_are_as_it_expects():
    changes = wids_cache.changed_internals()
    assert not changes, (f"wids {wids_cache.wids_version()} changed what moco_engine/data/shards/wids_cache.py uses:\n"
                         + "\n".join(changes))


def test_a_missing_internal_is_named(monkeypatch):
    monkeypatch.setattr(wids_cache, "INTERNALS", (("wids.wids", "NoSuchReader", ("path",)),))
    (change,) = wids_cache.changed_internals()
    assert change.startswith("wids.wids.NoSuchReader is gone from wids") and "wids_cache.py" in change
    with pytest.raises(RuntimeError, match="wids.wids.NoSuchReader is gone"):
        wids_cache.internal("wids.wids", "NoSuchReader")


def tar_of(path, samples: dict[str, dict[str, bytes]]) -> str:
    with tarfile.open(path, "w") as tar:
        for key, members in samples.items():
            for ext, data in members.items():
                info = tarfile.TarInfo(f"{key}{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return str(path)


def test_items_come_from_their_shard_and_only_the_last_used_stay_open(tmp_path, monkeypatch):
    """What the shards source reads: a sample as a dict of BytesIO by extension, its key and shard,
    local shards read where they lie and URLs fetched into the cache once."""
    monkeypatch.setenv("WIDS_CACHE", str(tmp_path / "cache"))
    first = tar_of(tmp_path / "a.tar", {"k0": {".jpg": b"0", ".cls": b"1"}, "k1": {".jpg": b"1"}})
    second = tar_of(tmp_path / "b.tar", {"k2": {".jpg": b"2"}})
    shards = wids_cache.OpenShards([{"url": first, "nsamples": 2}, {"url": f"file://{second}", "nsamples": 1}], size=1)
    sample = shards[0]
    assert sample["__key__"] == "k0" and sample[".jpg"].getvalue() == b"0" and sample[".cls"].getvalue() == b"1"
    assert sample["__shard__"] == first and shards[1][".jpg"].getvalue() == b"1"
    assert shards[2]["__key__"] == "k2" and list(shards.open) == [f"file://{second}"]  # size 1: the first closed
    assert [p.name for p in (tmp_path / "cache").iterdir() if p.suffix != ".lock"] == [
        wids_cache.cache_path(f"file://{second}").rsplit("/", 1)[1]]
    shards.close()
    assert not shards.open
