"""Text on disk: BEIR folders and archives, plain corpora, the STS Benchmark.

- BEIR's layout (Thakur et al. 2021): ``corpus.jsonl`` (``_id``, ``title``, ``text``),
  ``queries.jsonl`` (``_id``, ``text``) and ``qrels/<split>.tsv`` (``query-id corpus-id score``
  with a header), at the root of a folder or a ``.tar``/``.tar.gz``/``.tar.xz`` archive or in one
  top folder of it (``scifact/...``); archives are read in place.
- Plain corpora: ``.txt`` (one document per line) or ``.jsonl`` (a ``text`` field, ``title``
  optional); they have no queries (no retrieval monitor).
- STS-B's ``sts-<split>.csv``: tab-separated ``genre file year id score sentence1 sentence2``.
  Some lines carry extra fields after those seven and some hold quote characters, so the columns
  are read by position and nothing is unquoted.

Bad input is one line naming the file and line (:class:`~moco_engine.data.errors.DataError`).
What BEIR's ``GenericDataLoader`` reads, this reads: a BEIR document with an id is kept when its
title and text are empty (indexed and retrievable, and the qrels may judge it; the training
stream has no tokens of it), with one warning for all of them; a plain corpus's blank line is
left out. A qrels line naming a corpus id that the corpus lacks is kept, with one warning: the
metrics then count that relevant document as never retrieved, as BEIR's do. Each qrels split
is read and checked when first asked for (:class:`Qrels`), so a run reads only the split it uses.
"""

from __future__ import annotations

import json
import sys
import tarfile
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

from moco_engine.data.errors import DataError

ARCHIVE_SUFFIXES = (".tar", ".tar.gz", ".tgz", ".tar.xz")


@dataclass
class Corpus:
    """N documents: ids, titles ("" when none) and texts, in file order."""

    ids: list[str]
    titles: list[str]
    texts: list[str]

    def __len__(self) -> int:
        return len(self.ids)

    def joined(self) -> list[str]:
        """Each document as BEIR's dense retrievers encode it: title and text joined by a space
        (the text alone when there is no title)."""
        return [f"{t} {x}" if t else x for t, x in zip(self.titles, self.texts)]


class Qrels(Mapping):
    """A BEIR set's relevance judgements by split (``qrels/<split>.tsv``): split -> query id ->
    document id -> grade, each split read and checked (:func:`read_qrels`) when first asked for."""

    def __init__(self, files: Files | None = None, names: dict[str, str] | None = None, corpus: Corpus | None = None,
                 queries: dict[str, str] | None = None):
        self.files, self.names, self.corpus, self.queries = files, names or {}, corpus, queries or {}
        self.read: dict[str, dict[str, dict[str, int]]] = {}

    def __getitem__(self, split: str) -> dict[str, dict[str, int]]:
        if split not in self.read:
            self.read[split] = read_qrels(self.files, self.names[split], self.corpus, self.queries)
        return self.read[split]

    def __iter__(self) -> Iterator[str]:
        return iter(self.names)

    def __len__(self) -> int:
        return len(self.names)


@dataclass
class TextData:
    """A corpus and, for BEIR data, its queries and relevance judgements per split."""

    corpus: Corpus
    queries: dict[str, str] = field(default_factory=dict)
    qrels: Mapping[str, dict[str, dict[str, int]]] = field(default_factory=Qrels)  # split -> qid -> doc id -> grade
    source: str = ""

    def split(self, name: str) -> tuple[dict[str, str], dict[str, dict[str, int]]]:
        """The queries that have judgements in ``name`` and those judgements.

        Raises:
            DataError: the data have no such split (the message lists those they have).
        """
        if name not in self.qrels:
            have = ", ".join(sorted(self.qrels)) or "none: a corpus without queries"
            raise DataError(f"{self.source}: no qrels/{name}.tsv (its qrels splits: {have})")
        qrels = self.qrels[name]
        return {q: self.queries[q] for q in qrels}, qrels


# ============================================================================ files, in folders or archives
class Files:
    """The files of a folder or an archive, by path relative to its root (or to its one top
    folder); a plain file is a folder of one."""

    def __init__(self, root: Path):
        self.root = root
        if root.is_file() and not root.name.endswith(ARCHIVE_SUFFIXES):
            self.root, self.names, self.tar, self.prefix = root.parent, {root.name: root}, None, ""
            return
        if root.is_dir():
            self.names = {p.relative_to(root).as_posix(): p for p in root.rglob("*") if p.is_file()}
            self.tar = None
        else:
            try:
                self.tar = tarfile.open(root)
            except (tarfile.TarError, OSError) as e:
                raise DataError(f"cannot read archive {root}: {e}") from None
            self.names = {m.name.lstrip("./"): m for m in self.tar.getmembers() if m.isfile()}
        tops = {PurePosixPath(n).parts[0] for n in self.names}
        nested = all(len(PurePosixPath(n).parts) > 1 for n in self.names)
        if "corpus.jsonl" not in self.names and len(tops) == 1 and nested:  # one top folder: scifact/corpus.jsonl
            top = next(iter(tops)) + "/"
            self.names = {n[len(top):]: v for n, v in self.names.items() if n.startswith(top)}
            self.prefix = top
        else:
            self.prefix = ""

    def label(self, name: str) -> str:
        return f"{self.root}:{self.prefix}{name}" if self.tar is not None else str(self.root / self.prefix / name)

    def read(self, names: list[str]) -> dict[str, bytes]:
        """The bytes of the files ``names``, read in the archive's order (a compressed archive
        is then decompressed once, forward, rather than from its start again for each member)."""
        if self.tar is None:
            return {name: self.names[name].read_bytes() for name in names}
        ordered = sorted(names, key=lambda name: self.names[name].offset_data)
        try:
            return {name: self.tar.extractfile(self.names[name]).read() for name in ordered}
        except (tarfile.TarError, EOFError, OSError) as e:
            raise DataError(f"cannot read archive {self.root}: {e}") from None

    def lines(self, name: str) -> Iterator[tuple[int, str]]:
        """(line number from 1, line without its newline) of file ``name``, decoded as UTF-8.

        Raises:
            DataError: bytes that are not UTF-8 (file and line named).
        """
        entry = self.names[name]
        handle = self.tar.extractfile(entry) if self.tar is not None else open(entry, "rb")
        with handle:
            for number, raw in enumerate(handle, 1):
                try:
                    yield number, raw.decode("utf-8").rstrip("\r\n")
                except UnicodeDecodeError as e:
                    raise DataError(f"{self.label(name)}, line {number}: not UTF-8 text ({e.reason} at byte {e.start})") from None


def json_lines(files: Files, name: str, required: tuple[str, ...]) -> Iterator[tuple[int, dict]]:
    """The JSON objects of a JSONL file, each with the ``required`` fields (blank lines skipped).

    Raises:
        DataError: a line that is not a JSON object with those fields (file and line named).
    """
    for number, line in files.lines(name):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{files.label(name)}, line {number}: not valid JSON ({e.msg}, column {e.colno})") from None
        missing = [k for k in required if not isinstance(obj, dict) or k not in obj]
        if missing:
            raise DataError(f"{files.label(name)}, line {number}: no '{missing[0]}' field")
        yield number, obj


# ============================================================================ readers
def read_text_data(path: str | Path) -> TextData:
    """A BEIR folder or archive, or a plain ``.txt`` / ``.jsonl`` corpus.

    Raises:
        DataError: a missing path, a folder without ``corpus.jsonl``, a malformed line, bytes
            that are not UTF-8, no documents, every query empty (a qrels split's own faults when
            it is first read).
    """
    path = Path(path).expanduser()
    if not path.exists():
        raise DataError(f"data path not found: {path}")
    if path.is_file() and path.suffix in (".txt", ".jsonl") and not path.name.endswith(ARCHIVE_SUFFIXES):
        return TextData(read_plain(path), source=str(path))
    if not (path.is_dir() or path.name.endswith(ARCHIVE_SUFFIXES)):
        raise DataError(f"text data must be a BEIR folder or .tar/.tar.gz/.tar.xz archive, a .txt or a .jsonl: {path}")
    files = Files(path)
    if "corpus.jsonl" not in files.names:
        raise DataError(f"{path}: no corpus.jsonl (BEIR's layout: corpus.jsonl, queries.jsonl, qrels/<split>.tsv)")
    corpus = read_corpus(files, "corpus.jsonl")
    queries = ({str(o["_id"]): str(o["text"] or "") for _, o in json_lines(files, "queries.jsonl", ("_id", "text"))}
               if "queries.jsonl" in files.names else {})
    if queries and not any(text.strip() for text in queries.values()):
        raise DataError(f"{files.label('queries.jsonl')}: every one of its {len(queries)} queries is empty")
    names = {PurePosixPath(n).stem: n for n in sorted(files.names) if n.startswith("qrels/") and n.endswith(".tsv")}
    return TextData(corpus, queries, Qrels(files, names, corpus, queries), source=str(path))


def read_corpus(files: Files, name: str) -> Corpus:
    ids, titles, texts = [], [], []
    empty = []
    for number, obj in json_lines(files, name, ("_id", "text")):
        title, text = str(obj.get("title") or "").strip(), str(obj["text"] or "").strip()
        if not title and not text:  # kept, as BEIR keeps it: retrievable, and the qrels may judge it
            empty.append(number)
        ids.append(str(obj["_id"]))
        titles.append(title)
        texts.append(text)
    return finish(Corpus(ids, titles, texts), files.label(name), empty, kept=True)


def read_plain(path: Path) -> Corpus:
    files = Files(path)
    ids, titles, texts, empty = [], [], [], []
    if path.suffix == ".jsonl":
        for number, obj in json_lines(files, path.name, ("text",)):
            text, title = str(obj["text"] or "").strip(), str(obj.get("title") or "").strip()
            if not text and not title:
                empty.append(number)
                continue
            ids.append(str(obj.get("_id", obj.get("id", number))))
            titles.append(title)
            texts.append(text)
    else:
        for number, line in files.lines(path.name):
            if not line.strip():
                empty.append(number)
                continue
            ids.append(str(number))
            titles.append("")
            texts.append(line.strip())
    return finish(Corpus(ids, titles, texts), str(path), empty)


def finish(corpus: Corpus, label: str, empty: list[int], kept: bool = False) -> Corpus:
    """``corpus`` checked: some text, no id twice; its empty documents (lines ``empty``) said in one line."""
    if empty:
        what = "kept (retrievable; no tokens to train on)" if kept else "left out"
        print(f"warning: {label}: {len(empty)} empty document(s) {what} (line {empty[0]}"
              f"{', ...' if len(empty) > 1 else ''})", file=sys.stderr, flush=True)
    if len(corpus) == len(empty) if kept else not len(corpus):
        raise DataError(f"{label}: no documents")
    if len(set(corpus.ids)) != len(corpus.ids):
        seen: set[str] = set()
        twice = next(i for i in corpus.ids if i in seen or seen.add(i))
        raise DataError(f"{label}: document id {twice!r} appears more than once")
    return corpus


def read_qrels(files: Files, name: str, corpus: Corpus, queries: dict[str, str]) -> dict[str, dict[str, int]]:
    """``query-id corpus-id score`` lines after a header, as {qid: {doc id: grade}}.

    Raises:
        DataError: a first line that is a judgement, not the header; a line without exactly three
            tab-separated fields or an integer grade, or a query id that the queries lack (file and
            line named). A corpus id the corpus lacks is one warning line.
    """
    docs = set(corpus.ids)
    qrels: dict[str, dict[str, int]] = {}
    unknown: list[tuple[int, str]] = []  # (line, corpus id) of judgements of documents the corpus lacks
    for number, line in files.lines(name):
        parts = line.rstrip("\r\n").split("\t")
        if number == 1:  # BEIR's header; a judgement there means the file has none (it would be lost)
            if len(parts) == 3 and parts[2].strip().lstrip("-").isdigit():
                raise DataError(f"{files.label(name)}, line 1: a judgement where BEIR's header "
                                "'query-id<TAB>corpus-id<TAB>score' belongs")
            continue
        if not line.strip():
            continue
        try:
            if len(parts) != 3:
                raise ValueError
            qid, did, grade = parts[0], parts[1], int(parts[2])
        except ValueError:
            raise DataError(f"{files.label(name)}, line {number}: expected 'query-id<TAB>corpus-id<TAB>score', "
                            f"got {len(parts)} field(s)") from None
        if qid not in queries:
            raise DataError(f"{files.label(name)}, line {number}: query id {qid!r} is not in queries.jsonl")
        if did not in docs:
            unknown.append((number, did))
        qrels.setdefault(qid, {})[did] = grade
    if unknown:  # BEIR keeps them: a relevant document no run can retrieve counts as missed
        (line, did), n = unknown[0], len(unknown)
        print(f"warning: {files.label(name)}: {n} judgement(s) of documents not in corpus.jsonl, kept and "
              f"counted as never retrieved (line {line}: corpus id {did!r}{', ...' if n > 1 else ''})",
              file=sys.stderr, flush=True)
    return qrels


@dataclass
class SentencePairs:
    """STS pairs: the two sentences and the gold similarity (0–5) of each."""

    first: list[str]
    second: list[str]
    scores: list[float]


def read_sts(path: str | Path, split: str = "test") -> SentencePairs:
    """STS-B's ``sts-<split>.csv`` from its folder or archive (or the file itself).

    Raises:
        DataError: no such file, or a line with fewer than seven fields or a score that is not a
            number (file and line named).
    """
    path = Path(path).expanduser()
    if not path.exists():
        raise DataError(f"data path not found: {path}")
    files = Files(path)
    if path.is_file() and path.suffix == ".csv":
        name = path.name
    else:
        name = next((n for n in files.names if PurePosixPath(n).name == f"sts-{split}.csv"), None)
        if name is None:
            raise DataError(f"{path}: no sts-{split}.csv")
    pairs = SentencePairs([], [], [])
    for number, line in files.lines(name):
        if not line.strip():
            continue
        parts = line.split("\t")  # fields 8+ (sources' notes) ignored; quotes are text
        try:
            score = float(parts[4])
            a, b = parts[5], parts[6]
        except (IndexError, ValueError):
            raise DataError(f"{files.label(name)}, line {number}: expected 7 tab-separated fields with a score "
                            "in the 5th (genre file year id score sentence1 sentence2)") from None
        pairs.first.append(a)
        pairs.second.append(b)
        pairs.scores.append(score)
    return pairs
