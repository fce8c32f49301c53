"""Retrieval and STS metrics against values computed by hand (and scipy), BM25's ranking, and
the dense ranking's rules (cosine or dot, BEIR's identical-id rule)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from moco_engine.evaluation.retrieval import bm25_run, dense_run, mrr_at, retrieval_scores
from moco_engine.evaluation.text_eval import spearman

QRELS = {"a": {"d1": 2, "d2": 1, "d3": 0}, "b": {"d5": 1}, "c": {"d1": 0}}
RUN = {"a": {"d2": 0.9, "d1": 0.8, "d4": 0.7, "d3": 0.6},
       "b": {"d6": 0.5, "d5": 0.5, "d7": 0.4},  # a tie: trec_eval puts the higher doc id first
       "c": {"d1": 0.3, "d2": 0.2}}


def test_ndcg_recall_and_mrr_equal_a_hand_computation():
    scores = retrieval_scores(QRELS, RUN)
    # a: gains 1, 2, 0, 0 at ranks 1-4 (trec_eval's gain is the grade), ideal 2, 1, 0.
    ndcg_a = (1 / math.log2(2) + 2 / math.log2(3)) / (2 / math.log2(2) + 1 / math.log2(3))
    # b: d6 and d5 tie at 0.5; trec_eval orders ties by doc id, descending: d6 first, d5 second.
    ndcg_b = (1 / math.log2(3)) / 1
    # c: no relevant document: 0, and it still counts in the mean (as BEIR averages).
    assert scores["ndcg@10"] == pytest.approx((ndcg_a + ndcg_b + 0) / 3, abs=1e-6)
    assert scores["recall@100"] == pytest.approx((1 + 1 + 0) / 3, abs=1e-6)
    # BEIR's MRR: the first grade > 0 document among the 10 best-scored: a at rank 1, b at rank 2.
    assert scores["mrr@10"] == pytest.approx((1 + 1 / 2 + 0) / 3)


def test_mrr_breaks_ties_in_ranking_order_and_stops_at_k():
    assert mrr_at({"b": {"d5": 1}}, {"b": {"d5": 0.5, "d6": 0.5}}) == 1.0  # Python's stable sort: d5 first
    far = {"q": {f"x{i}": 1.0 - i / 100 for i in range(20)}}
    assert mrr_at({"q": {"x10": 1}}, far, k=10) == 0.0 and mrr_at({"q": {"x9": 1}}, far, k=10) == 1 / 10
    assert mrr_at({"q": {"x0": 1}, "r": {"y": 1}}, far) == 1 / 2  # divided by every judged query


def test_dense_ranking_drops_a_document_with_the_querys_own_id_and_keeps_k():
    docs = torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [0.5, 0.5]])
    run = dense_run(torch.tensor([[1.0, 0.0]]), docs, ["d0"], ["d0", "d1", "d2", "d3"], cosine=True, k=2)
    assert list(run["d0"]) == ["d1", "d3"]  # d0 (its own id) dropped, then the best two
    assert run["d0"]["d1"] == pytest.approx(0.9 / math.hypot(0.9, 0.1))
    dot = dense_run(torch.tensor([[2.0, 0.0]]), docs * torch.tensor([[1.0], [1.0], [1.0], [3.0]]), ["q"],
                    ["d0", "d1", "d2", "d3"], cosine=False, k=1)
    assert dot == {"q": {"d3": 3.0}}  # 2 x 1.5 = 3 beats 2 x 1 by the dot product, not by cosine


def test_bm25_ranks_the_document_sharing_the_rare_stemmed_term_first():
    docs = ["Mice were fed cheese daily.", "Cats chase the mouse.", "The dogs barked at cats."]
    run = bm25_run(docs, ["d1", "d2", "d3"], {"q1": "feeding mice", "q2": "barking dogs"})
    assert next(iter(run["q1"])) == "d1" and next(iter(run["q2"])) == "d3"  # mice ~ mice, barking ~ barked


def test_spearman_equals_scipys_with_ties():
    from scipy.stats import spearmanr

    rng = np.random.default_rng(0)
    x = rng.integers(0, 6, 200).astype(float)  # many ties
    y = x + rng.normal(0, 2, 200)
    assert spearman(x, y) == pytest.approx(spearmanr(x, y).statistic, abs=1e-12)
    assert spearman(np.array([1.0, 2, 3]), np.array([3.0, 2, 1])) == pytest.approx(-1.0)
