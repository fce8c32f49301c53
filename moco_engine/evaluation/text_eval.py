"""``moco-eval retrieval`` and ``moco-eval sts``: a text run's encoder on a BEIR split and on STS-B.

The embedding judged is the run's own: the backbone's pooled output (``eval.knn_features=head``:
after the projection head), scored by cosine when the run trains unit embeddings and by the dot
product with ``model.normalize=false`` (``retrieval.py``).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import nn

from moco_engine.config.schema import Config
from moco_engine.data.text.corpus import read_sts
from moco_engine.data.text.source import open_text, span_spec
from moco_engine.data.text.tokenizer import TextTokenizer
from moco_engine.data.text.views import TextPlain
from moco_engine.evaluation.retrieval import (
    bm25_run,
    by_length,
    encode_texts,
    retrieval_eval,
    retrieval_scores,
)
from moco_engine.method.encoders import Encoder, build_encoder
from moco_engine.runtime.precision import autocast_dtype, resolve_device


def judged_model(cfg: Config, encoder: Encoder) -> nn.Module:
    return encoder.backbone if cfg.eval.knn_features == "backbone" else encoder


def untrained(cfg: Config, input_shape: Any) -> Encoder:
    """The run's encoder as it started: built from ``train.seed`` as the Trainer builds f_q
    (a ``model.params.pretrained`` folder's weights, if the run started from one)."""
    torch.manual_seed(cfg.train.seed)
    return build_encoder(cfg.model, input_shape)


def evaluate_retrieval(cfg: Config, encoder: Encoder, tokenizer_json: str, input_shape: Any) -> dict[str, Any]:
    """nDCG@10, recall@100 and MRR@10 on the ``eval.split`` qrels of ``data.root`` for the run,
    BM25 and the untrained encoder; ``queries``: how many were judged."""
    device = resolve_device(cfg.train.device)
    dtype = autocast_dtype(cfg.train.precision, device)
    corpus = open_text(cfg.data, TextTokenizer.from_json(tokenizer_json))
    queries, qrels = corpus.data.split(cfg.eval.split)
    result: dict[str, Any] = {"split": cfg.eval.split, "queries": len(qrels), "data": corpus.data.source,
                              "max_length": cfg.data.text.max_length, "features": cfg.eval.knn_features}
    for name, net in (("run", encoder), ("untrained", untrained(cfg, input_shape))):
        result[name] = retrieval_eval(judged_model(cfg, net.to(device)), corpus, cfg.eval.split, cfg.eval.batch_size,
                                      net.normalize, device, dtype)
    result["bm25"] = retrieval_scores(qrels, bm25_run(corpus.data.corpus.joined(), corpus.data.corpus.ids, queries))
    return result


def spearman(x: np.ndarray, y: np.ndarray) -> float:
    """Spearman's rank correlation: Pearson's of the ranks, tied values given their mean rank."""

    def ranks(v: np.ndarray) -> np.ndarray:
        _, inverse, counts = np.unique(v, return_inverse=True, return_counts=True)
        last = np.cumsum(counts)  # the 1-based rank of each distinct value's last copy
        return (last - (counts - 1) / 2.0)[inverse]

    a, b = ranks(np.asarray(x, dtype=np.float64)), ranks(np.asarray(y, dtype=np.float64))
    a, b = a - a.mean(), b - b.mean()
    return float((a * b).sum() / np.sqrt((a * a).sum() * (b * b).sum()))


def evaluate_sts(cfg: Config, encoder: Encoder, tokenizer_json: str, input_shape: Any) -> dict[str, Any]:
    """Spearman correlation (×100, as SentEval and SBERT report it) of the cosine similarity
    of each STS-B pair of ``data.root``'s ``sts-<eval.split>.csv`` with its gold score, for the
    run and the untrained encoder."""
    device = resolve_device(cfg.train.device)
    dtype = autocast_dtype(cfg.train.precision, device)
    tokenizer = TextTokenizer.from_json(tokenizer_json)
    pairs = read_sts(cfg.data.root, cfg.eval.split)
    spec = span_spec(cfg.data, tokenizer)
    sentences = tokenizer.encode(pairs.first + pairs.second)
    result: dict[str, Any] = {"split": cfg.eval.split, "pairs": len(pairs.scores), "data": cfg.data.root}
    for name, net in (("run", encoder), ("untrained", untrained(cfg, input_shape))):
        batches = TextPlain(sentences, spec, cfg.eval.batch_size, cfg.data.text.max_length, device, by_length(sentences))
        emb = torch.nn.functional.normalize(encode_texts(judged_model(cfg, net.to(device)), batches, len(sentences),
                                                         device, dtype), dim=1)
        n = len(pairs.scores)
        cosine = (emb[:n] * emb[n:]).sum(1).cpu().numpy()
        result[name] = {"spearman": 100 * spearman(cosine, np.array(pairs.scores))}
    return result
