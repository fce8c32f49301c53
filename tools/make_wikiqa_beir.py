"""Build WikiQA as a BEIR-format passage-retrieval set: the text recipe's second corpus.

WikiQA (Yang, Yih and Meek, EMNLP 2015): questions from Bing's query logs, each with the sentences
of the summary paragraph of one Wikipedia page, a sentence labelled 1 when it answers the question.
Microsoft Research distributes it for research use (Microsoft Research Data License Agreement);
nothing of it is committed here. The files come from a public GitHub repository that holds the
release's `WikiQA-train.tsv` and `WikiQA-test.tsv`:

    fetch github:SiemensHalske/DataAlchemist          # the search tool; a bare git copy
    python tools/make_wikiqa_beir.py /work/.mirror/SiemensHalske+DataAlchemist/repo .data/wikiqa-beir.tar.xz

What is built, in BEIR's layout under `wikiqa/` (`corpus.jsonl`, `queries.jsonl`,
`qrels/train.tsv`, `qrels/test.tsv`):
- a document is one summary paragraph: the candidate sentences of a question, in their order,
  joined by spaces (BEIR's SciFact joins an abstract's sentences the same way). Paragraphs that
  several questions share are one document. Titles are left out: the copy of the train split has
  none, and a title on test documents only would favour them.
- a query is a question with at least one answering sentence (WikiQA's own evaluation keeps only
  those); its one relevant document is its paragraph. Train questions go to `qrels/train.tsv`,
  test questions to `qrels/test.tsv`, as WikiQA splits them.

The copy's train file has lost WikiQA's document ids (one id per row), so its paragraphs are the
runs of consecutive rows with the same question; the test file keeps them. The output is the same
bytes on every run (sorted nothing, ids in order of first appearance, archive times 0).
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import subprocess
import sys
import tarfile
from pathlib import Path

FILES = {"train": "data/WikiQA-train.tsv", "test": "data/WikiQA-test.tsv"}


def read_tsv(git_dir: Path, path: str) -> list[dict[str, str]]:
    """The rows of one WikiQA file, from the newest commit of the bare copy that holds it."""
    git = ["git", "--git-dir", str(git_dir)]
    commits = subprocess.run([*git, "rev-list", "--all", "--", path], capture_output=True, text=True,
                             check=True).stdout.split()
    # The newest commit that touched the file may be the one that deleted it.
    held = [c for c in commits if subprocess.run([*git, "cat-file", "-e", f"{c}:{path}"], capture_output=True).returncode == 0]
    if not held:
        sys.exit(f"{git_dir}: no commit holds {path}")
    text = subprocess.run([*git, "show", f"{held[0]}:{path}"], capture_output=True, text=True, check=True).stdout
    return list(csv.DictReader(io.StringIO(text), delimiter="\t", quoting=csv.QUOTE_NONE))


def paragraphs(rows: list[dict[str, str]]) -> list[tuple[str, str, bool]]:
    """(question, paragraph, answered) per question: its candidate sentences joined in order."""
    groups: list[tuple[str, list[str], bool]] = []
    for row in rows:
        # A question's candidates are consecutive rows; the test file also names their document.
        key = (row["Question"], row.get("DocumentID"))
        if not groups or groups[-1][0] != key:
            groups.append((key, [], False))
        groups[-1][1].append(row["Sentence"].strip())
        if row["Label"].strip() == "1":
            groups[-1] = (key, groups[-1][1], True)
    return [(key[0], " ".join(sentences), answered) for key, sentences, answered in groups]


def build(git_dir: Path) -> dict[str, str]:
    """The four BEIR files of the set, as text."""
    corpus: dict[str, str] = {}  # paragraph -> document id
    queries: list[tuple[str, str]] = []
    qrels = {split: ["query-id\tcorpus-id\tscore"] for split in FILES}
    for split, path in FILES.items():
        for question, paragraph, answered in paragraphs(read_tsv(git_dir, path)):
            doc = corpus.setdefault(paragraph, f"D{len(corpus)}")
            if answered:
                qid = f"Q{len(queries)}"
                queries.append((qid, question))
                qrels[split].append(f"{qid}\t{doc}\t1")
    return {
        "corpus.jsonl": "".join(json.dumps({"_id": d, "title": "", "text": p}) + "\n" for p, d in corpus.items()),
        "queries.jsonl": "".join(json.dumps({"_id": q, "text": t}) + "\n" for q, t in queries),
        **{f"qrels/{split}.tsv": "\n".join(lines) + "\n" for split, lines in qrels.items()},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("git_dir", type=Path, help="the bare git copy that fetch brought")
    parser.add_argument("out", type=Path, help="the archive to write (.tar.xz)")
    args = parser.parse_args()
    files = build(args.git_dir)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(args.out, "w:xz") as out:
        for name, text in files.items():
            data = text.encode("utf-8")
            info = tarfile.TarInfo(f"wikiqa/{name}")
            info.size, info.mtime = len(data), 0
            out.addfile(info, io.BytesIO(data))
    counts = {name: text.count("\n") for name, text in files.items()}
    print(f"{args.out}: {counts['corpus.jsonl']} documents, {counts['queries.jsonl']} queries, "
          f"{counts['qrels/train.tsv'] - 1} train and {counts['qrels/test.tsv'] - 1} test judgements")


if __name__ == "__main__":
    main()
