"""A BEIR-format set N times the size of another, for timing the text recipe on a larger corpus.

Each document is kept, and N - 1 copies of it are added under the ids ``r<k>-<id>`` with their
sentences (split at ". ") shuffled by a seeded generator: a corpus with the original's lengths,
vocabulary and characters, N times the documents, whose copies are not exact duplicates. The queries
and every qrels file are copied unchanged, so they judge the original documents only: a figure
of retrieval quality on the result means little; its times are what it is for (BENCHMARKS.md,
"The recipe on a corpus twelve times SciFact's").

    python tools/make_scaled_beir.py ../shared/data/scifact-beir.tar.xz .data/scifact-x12 --copies 12

SRC is a BEIR folder or a .tar/.tar.gz/.tar.xz of one, read as ``data.root`` is (``corpus.Files``,
``corpus.read_corpus``: titles and texts stripped); OUT gets ``corpus.jsonl``, ``queries.jsonl``
and ``qrels/``. The same SRC and N give the same bytes.
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

from moco_engine.data.text.corpus import Files, read_corpus


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("src", type=Path)
    parser.add_argument("out", type=Path)
    parser.add_argument("--copies", type=int, default=12, help="the corpus's size as a multiple of SRC's (default 12)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    rng = random.Random(args.seed)
    files = Files(args.src)  # the engine's own reader: a folder or an archive, read in place
    corpus = read_corpus(files, "corpus.jsonl")
    (args.out / "qrels").mkdir(parents=True, exist_ok=True)
    with (args.out / "corpus.jsonl").open("w", encoding="utf-8") as f:
        for copy in range(args.copies):
            for doc_id, title, text in zip(corpus.ids, corpus.titles, corpus.texts):
                if copy:
                    sentences = text.split(". ")
                    rng.shuffle(sentences)
                    doc_id, text = f"r{copy}-{doc_id}", ". ".join(sentences)
                f.write(json.dumps({"_id": doc_id, "title": title, "text": text}, ensure_ascii=False) + "\n")
    for name in [n for n in files.names if n == "queries.jsonl" or n.startswith("qrels/")]:
        (args.out / name).write_text("".join(line + "\n" for _, line in files.lines(name)), encoding="utf-8")
    print(f"{args.out}: {len(corpus) * args.copies:,} documents ({args.copies} x {len(corpus):,})")


if __name__ == "__main__":
    main()
