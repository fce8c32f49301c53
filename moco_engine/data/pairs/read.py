"""Image–caption pairs on disk, in the layouts users have; an item is an image with all its captions.

- A folder, or a ``.tar``/``.tar.gz``/``.tar.xz`` archive of one (its one top folder allowed),
  holding one Karpathy-split JSON at its top (``dataset_flickr8k.json``'s layout: ``{"images":
  [{"filename", "split", "sentences": [{"raw"}], "filepath"?}]}``; the one ``*.json`` there, or
  the one ``dataset_*.json``) and the images under ``images/``, or under the folder an entry's
  ``filepath`` names (COCO's ``train2014``). An archive's images are read into memory once, as
  their encoded bytes (Flickr8k at 64 px: 25 MB).
- A ``.csv`` or ``.tsv`` of rows (image path, caption), the paths relative to the file, the
  columns named by ``data.pairs.image_key`` and ``caption_key`` (open_clip's ``--csv-img-key
  filepath``, ``--csv-caption-key title``). Rows naming the same image make one item, its
  captions in row order. The split is the ``data.pairs.split_key`` column's, or, without that
  column, the one the file is read for (``data.root``: ``data.train_split``; ``data.test_root``:
  ``data.test_split``).
- Shards (``data.name=shards``): a sample's ``<key>.txt`` holds its image's captions, one a line
  (:func:`caption_text` writes one, :func:`caption_lines` reads one back).

Bad input is one line naming the file and the entry or line (:class:`DataError`): a missing
image, an image with no caption, an empty caption, a JSON without ``images``, an image in two
splits, and (asked for by name) a split with no items.
"""

from __future__ import annotations

import csv
import json
import re
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from moco_engine.config.schema import PairsDataConfig
from moco_engine.data.errors import DataError
from moco_engine.data.text.corpus import ARCHIVE_SUFFIXES, Files

TABLE_SUFFIXES = (".csv", ".tsv")


@dataclass(frozen=True)
class Pair:
    """An image and all its captions.

    Attributes:
        name: the image as messages name it (its path, or ``archive:member``).
        image: its file, or (from an archive) its encoded bytes.
        captions: its captions, in the file's order (at least one, none empty).
    """

    name: str
    image: Path | bytes
    captions: tuple[str, ...]


@dataclass
class PairsData:
    """The pairs of a file or folder by split.

    Attributes:
        source: what was read (messages).
        splits: split name -> its items, in the file's order.
        named_splits: the data name their splits (a Karpathy JSON, a split column); else every
            item is in the one split the file was read for.
    """

    source: str
    splits: dict[str, list[Pair]]
    named_splits: bool

    def split(self, name: str) -> list[Pair]:
        """The items of split ``name``.

        Raises:
            DataError: the split has no items (the message lists the splits the data have).
        """
        if not self.splits.get(name):
            have = ", ".join(f"{s} ({len(items)})" for s, items in self.splits.items()) or "none"
            raise DataError(f"{self.source}: no image in split '{name}' (its splits: {have})")
        return self.splits[name]


def read_pairs(root: str | Path, keys: PairsDataConfig, split: str) -> PairsData:
    """The pairs at ``root``: a Karpathy-JSON folder or archive, or a CSV/TSV (whose rows are
    all in ``split`` when it has no split column).

    Raises:
        DataError: a missing path, another kind of file, or bad input (named).
    """
    path = Path(root).expanduser()
    if not path.exists():
        raise DataError(f"data path not found: {path}")
    if path.is_file() and path.suffix.lower() in TABLE_SUFFIXES:
        return read_table(path, keys, split)
    if path.is_dir() or path.name.endswith(ARCHIVE_SUFFIXES):
        return read_karpathy(path)
    raise DataError(f"pairs data must be a folder or .tar/.tar.gz/.tar.xz holding a Karpathy-split JSON, "
                    f"or a .csv/.tsv of image paths and captions: {path}")


# ============================================================================ Karpathy's JSON
def karpathy_json(files: Files) -> str:
    """The name of the one Karpathy-split JSON at the top of ``files``."""
    top = sorted(n for n in files.names if "/" not in n and n.endswith(".json"))
    if len(top) > 1:
        top = [n for n in top if n.startswith("dataset_")]
    if len(top) != 1:
        found = "no" if not top else f"{len(top)} dataset_*.json"
        raise DataError(f"{files.root}: {found} Karpathy-split JSON at its top (dataset_<name>.json: "
                        "images[{filename, split, sentences[{raw}]}], the images under images/)")
    return top[0]


def read_karpathy(path: Path) -> PairsData:
    files = Files(path)
    name = karpathy_json(files)
    label = files.label(name)
    try:
        doc = json.loads(files.read([name])[name].decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DataError(f"{label}: not a JSON file ({str(e)[:120]})") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("images"), list):
        raise DataError(f"{label}: no 'images' list (Karpathy's layout: images[{{filename, split, sentences[{{raw}}]}}])")
    entries = []  # (split, member name, captions)
    for n, entry in enumerate(doc["images"]):
        where = f"{label}, images[{n}]"
        for key in ("filename", "split", "sentences"):
            if not isinstance(entry, dict) or key not in entry:
                raise DataError(f"{where}: no '{key}'")
        image = str(PurePosixPath(str(entry.get("filepath") or "images"), str(entry["filename"])))
        sentences = entry["sentences"]
        if not isinstance(sentences, list) or not sentences:
            raise DataError(f"{where}: image {image} has no caption")
        captions = []
        for j, sentence in enumerate(sentences):
            raw = sentence.get("raw") if isinstance(sentence, dict) else None
            if not isinstance(raw, str):
                raise DataError(f"{where}: sentences[{j}] has no 'raw' caption")
            if not raw.strip():
                raise DataError(f"{where}: image {image}'s caption {j} is empty")
            captions.append(raw.strip())
        if image not in files.names:
            raise DataError(f"{where}: image {files.label(image)} not found")
        entries.append((str(entry["split"]), image, tuple(captions)))
    if files.tar is not None:
        blobs = files.read([image for _, image, _ in entries])
        pairs = [(s, Pair(files.label(image), blobs[image], captions)) for s, image, captions in entries]
    else:
        pairs = [(s, Pair(files.label(image), files.names[image], captions)) for s, image, captions in entries]
    return PairsData(label, merged(pairs, label), named_splits=True)


def merged(pairs: list[tuple[str, Pair]], source: str) -> dict[str, list[Pair]]:
    """Items by split; an image named twice in one split is one item with both entries'
    captions, an image in two splits an error (its captions would leak into the other)."""
    splits: dict[str, dict[str, Pair]] = {}
    seen: dict[str, str] = {}
    for split, pair in pairs:
        other = seen.setdefault(pair.name, split)
        if other != split:
            raise DataError(f"{source}: image {pair.name} is in split '{other}' and in split '{split}'")
        items = splits.setdefault(split, {})
        before = items.get(pair.name)
        items[pair.name] = pair if before is None else Pair(pair.name, pair.image, before.captions + pair.captions)
    return {split: list(items.values()) for split, items in splits.items()}


# ============================================================================ CSV and TSV
def read_table(path: Path, keys: PairsDataConfig, split: str) -> PairsData:
    # A TSV is read as open_clip writes one, unquoted: a caption's quote marks are its own.
    tsv = path.suffix.lower() == ".tsv"
    pairs: list[tuple[str, Pair]] = []
    found: dict[str, bool] = {}
    try:
        with open(path, newline="", encoding="utf-8") as handle:
            rows = csv.DictReader(handle, delimiter="\t" if tsv else ",",
                                  quoting=csv.QUOTE_NONE if tsv else csv.QUOTE_MINIMAL)
            columns = rows.fieldnames or []
            for key, setting in ((keys.image_key, "image_key"), (keys.caption_key, "caption_key")):
                if key not in columns:
                    raise DataError(f"{path}: no column '{key}' (data.pairs.{setting}; its columns: "
                                    f"{', '.join(columns) or 'none'})")
            named = keys.split_key in columns
            for row in rows:
                where = f"{path}, line {rows.line_num}"
                image, caption = (row.get(keys.image_key) or "").strip(), (row.get(keys.caption_key) or "").strip()
                if not image:
                    raise DataError(f"{where}: no image path in column '{keys.image_key}'")
                if not caption:
                    raise DataError(f"{where}: empty caption (column '{keys.caption_key}') for image {image}")
                file = path.parent / image
                if image not in found:
                    found[image] = file.is_file()
                if not found[image]:
                    raise DataError(f"{where}: image {file} not found")
                pairs.append(((row.get(keys.split_key) or "").strip() if named else split, Pair(str(file), file, (caption,))))
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    except csv.Error as e:
        raise DataError(f"{path}: {e}") from None
    return PairsData(str(path), merged(pairs, str(path)), named_splits=named)


# ============================================================================ a shard sample's .txt
LINE_BREAKS = re.compile(r"\r\n|\r|\n")


def caption_text(captions: tuple[str, ...]) -> bytes:
    """An image's captions as a shard sample's ``.txt``: one a line, UTF-8 (a line break inside a
    caption becomes a space: a line is a caption)."""
    return "".join(LINE_BREAKS.sub(" ", c).strip() + "\n" for c in captions).encode("utf-8")


def caption_lines(data: bytes, where: str) -> tuple[str, ...]:
    """The captions of a shard sample's ``.txt`` (``where`` names it): its lines, stripped, blank
    ones left out. img2dataset's ``.txt`` holds one caption, moco-shard's all of an image's.

    Raises:
        DataError: not UTF-8, or no caption in it.
    """
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"{where}: its .txt is not UTF-8 text ({e.reason} at byte {e.start})") from None
    captions = tuple(line.strip() for line in LINE_BREAKS.split(text) if line.strip())
    if not captions:
        raise DataError(f"{where}: its .txt holds no caption (one caption a line)")
    return captions
