"""The text data: BEIR and plain corpora read in place, bad input named, the tokenizer's
determinism, and Contriever's span views against their specification."""

from __future__ import annotations

import json
import subprocess
import sys
import tarfile

import pytest
import torch
from conftest import SHARED_DATA

from moco_engine.data.errors import DataError
from moco_engine.data.sampling import EpochSampler
from moco_engine.data.text.corpus import read_sts, read_text_data
from moco_engine.data.text.source import EMBEDDED_TEXT
from moco_engine.data.text.tokenizer import TextTokenizer, load_tokenizer, train_wordpiece
from moco_engine.data.text.views import (
    SpanSpec,
    TextTwoViews,
    TokenStream,
    item_keys,
    span_views,
    uniform,
)

DOCS = [{"_id": "d1", "title": "Mice", "text": "Mice eat cheese."}, {"_id": "d2", "title": "", "text": "Cats chase mice."},
        {"_id": "d3", "title": "Dogs", "text": "Dogs bark at cats."}]
QUERIES = [{"_id": "q1", "text": "what do mice eat"}, {"_id": "q2", "text": "who chases mice"}]


def beir_folder(root, corpus=None, qrels="query-id\tcorpus-id\tscore\nq1\td1\t1\nq2\td2\t2\n"):
    root.mkdir(parents=True, exist_ok=True)
    (root / "corpus.jsonl").write_text(corpus if corpus is not None else "\n".join(json.dumps(d) for d in DOCS) + "\n")
    (root / "queries.jsonl").write_text("\n".join(json.dumps(q) for q in QUERIES) + "\n")
    (root / "qrels").mkdir(exist_ok=True)
    (root / "qrels" / "test.tsv").write_text(qrels)
    return root


def test_a_beir_folder_and_an_archive_with_one_top_folder_read_alike(tmp_path):
    folder = beir_folder(tmp_path / "mini")
    archive = tmp_path / "mini.tar.xz"
    with tarfile.open(archive, "w:xz") as tar:
        tar.add(folder, arcname="mini")
    for path in (folder, archive):
        data = read_text_data(path)
        assert data.corpus.ids == ["d1", "d2", "d3"]
        assert data.corpus.joined() == ["Mice Mice eat cheese.", "Cats chase mice.", "Dogs Dogs bark at cats."]
        queries, qrels = data.split("test")
        assert queries == {"q1": "what do mice eat", "q2": "who chases mice"} and qrels == {"q1": {"d1": 1}, "q2": {"d2": 2}}
    with pytest.raises(DataError, match=r"no qrels/train.tsv \(its qrels splits: test\)"):
        data.split("train")


def test_the_shared_scifact_and_the_embedded_sample_hold_what_their_readmes_say():
    sample = read_text_data(EMBEDDED_TEXT)
    assert len(sample.corpus) == 600 and {k: len(v) for k, v in sample.qrels.items()} == {"test": 150, "train": 150}
    if not (SHARED_DATA / "scifact-beir.tar.xz").exists():
        pytest.skip("no ../shared/data")
    data = read_text_data(SHARED_DATA / "scifact-beir.tar.xz")
    assert len(data.corpus) == 5183 and len(data.queries) == 1109
    assert {k: len(v) for k, v in data.qrels.items()} == {"test": 300, "train": 809}
    assert sum(len(v) for v in data.qrels["test"].values()) == 339


def test_plain_corpora_one_document_a_line_or_a_text_field(tmp_path, capsys):
    (tmp_path / "c.txt").write_text("first document\n\nsecond document\n")
    corpus = read_text_data(tmp_path / "c.txt").corpus
    assert corpus.texts == ["first document", "second document"] and corpus.ids == ["1", "3"]
    assert "1 empty document(s) left out (line 2)" in capsys.readouterr().err
    (tmp_path / "c.jsonl").write_text('{"text": "a b", "title": "T"}\n{"text": "c d"}\n')
    assert read_text_data(tmp_path / "c.jsonl").corpus.joined() == ["T a b", "c d"]


@pytest.mark.fault("data")
@pytest.mark.parametrize("corpus,qrels,message", [
    ('{"_id": "d1", "text": "x"}\n{"_id": "d2", "text": \n', None, r"corpus.jsonl, line 2: not valid JSON"),
    ('{"_id": "d1", "text": "x"}\n{"_id": "d2"}\n', None, r"corpus.jsonl, line 2: no 'text' field"),
    (b'{"_id": "d1", "text": "caf\xe9"}\n', None, r"corpus.jsonl, line 1: not UTF-8 text"),
    (None, "query-id\tcorpus-id\tscore\nq7\td1\t1\n", r"qrels/test.tsv, line 2: query id 'q7' is not in queries.jsonl"),
    (None, "query-id\tcorpus-id\tscore\nq1 d1 1\n", r"qrels/test.tsv, line 2: expected 'query-id<TAB>corpus-id<TAB>score'"),
    # Issue 35: a file without its header (its first pair was skipped), a line with a fourth column.
    (None, "q1\td1\t1\n", r"qrels/test.tsv, line 1: a judgement where BEIR's header 'query-id<TAB>corpus-id<TAB>score'"),
    (None, "query-id\tcorpus-id\tscore\nq1\td1\t1\tx\n", r"qrels/test.tsv, line 2: .*got 4 field\(s\)"),
    ('{"_id": "d1", "text": "x"}\n{"_id": "d1", "text": "y"}\n', None, r"document id 'd1' appears more than once"),
    ("\n", None, r"corpus.jsonl: no documents"),
])
def test_bad_text_input_is_one_line_naming_file_and_line(tmp_path, corpus, qrels, message):
    root = beir_folder(tmp_path / "bad", qrels=qrels or "query-id\tcorpus-id\tscore\n")
    if corpus is not None:
        (root / "corpus.jsonl").write_bytes(corpus if isinstance(corpus, bytes) else corpus.encode())
    with pytest.raises(DataError, match=message):
        read_text_data(root).qrels["test"]  # a split's qrels are read when first asked for


@pytest.mark.fault("data")
def test_moco_train_names_a_malformed_line_in_one_line_and_exits_2(tmp_path):
    root = beir_folder(tmp_path / "bad")
    (root / "corpus.jsonl").write_text('{"_id": "d1", "text": "x"}\n{"_id": "d2", "text": \n')
    r = subprocess.run([sys.executable, "-m", "moco_engine", "data.name=text", f"data.root={root}", "model.arch=bert",
                        f"train.out_dir={tmp_path / 'run'}", "track.progress=false"], capture_output=True, text=True)
    lines = [x for x in r.stderr.strip().splitlines() if not x.startswith("warning:")]
    assert r.returncode == 2 and len(lines) == 1 and "Traceback" not in r.stderr, r.stderr
    assert "corpus.jsonl, line 2: not valid JSON" in lines[0]


def test_sts_b_is_read_by_column_with_extra_fields_and_quotes_as_text(tmp_path):
    (tmp_path / "sts-test.csv").write_text(
        'main-captions\tMSRvid\t2012test\t0001\t2.5\tA girl is "styling" her hair.\tA girl is brushing her hair.\n'
        "main-news\theadlines\t2015\t0002\t0.4\tOne\tTwo\tsource note\textra\n")
    pairs = read_sts(tmp_path / "sts-test.csv")
    assert pairs.first == ['A girl is "styling" her hair.', "One"] and pairs.second[1] == "Two"
    assert pairs.scores == [2.5, 0.4]
    (tmp_path / "sts-dev.csv").write_text("genre\tfile\tyear\n")
    with pytest.raises(DataError, match=r"sts-dev.csv, line 1: expected 7 tab-separated fields"):
        read_sts(tmp_path / "sts-dev.csv")
    if (SHARED_DATA / "stsbenchmark.tar.xz").exists():
        assert len(read_sts(SHARED_DATA / "stsbenchmark.tar.xz").scores) == 1379


def test_the_wordpiece_tokenizer_is_deterministic_and_round_trips_through_json(tmp_path):
    texts = read_text_data(EMBEDDED_TEXT).corpus.joined()[:200]
    first, second = train_wordpiece(texts, 1000), train_wordpiece(texts, 1000)
    assert first.json == second.json  # huggingface/tokenizers#1794 made this fail one time in two
    assert first.vocab_size == 1000 and (first.pad_id, first.cls_id, first.sep_id, first.mask_id) == (0, 2, 3, 4)
    first.save(tmp_path)
    loaded = load_tokenizer(tmp_path / "tokenizer.json")
    assert loaded.json == first.json and loaded.encode(texts[:3]) == first.encode(texts[:3])
    assert load_tokenizer(tmp_path).json == first.json  # a folder holding tokenizer.json
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="neither tokenizer.json nor vocab.txt"):
        load_tokenizer(tmp_path / "empty")
    (tmp_path / "bad.json").write_text("{}")
    with pytest.raises(DataError, match="not a tokenizers JSON file"):
        load_tokenizer(tmp_path / "bad.json")


def test_the_continuation_tokens_come_from_the_corpus_characters_as_whole_texts_normalise_them():
    """Normalising each distinct character gives the characters of the normalised texts: accents
    as combining marks and precomposed, CJK, control characters, a final sigma, dotted capital I."""
    from tokenizers import normalizers

    from moco_engine.data.text.tokenizer import distinct_chars

    texts = ["Cafe\u0301 CAFÉ naïve", "中文字 ΟΔΟΣ İstanbul", "tab\there\x07bell\u200bzero-width", "Ångström ﬁ ½"]
    texts += read_text_data(EMBEDDED_TEXT).corpus.joined()[:200]
    for lowercase in (True, False):
        norm = normalizers.BertNormalizer(lowercase=lowercase, strip_accents=lowercase)
        whole = {c for text in texts for c in norm.normalize_str(text) if not c.isspace()}
        each = {c for char in distinct_chars(texts) for c in norm.normalize_str(char) if not c.isspace()}
        assert each == whole
        assert ({"\u0301", "É", "İ"} & whole == set()) == lowercase  # stripped and lower-cased, or kept
    vocab = train_wordpiece(texts, 1000).backend().get_vocab()
    assert {"##中", "##σ", "##e", "##½"} <= set(vocab) and "##\x07" not in vocab


def test_a_vocab_txt_folder_gives_berts_special_ids(tmp_path):
    (tmp_path / "vocab.txt").write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "mice", "eat", "##s"]))
    tok = load_tokenizer(tmp_path)
    assert isinstance(tok, TextTokenizer) and tok.encode(["Mice eats"]) == [[5, 6, 7]]


# ------------------------------------------------------------------------------------ views
SPEC = SpanSpec(0.1, 0.5, 0.1, 0.0, 0.0, cls_id=2, sep_id=3, pad_id=0, mask_id=4, vocab_size=1000, first_regular=5)


def stream(n_docs=40, doc_len=300, chunk=64, within=False):
    return TokenStream([list(range(5, 5 + doc_len))] * n_docs, chunk, within, torch.device("cpu"))


def views_of(items, spec=SPEC, s=None, epoch=0, view=0, seed=0):
    s = s or stream()
    starts, lengths = s.chunks(seed, epoch)
    return span_views(s.ids, starts[items], lengths[items], item_keys(seed, epoch, items), view, spec, s.chunk_length)


def test_the_hashed_uniforms_are_uniform_and_independent_per_slot():
    u = uniform(item_keys(0, 0, torch.arange(20000)), torch.arange(3))
    assert u.min() >= 0 and u.max() < 1
    assert abs(u.mean().item() - 0.5) < 0.005 and abs(u.var().item() - 1 / 12) < 0.002
    assert abs(torch.corrcoef(u.t())[0, 1].item()) < 0.03
    assert not torch.equal(uniform(item_keys(0, 1, torch.arange(5)), torch.arange(3)), u[:5])  # another epoch
    assert not torch.equal(uniform(item_keys(1, 0, torch.arange(5)), torch.arange(3)), u[:5])  # another seed


def test_span_lengths_follow_int_n_times_uniform_ratio_and_spans_lie_in_their_chunk():
    s = stream()
    items = torch.arange(s.num_chunks).repeat(40)
    x = views_of(items, SpanSpec(0.1, 0.5, 0.0, 0.0, 0.0, 2, 3, 0, 4, 1000, 5), s)
    n = x["attention_mask"].sum(1) - 2
    # floor(64 U) for U ~ U(0.1, 0.5): mean 64 * 0.3 - 1/2 (the floor), values 6 ... 31
    assert abs(n.double().mean().item() - (64 * 0.3 - 0.5)) < 0.3 and n.min() >= 6 and n.max() <= 31
    ids = x["input_ids"]
    assert (ids[:, 0] == 2).all() and (ids.gather(1, (n + 1)[:, None]) == 3).all()
    # Without deletion a span is consecutive tokens of its chunk.
    starts = s.chunks(0, 0)[0][items]
    assert ((ids[:, 1] - 5 - starts % 300) % 300 < 64).all()
    body = [row[1 : k + 1] for row, k in zip(ids.tolist(), n.tolist())]
    # the stream's next token: +1 within a document, 304 -> 5 across two
    assert all(b == [5 + (b[0] - 5 + j) % 300 for j in range(len(b))] for b in body)
    assert (x["input_ids"][x["attention_mask"] == 0] == 0).all()


def test_deletion_replacement_and_masking_take_their_rates_exclusively():
    items = torch.arange(stream().num_chunks).repeat(60)
    plain = views_of(items, SpanSpec(0.5, 0.5, 0.0, 0.0, 0.0, 2, 3, 0, 4, 1000, 5))
    noisy = views_of(items, SpanSpec(0.5, 0.5, 0.1, 0.2, 0.15, 2, 3, 0, 4, 1000, 5))
    kept = noisy["attention_mask"].sum() - 2 * len(items)
    total = plain["attention_mask"].sum() - 2 * len(items)
    assert abs(1 - kept / total - 0.1) < 0.01
    body = noisy["input_ids"][:, 1:][noisy["attention_mask"][:, 1:] == 1]
    body = body[body != 3]
    masked = (body == 4).double().mean().item()
    replaced = (body >= 305).double().mean().item()  # drawn outside the chunks' ids 5 ... 304
    assert abs(masked - 0.15 / 0.9) < 0.01  # of the kept tokens: 0.15 of all
    assert abs(replaced - 0.2 / 0.9 * 695 / 995) < 0.01  # drawn from 5 ... 999, 695 of them outside
    assert (body != 0).all() and (body != 2).all()  # no special token drawn


def test_a_view_depends_on_seed_epoch_and_item_only():
    items = torch.tensor([7, 3, 11, 40])
    alone = [views_of(torch.tensor([i])) for i in items]
    together = views_of(items)
    for k, one in enumerate(alone):
        width = int(one["attention_mask"].sum())
        assert torch.equal(together["input_ids"][k, :width], one["input_ids"][0, :width])
    assert not torch.equal(views_of(items, view=1)["input_ids"], together["input_ids"])
    assert not torch.equal(views_of(items, epoch=1)["input_ids"], together["input_ids"])


def test_the_stream_is_cut_from_a_random_offset_each_epoch_into_a_fixed_number_of_chunks():
    s = stream(n_docs=10, doc_len=100, chunk=64)  # 1000 tokens: 1000 // 64 - 1 = 14 chunks
    offsets = {int(s.chunks(0, e)[0][0]) for e in range(30)}
    assert s.num_chunks == 14 and len(offsets) > 10 and max(offsets) < 64
    for e in range(30):
        starts, lengths = s.chunks(0, e)
        assert int(starts[-1] + lengths[-1]) <= 1000 and len(starts) == 14
    inside = TokenStream([list(range(100)), list(range(30))], 64, True, torch.device("cpu"))
    starts, lengths = inside.chunks(0, 3)
    assert starts.tolist() == [0, 64, 100] and lengths.tolist() == [64, 36, 30]


def test_training_batches_follow_the_sampler_and_resume_mid_epoch_alike():
    s = stream()
    sampler = EpochSampler(s.num_chunks, seed=0)
    loader = TextTwoViews(s, SPEC, 16, sampler, seed=0)
    sampler.set_epoch(1)
    whole = list(loader)
    sampler.set_epoch(1, skip=32)
    rest = list(loader)
    assert len(whole) == len(loader) == s.num_chunks // 16 and len(rest) == len(whole) - 2
    for (va, _, ia), (vb, _, ib) in zip(whole[2:], rest):
        assert torch.equal(ia, ib) and torch.equal(va[0]["input_ids"], vb[0]["input_ids"])
        assert torch.equal(va[1]["attention_mask"], vb[1]["attention_mask"])
    fixed = TextTwoViews(s, SPEC, 16, sampler, seed=0, width=SPEC.max_width(64))
    (q, _), _, _ = next(iter(fixed))
    assert q["input_ids"].shape == (16, 34)


@pytest.mark.fault("data")
def test_queries_that_are_all_empty_are_one_line(tmp_path):
    """Issue 35: a queries.jsonl whose every text is empty was trained and evaluated on."""
    root = beir_folder(tmp_path / "empty")
    (root / "queries.jsonl").write_text("\n".join(json.dumps({"_id": q["_id"], "text": " "}) for q in QUERIES) + "\n")
    with pytest.raises(DataError, match=r"queries.jsonl: every one of its 2 queries is empty"):
        read_text_data(root)
    # A null text is an empty query, as a null title or text is an empty document: not the word "None".
    (root / "queries.jsonl").write_text("\n".join(json.dumps({"_id": q["_id"], "text": None}) for q in QUERIES) + "\n")
    with pytest.raises(DataError, match=r"queries.jsonl: every one of its 2 queries is empty"):
        read_text_data(root)


def test_what_beir_reads_this_reads(tmp_path, capsys):
    """Issue 35, as BEIR's GenericDataLoader reads a set: tab-separated qrels after a header, ids as
    strings (numeric ones too), a title that may be missing, empty documents kept (and judged),
    a judged corpus id the corpus lacks kept as a relevant document never retrieved, and only the
    qrels split in use read (a fault in another split does not stop a run)."""
    from moco_engine.evaluation.retrieval import bm25_run, retrieval_scores

    root = tmp_path / "beir"
    (root / "qrels").mkdir(parents=True)
    docs = [{"_id": "995", "title": "", "text": ""}, {"_id": "7", "text": "mice eat cheese and grain"},
            {"_id": "8", "title": "Cats", "text": "cats chase mice"}]
    (root / "corpus.jsonl").write_text("\n".join(json.dumps(d) for d in docs) + "\n")
    (root / "queries.jsonl").write_text(json.dumps({"_id": "1", "text": "what do mice eat"}) + "\n"
                                        + json.dumps({"_id": "2", "text": "the empty one"}) + "\n")
    (root / "qrels" / "test.tsv").write_text("query-id\tcorpus-id\tscore\n1\t7\t1\n2\t995\t1\n2\t404\t1\n")
    (root / "qrels" / "dev.tsv").write_text("query-id\tcorpus-id\tscore\n1 7 1\n")  # broken: read only when asked for
    data = read_text_data(root)
    assert data.corpus.ids == ["995", "7", "8"] and data.corpus.joined() == ["", "mice eat cheese and grain", "Cats cats chase mice"]
    assert "1 empty document(s) kept (retrievable; no tokens to train on) (line 1)" in capsys.readouterr().err
    queries, qrels = data.split("test")
    assert qrels == {"1": {"7": 1}, "2": {"995": 1, "404": 1}}
    assert "1 judgement(s) of documents not in corpus.jsonl, kept and counted as never retrieved (line 4: corpus id '404')" \
        in capsys.readouterr().err
    run = bm25_run(data.corpus.joined(), data.corpus.ids, queries)
    scores = retrieval_scores(qrels, run)
    assert run["1"] and scores["recall@100"] < 1  # "404" can never be retrieved: counted as missed
    with pytest.raises(DataError, match="dev.tsv, line 2"):
        data.split("dev")
