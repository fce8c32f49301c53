"""A BEIR-format set N times the size of another, for timing the text recipe on a larger corpus.

Each document is kept, and N - 1 copies of it are added under the ids ``r<k>-<id>`` with their
sentences (split at ". ") shuffled by a seeded generator: a corpus with the original's lengths,
vocabulary and characters, N times the documents, whose copies are not exact duplicates. The queries
and every qrels file are copied unchanged, so they judge the original documents only: a figure
of retrieval quality on the result means little; its times are what it is for (BENCHMARKS.md,
"The recipe on a corpus twelve times SciFact's").

    python tools/make_scaled_beir.py ../shared/data/scifact-beir.tar.xz .data/scifact-x12 --copies 12

SRC is a BEIR folder or a .tar/.tar.gz/.tar.xz of one (as ``data.root`` takes); OUT gets
``corpus.jsonl``, ``queries.jsonl`` and ``qrels/``. The same SRC and N give the same bytes.
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import tarfile
import tempfile
from pathlib import Path


def beir_folder(src: Path, scratch: Path) -> Path:
    """The folder holding ``corpus.jsonl`` in ``src``, unpacked into ``scratch`` if an archive."""
    if src.is_file():
        with tarfile.open(src) as tar:
            tar.extractall(scratch, filter="data")
        src = scratch
    found = sorted(src.rglob("corpus.jsonl"))
    if not found:
        raise SystemExit(f"{src}: no corpus.jsonl")
    return found[0].parent


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("src", type=Path)
    parser.add_argument("out", type=Path)
    parser.add_argument("--copies", type=int, default=12, help="the corpus's size as a multiple of SRC's (default 12)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    rng = random.Random(args.seed)
    with tempfile.TemporaryDirectory() as scratch:
        folder = beir_folder(args.src, Path(scratch))
        args.out.mkdir(parents=True, exist_ok=True)
        docs = [json.loads(line) for line in (folder / "corpus.jsonl").read_text(encoding="utf-8").splitlines() if line.strip()]
        with (args.out / "corpus.jsonl").open("w", encoding="utf-8") as f:
            for copy in range(args.copies):
                for doc in docs:
                    if copy:
                        sentences = doc.get("text", "").split(". ")
                        rng.shuffle(sentences)
                        doc = {**doc, "_id": f"r{copy}-{doc['_id']}", "text": ". ".join(sentences)}
                    f.write(json.dumps(doc, ensure_ascii=False) + "\n")
        shutil.copy(folder / "queries.jsonl", args.out / "queries.jsonl")
        shutil.copytree(folder / "qrels", args.out / "qrels", dirs_exist_ok=True)
    print(f"{args.out}: {len(docs) * args.copies:,} documents ({args.copies} x {len(docs):,})")


if __name__ == "__main__":
    main()
