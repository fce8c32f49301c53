"""Rebuild moco_engine/assets/scifact_sample.tar.xz, the embedded text sample (data.name=text).

From ../shared/data/scifact-beir.tar.xz (BEIR's SciFact; its README says where it comes from):
every abstract judged relevant to one of the first TEST_QUERIES test claims or TRAIN_QUERIES
train claims, plus seeded random other abstracts up to DOCUMENTS in all, with those claims and
their qrels, in BEIR's layout under scifact_sample/. Abstracts are ODC-By 1.0, claims CC BY 4.0
(allenai/scifact). Run from the project root:

    python tools/make_text_sample.py [--shared ../shared/data]
"""

from __future__ import annotations

import argparse
import io
import json
import random
import tarfile
from pathlib import Path

from moco_engine.data.text.corpus import read_text_data

DOCUMENTS = 600
TEST_QUERIES = 150
TRAIN_QUERIES = 150
OUT = Path(__file__).resolve().parents[1] / "moco_engine" / "assets" / "scifact_sample.tar.xz"
LICENCE = """SciFact sample (Wadden et al. 2020, "Fact or Fiction: Verifying Scientific Claims"), in BEIR's layout.
Abstracts: ODC-By 1.0 (from S2ORC). Claims: CC BY 4.0. Source: allenai/scifact, as BEIR distributes it.
Built by tools/make_text_sample.py: the abstracts judged for the first {test} test and {train} train claims,
and seeded random others, {docs} in all.
"""


def add(out: tarfile.TarFile, name: str, text: str) -> None:
    data = text.encode("utf-8")
    info = tarfile.TarInfo(f"scifact_sample/{name}")
    info.size, info.mtime = len(data), 0  # a reproducible archive
    out.addfile(info, io.BytesIO(data))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shared", default="../shared/data", type=Path)
    args = ap.parse_args()
    data = read_text_data(args.shared / "scifact-beir.tar.xz")
    splits = {"test": list(data.qrels["test"])[:TEST_QUERIES], "train": list(data.qrels["train"])[:TRAIN_QUERIES]}
    judged = {d for split, qids in splits.items() for q in qids for d in data.qrels[split][q]}
    others = sorted(set(data.corpus.ids) - judged)
    keep = judged | set(random.Random(0).sample(others, DOCUMENTS - len(judged)))
    corpus = data.corpus
    lines = [json.dumps({"_id": i, "title": t, "text": x}, ensure_ascii=False)
             for i, t, x in zip(corpus.ids, corpus.titles, corpus.texts) if i in keep]
    queries = sorted({q for qids in splits.values() for q in qids}, key=lambda q: list(data.queries).index(q))
    with tarfile.open(OUT, "w:xz", format=tarfile.GNU_FORMAT) as out:
        add(out, "corpus.jsonl", "\n".join(lines) + "\n")
        add(out, "queries.jsonl", "\n".join(json.dumps({"_id": q, "text": data.queries[q]}, ensure_ascii=False)
                                             for q in queries) + "\n")
        for split, qids in splits.items():
            rows = [f"{q}\t{d}\t{g}" for q in qids for d, g in data.qrels[split][q].items()]
            add(out, f"qrels/{split}.tsv", "query-id\tcorpus-id\tscore\n" + "\n".join(rows) + "\n")
        add(out, "LICENSE.txt", LICENCE.format(test=TEST_QUERIES, train=TRAIN_QUERIES, docs=DOCUMENTS))
    print(f"wrote {OUT}: {len(lines)} abstracts ({len(judged)} judged), {len(queries)} claims, "
          f"{OUT.stat().st_size / 1e3:.0f} kB")


if __name__ == "__main__":
    main()
