"""Retrieval: encoding a corpus and its queries, ranking, and BEIR's metrics; BM25 beside them.

As BEIR evaluates dense retrievers (beir-cellar/beir: ``retrieval/search/dense/exact_search.py``,
``retrieval/evaluation.py``, ``retrieval/custom_metrics.py``):

- a document is its title and text joined by a space; documents and queries are encoded by the
  same model and ranked by the score the run trains with (cosine for unit embeddings, the dot
  product with ``model.normalize=false``), the top 100 kept per query (101 before a document whose
  id equals the query's is dropped: BEIR's ``ignore_identical_ids``, on by default);
- nDCG@10 and recall@100 are trec_eval's (``pytrec_eval``: graded gains, the log2 discount, ties
  ordered as trec_eval orders them), averaged over the judged queries;
- MRR@10 is BEIR's ``mrr``: 1/rank of the first document with grade > 0 among each query's 10
  best-scored (ties in the order of the ranking), summed and divided by the number of judged
  queries.

BM25 is the ``bm25s`` library's (Lucene's variant with its defaults, k1 1.5, b 0.75) over English-stemmed
tokens without stop words; BEIR's own BM25 runs Elasticsearch, which this machine has not.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from moco_engine.runtime.batches import to_device
from moco_engine.runtime.precision import autocast

METRICS = ("ndcg@10", "recall@100", "mrr@10")
TOP_K = 100


@torch.no_grad()
def encode_texts(model: nn.Module, batches: Iterable, n: int, device: torch.device,
                 dtype: torch.dtype | None = None) -> Tensor:
    """``model``'s embeddings (n, D) float32 of the ``(x, targets, indices)`` batches, in eval
    mode, placed by index (the batches may come in any order)."""
    was_training = model.training
    model.eval()
    out: Tensor | None = None
    try:
        for x, _, idx in batches:
            with autocast(device, dtype):
                emb = model(to_device(x, device)).float()
            if out is None:
                out = torch.zeros(n, emb.shape[1], device=device)
            out[idx.to(device)] = emb
    finally:
        model.train(was_training)
    assert out is not None
    return out


def by_length(docs: list[list[int]]) -> list[int]:
    """Indices of ``docs`` longest first: batches of similar lengths pad little."""
    return sorted(range(len(docs)), key=lambda i: -len(docs[i]))


def dense_run(queries: Tensor, docs: Tensor, query_ids: list[str], doc_ids: list[str], cosine: bool,
              k: int = TOP_K, block: int = 256) -> dict[str, dict[str, float]]:
    """The k best documents of each query by cosine or dot product, identical ids dropped:
    {qid: {doc id: score}} in descending order. queries (Q, D), docs (N, D)."""
    if cosine:
        queries, docs = F.normalize(queries, dim=1), F.normalize(docs, dim=1)
    run: dict[str, dict[str, float]] = {}
    take = min(k + 1, docs.shape[0])
    for start in range(0, len(query_ids), block):
        scores, top = (queries[start : start + block] @ docs.t()).topk(take, dim=1)
        for qid, row_scores, row in zip(query_ids[start : start + block], scores.tolist(), top.tolist()):
            ranked = {doc_ids[j]: s for j, s in zip(row, row_scores) if doc_ids[j] != qid}
            run[qid] = dict(list(ranked.items())[:k])
    return run


def mrr_at(qrels: dict[str, dict[str, int]], run: dict[str, dict[str, float]], k: int = 10) -> float:
    """BEIR's MRR@k (``custom_metrics.mrr``): over judged queries, 1/rank of the first relevant
    (grade > 0) document in the k best-scored, 0 if none; divided by the number of judged queries."""
    total = 0.0
    for qid, scores in run.items():
        relevant = {d for d, g in qrels.get(qid, {}).items() if g > 0}
        hits = sorted(scores.items(), key=lambda item: item[1], reverse=True)[:k]  # stable: ties keep their order
        total += next((1.0 / (rank + 1) for rank, (d, _) in enumerate(hits) if d in relevant), 0.0)
    return total / max(len(qrels), 1)


def retrieval_scores(qrels: dict[str, dict[str, int]], run: dict[str, dict[str, float]]) -> dict[str, float]:
    """nDCG@10 and recall@100 (pytrec_eval, as BEIR) and MRR@10, each in [0, 1]."""
    import pytrec_eval

    evaluator = pytrec_eval.RelevanceEvaluator(qrels, {"ndcg_cut.10", "recall.100"})
    per_query = evaluator.evaluate(run)
    n = max(len(per_query), 1)
    return {"ndcg@10": sum(s["ndcg_cut_10"] for s in per_query.values()) / n,
            "recall@100": sum(s["recall_100"] for s in per_query.values()) / n,
            "mrr@10": mrr_at(qrels, run, 10)}


def bm25_run(doc_texts: list[str], doc_ids: list[str], queries: dict[str, str],
             k: int = TOP_K) -> dict[str, dict[str, float]]:
    """BM25's k best documents per query (bm25s, English stemming, English stop words removed)."""
    import bm25s
    import Stemmer

    stemmer = Stemmer.Stemmer("english")
    retriever = bm25s.BM25()
    retriever.index(bm25s.tokenize(doc_texts, stopwords="en", stemmer=stemmer, show_progress=False), show_progress=False)
    qids = list(queries)
    tokens = bm25s.tokenize([queries[q] for q in qids], stopwords="en", stemmer=stemmer, show_progress=False)
    top, scores = retriever.retrieve(tokens, k=min(k + 1, len(doc_ids)), show_progress=False)
    run = {}
    for qid, row, row_scores in zip(qids, top.tolist(), scores.tolist()):
        ranked = {doc_ids[j]: float(s) for j, s in zip(row, row_scores) if doc_ids[j] != qid}
        run[qid] = dict(list(ranked.items())[:k])
    return run


def retrieval_eval(model: nn.Module, corpus, split: str, batch_size: int, cosine: bool, device: torch.device,
                   dtype: torch.dtype | None = None) -> dict[str, float]:
    """nDCG@10, recall@100 and MRR@10 of ``model`` on the queries judged in ``split`` of a text
    source's corpus (``data/text/source.TextCorpus``): documents truncated at
    ``data.text.max_length`` tokens, queries at ``query_max_length``.

    Raises:
        DataError: the corpus has no qrels of that split.
    """
    from moco_engine.data.text.views import TextPlain

    queries, qrels = corpus.data.split(split)
    qids = list(queries)
    query_tokens = corpus.tokenizer.encode([queries[q] for q in qids])
    spec, lengths = corpus.spec, corpus.lengths
    docs = encode_texts(model, TextPlain(corpus.docs, spec, batch_size, lengths[0], device, by_length(corpus.docs)),
                        len(corpus.docs), device, dtype)
    asked = encode_texts(model, TextPlain(query_tokens, spec, batch_size, lengths[1], device, by_length(query_tokens)),
                         len(qids), device, dtype)
    return retrieval_scores(qrels, dense_run(asked, docs, qids, corpus.data.corpus.ids, cosine))
