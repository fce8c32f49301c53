"""What a run encodes besides its steps: the monitor (kNN of the test split against the train
split; for text, retrieval on the ``eval.retrieval_split`` qrels) and the whole training set's
embeddings (the memory bank's refresh), each on a side stream of random numbers, so how often
they run never changes the training run."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from moco_engine.config.schema import EvalConfig
from moco_engine.data.loaders import Loaders
from moco_engine.evaluation.knn import encode_split, knn_monitor
from moco_engine.evaluation.pairs_eval import rank_pairs
from moco_engine.evaluation.retrieval import retrieval_eval
from moco_engine.runtime import distributed as dist
from moco_engine.runtime.precision import own_rng


class Monitor:
    """The encodings of one run on ``device`` under autocast to ``amp_dtype`` (None: fp32)."""

    def __init__(self, cfg: EvalConfig, loaders: Loaders, device: torch.device, amp_dtype: torch.dtype | None):
        self.cfg, self.loaders, self.device, self.amp_dtype = cfg, loaders, device, amp_dtype

    @property
    def active(self) -> bool:
        """Whether there is anything to monitor: a labelled test split, or queries judged in
        ``eval.retrieval_split``."""
        loaders = self.loaders
        if loaders.monitor == "retrieval":
            return self.cfg.retrieval_split in loaders.source.corpus.data.qrels
        if loaders.monitor == "pairs":
            return self.cfg.retrieval_split in loaders.source.ranked_splits()
        return loaders.test is not None

    def evaluate(self, encoder_q: nn.Module) -> dict[str, float]:
        """The run's monitor, as its source declares it: :meth:`retrieval`, :meth:`pairs` or :meth:`knn`."""
        monitor = self.loaders.monitor
        if monitor == "pairs":
            return self.pairs(encoder_q)
        return self.retrieval(encoder_q) if monitor == "retrieval" else self.knn(encoder_q)

    @torch.no_grad()
    def pairs(self, towers: nn.Module) -> dict[str, float]:
        """Image–text recall both ways and rsum on the ``eval.retrieval_split`` pairs (Karpathy's
        val; never the test split ``moco-eval pairs`` reports). Every rank computes it whole."""
        images, captions = self.loaders.source.ranked_pairs(self.cfg.retrieval_split, self.cfg.batch_size)
        with own_rng(self.device), dist.rank_mean_buffers(towers):
            return rank_pairs(towers, images, captions, self.cfg.batch_size, self.device, self.amp_dtype)

    @torch.no_grad()
    def retrieval(self, encoder_q: nn.Module) -> dict[str, float]:
        """nDCG@10, recall@100, MRR@10 on the ``eval.retrieval_split`` qrels ({} without them).
        Selection (the best of a run, a sweep's ranking) sees only this split, never the test
        split that ``moco-eval retrieval`` reports. Every rank computes it whole (the same
        weights give the same figures)."""
        text = self.loaders.source.corpus
        if self.cfg.retrieval_split not in text.data.qrels:
            return {}
        model = encoder_q.backbone if self.cfg.knn_features == "backbone" else encoder_q
        with own_rng(self.device):
            return retrieval_eval(model, text, self.cfg.retrieval_split, self.cfg.batch_size, encoder_q.normalize,
                                  self.device, self.amp_dtype)

    @torch.no_grad()
    def encode_train_set(self, key_encoder: nn.Module) -> Tensor:
        """Every training item's embedding (N, D) in index order, made as keys are: by the key
        encoder (end to end: f_q) with BatchNorm on batch statistics (in eval mode its barely
        trained running statistics would give embeddings a query could tell apart from keys)."""
        loaders = self.loaders
        with own_rng(self.device):
            return encode_split(key_encoder, loaders.plain_train_shard, loaders.num_items, self.device,
                                self.amp_dtype, batch_stats=True)[0]

    @torch.no_grad()
    def knn(self, encoder_q: nn.Module) -> dict[str, float]:
        """Weighted kNN (k, T from ``eval``) of the test split against the train split's features
        ({} without a labelled test split)."""
        loaders, cfg = self.loaders, self.cfg
        if loaders.test is None:
            return {}
        model = encoder_q.backbone if cfg.knn_features == "backbone" else encoder_q
        # Every rank encodes its shard with the same statistics: their mean, as checkpoints hold.
        with own_rng(self.device), dist.rank_mean_buffers(encoder_q):
            return knn_monitor(model, loaders.plain_train_shard, loaders.test_shard, loaders.num_items, loaders.num_test,
                               loaders.num_classes, cfg.knn_k, cfg.knn_t, self.device, self.amp_dtype)
