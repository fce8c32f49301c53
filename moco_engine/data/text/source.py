"""The text source, ``data.name=text``: a corpus (and, for BEIR data, its queries and qrels),
its tokenizer, and its chunks as the items.

``data.root`` is a BEIR folder or archive, a ``.txt`` or a ``.jsonl`` (``corpus.py``); empty, the
SciFact sample shipped in the package (``assets/scifact_sample.tar.xz``: its abstracts are
ODC-By 1.0, its claims CC BY 4.0, from allenai/scifact through BEIR). Pretraining reads the
documents only; the queries and qrels serve the retrieval monitor and ``moco-eval retrieval``.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from moco_engine.config.loading import differing_values, to_dict
from moco_engine.config.schema import Config, DataConfig
from moco_engine.data.errors import DataError
from moco_engine.data.items import ItemSet, Splits
from moco_engine.data.loaders import Loaders, epoch_sampler, steps_per_epoch, whole_and_shard
from moco_engine.data.sources import DataSource, SavedStateMisfit, register_data_source
from moco_engine.data.text.corpus import TextData, read_text_data
from moco_engine.data.text.tokenizer import TextTokenizer, load_tokenizer, train_wordpiece
from moco_engine.data.text.views import ChunkPlain, SpanSpec, TextTwoViews, TokenStream

EMBEDDED_TEXT = Path(__file__).parents[2] / "assets" / "scifact_sample.tar.xz"
# A document's tokens beyond this are cut (with a warning): one of millions of tokens would
# otherwise fill the stream, and the memory bank, with chunks of itself.
MAX_DOCUMENT_TOKENS = 100_000


@dataclass
class TextCorpus:
    """What the text source hands the loaders and the retrieval evaluation.

    Attributes:
        data: the documents, queries and qrels as read.
        tokenizer: the run's tokenizer.
        docs: each document's token ids (title and text joined, no special tokens).
        stream: the documents' ids as one stream and its chunks (on the CPU until the loaders move it).
        spec: how views are cut, with the tokenizer's special ids.
        lengths: the evaluation's truncation of documents and of queries, in tokens.
    """

    data: TextData
    tokenizer: TextTokenizer
    docs: list[list[int]]
    stream: TokenStream
    spec: SpanSpec
    lengths: tuple[int, int] = (256, 256)

    def state(self) -> dict[str, Any]:
        """What a checkpoint keeps of the source: the tokenizer, as JSON (a resume and
        ``moco-eval`` read the corpus with it)."""
        return {"tokenizer": self.tokenizer.json}

    def misfit(self, saved: dict[str, Any]) -> str | None:
        """Why a checkpoint's state ``saved`` cannot continue with this corpus (another tokenizer:
        the same ids would mean other words), or None."""
        return tokenizer_misfit(saved, self.tokenizer)


def tokenizer_misfit(saved: dict[str, Any], tokenizer: TextTokenizer) -> str | None:
    """Why a checkpoint's state ``saved`` cannot continue with ``tokenizer`` (another one: the
    same ids would mean other words), or None."""
    theirs = saved.get("tokenizer")
    if theirs == tokenizer.json:
        return None
    sizes = [len(json.loads(t)["model"]["vocab"]) if t else 0 for t in (theirs, tokenizer.json)]
    return (f"was trained with another tokenizer than this run's (vocabulary of {sizes[0]} tokens, here "
            f"{sizes[1]}; data.text.* or data.root changed): resume with the settings it was trained with")


#: The settings that make a trained tokenizer (data/text/tokenizer.py): a resume keeps its
#: checkpoint's only when they are unchanged.
TOKENIZER_SETTINGS = ("data.text.tokenizer", "data.text.vocab_size", "data.text.lowercase")


def resumed_tokenizer(cfg: Config, saved: dict[str, Any]) -> str | None:
    """The tokenizer (JSON) a resumed text run continues with: its checkpoint's (``saved``, a
    snapshot), so a resume never trains one again (another ``tokenizers`` release could give
    other ids). None: the config names a tokenizer (read as named, then compared), or the
    checkpoint holds none.

    Raises:
        SavedStateMisfit: the checkpoint's tokenizer was made with other :data:`TOKENIZER_SETTINGS`
            than this config's (named).
    """
    if cfg.data.text.tokenizer or not saved.get("tokenizer"):
        return None
    changed = differing_values(saved["config"], to_dict(cfg), TOKENIZER_SETTINGS)
    if changed:
        raise SavedStateMisfit(f"was trained with another tokenizer than this run's ({'; '.join(changed)}): resume "
                          "with the settings it was trained with")
    return saved["tokenizer"]


class Chunks(ItemSet):
    """The N chunks of the token stream as items (unlabelled); their views are made batched
    (``views.TextTwoViews``), so items are never loaded one by one."""

    def __init__(self, n: int):
        self.targets, self.classes = [-1] * n, []

    def load(self, i: int):
        raise TypeError("text chunks are viewed in batches on the device (data/text/views.py), not loaded one by one")


def span_spec(cfg: DataConfig, tokenizer: TextTokenizer) -> SpanSpec:
    t = cfg.text
    return SpanSpec(t.ratio_min, t.ratio_max, t.deletion, t.replacement, t.masking, tokenizer.cls_id, tokenizer.sep_id,
                    tokenizer.pad_id, tokenizer.mask_id, tokenizer.vocab_size, max(tokenizer.special_ids) + 1)


def open_text(cfg: DataConfig, tokenizer: TextTokenizer | None = None) -> TextCorpus:
    """Read ``data.root`` and tokenize it (with ``tokenizer``, else the configured one).

    Raises:
        DataError: unreadable data (``corpus.py``), a tokenizer that cannot be read, or fewer
            tokens than two chunks.
    """
    data = read_text_data(cfg.root or EMBEDDED_TEXT)
    t = cfg.text
    texts = data.corpus.joined()
    if tokenizer is None:
        tokenizer = load_tokenizer(t.tokenizer, t.lowercase) if t.tokenizer else train_wordpiece(texts, t.vocab_size, t.lowercase)
    docs = tokenizer.encode(texts)
    long = [i for i, d in enumerate(docs) if len(d) > MAX_DOCUMENT_TOKENS]
    if long:
        print(f"warning: {data.source}: {len(long)} document(s) over {MAX_DOCUMENT_TOKENS:,} tokens cut there "
              f"(document {data.corpus.ids[long[0]]!r}: {len(docs[long[0]]):,} tokens)", file=sys.stderr, flush=True)
        docs = [d[:MAX_DOCUMENT_TOKENS] for d in docs]
    stream = TokenStream(docs, t.chunk_length, t.within_documents, torch.device("cpu"))
    if stream.num_chunks < 2:
        raise DataError(f"{data.source}: {len(stream.ids)} tokens make {stream.num_chunks} chunk(s) of "
                        f"data.text.chunk_length={t.chunk_length}; a run needs at least 2")
    return TextCorpus(data, tokenizer, docs, stream, span_spec(cfg, tokenizer), (t.max_length, query_length(t)))


def query_length(text) -> int:
    """Where evaluation cuts a query, in tokens: ``data.text.query_max_length``, or with 0 (the
    default) ``max_length``, the documents' length, which is the one the sentence-transformers
    export can express (its one ``max_seq_length``)."""
    return text.query_max_length or text.max_length


@register_data_source("text", reads=("data.root", "data.text"))
class TextSource(DataSource):
    """The chunks of the corpus's token stream as the items, viewed batched on the training
    device (``views.py``); retrieval on the corpus's qrels is the monitor. Its state is the
    tokenizer: kept in checkpoints, written to the run folder, and on a resume read back from
    the checkpoint instead of trained again (:func:`resumed_tokenizer`)."""

    monitor = "retrieval"

    def __init__(self, cfg: Config, saved: dict[str, Any] | None = None):
        super().__init__(cfg)
        kept = resumed_tokenizer(cfg, saved) if saved is not None else None
        self.corpus = open_text(cfg.data, TextTokenizer.from_json(kept, "the checkpoint's tokenizer") if kept else None)
        self.splits = Splits(Chunks(self.corpus.stream.num_chunks), None)
        self.plain_chunks: list[ChunkPlain] = []

    def input_shape(self) -> dict[str, tuple[int, ...]]:
        """Token ids of up to W positions, and the vocabulary they index; W is the longest of a
        view, a whole chunk (the bank's refresh), a document and a query."""
        t, corpus = self.cfg.data.text, self.corpus
        width = max(corpus.spec.max_width(t.chunk_length), t.chunk_length + 2, t.max_length, query_length(t))
        return {"input_ids": (width,), "attention_mask": (width,), "vocab_size": (corpus.tokenizer.vocab_size,)}

    def loaders(self, device: torch.device, rank: int, world: int, view: Callable | None = None) -> Loaders:
        cfg, corpus = self.cfg, self.corpus
        stream = corpus.stream.to(device)
        sampler = epoch_sampler(cfg, stream.num_chunks, rank, world)
        # One width on every rank where shuffle-BN gathers the key views across ranks, and on CUDA
        # (no host sync for the batch's longest view); else each batch pads to its longest.
        fixed = (world > 1 and cfg.model.bn == "shuffle") or device.type == "cuda"
        width = corpus.spec.max_width(cfg.data.text.chunk_length) if fixed else None
        buckets = int(cfg.model.params.get("length_buckets", 1)) > 1  # they take their widths from the host lengths
        train = TextTwoViews(stream, corpus.spec, cfg.optim.batch_size, sampler, cfg.train.seed, cfg.data.drop_last,
                             width, host_lengths=buckets)
        # The items' plain views (the memory bank's encodings): the chunks as the epoch items_at
        # names cuts them, [CLS] chunk [SEP].
        whole, shard = whole_and_shard(self.splits.train, lambda _, indices: ChunkPlain(
            stream, cfg.train.seed, corpus.spec, cfg.eval.batch_size, device, indices), rank, world)
        self.plain_chunks = [whole, shard]
        return Loaders(train=train, sampler=sampler, plain_train=whole, plain_train_shard=shard, test=None,
                       test_shard=None, num_items=stream.num_chunks, num_test=0, num_classes=0,
                       steps_per_epoch=steps_per_epoch(cfg, train), input_shape=self.input_shape(), source=self)

    def state(self) -> dict[str, Any]:
        return self.corpus.state()

    def misfit(self, saved: dict[str, Any]) -> str | None:
        return self.corpus.misfit(saved)

    def write(self, run_dir: Path) -> None:
        self.corpus.tokenizer.save(run_dir)

    def items_at(self, epoch: int) -> None:
        """The stream's chunks start at another offset each epoch: the plain views follow."""
        for plain in self.plain_chunks:
            plain.set_epoch(epoch)
