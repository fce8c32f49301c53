"""Text views, made batched on the training device: the text counterpart of ``images/on_device.py``.

As Contriever builds its pairs (facebookresearch/contriever, ``src/data.py``: ``Dataset``,
``randomcrop``, ``deleteword``, ``replaceword``, ``maskword``, ``add_bos_eos``):

- the tokenized corpus is one stream of ids cut into chunks of ``text.chunk_length`` tokens,
  starting at a random offset each epoch (``Dataset.generate_offset``); with
  ``text.within_documents`` each document is cut on its own and no chunk crosses its end;
- the items are the chunks (the memory bank holds one entry per chunk); a view of chunk i is a
  random span of ``floor(n · U(ratio_min, ratio_max))`` tokens (at least one) at a uniformly
  random start, its tokens each deleted with p ``text.deletion``, else replaced by a random
  non-special token with p ``text.replacement``, else by [MASK] with p ``text.masking`` (one
  uniform per token decides, so the three are exclusive and their rates are exactly those set:
  Contriever reads its options for the latter two from flags it never defines), then [CLS] and
  [SEP] around it, padded with [PAD] and an attention mask.

Every random number is a hash of (seed, epoch, item, slot) (:func:`uniform`), not a draw from a
generator: a view depends on nothing but its item and epoch, whatever batch, rank or resume it
falls in, and the whole batch's views are a handful of tensor ops on any device.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import Tensor

from moco_engine.data.sampling import EpochSampler

M32 = 0xFFFFFFFF
# Slots of an item's random numbers: view v's ratio and start at 2v, 2v + 1; then one per span token.
RATIO, START, TOKENS = 0, 1, 4


def mulmod32(x: Tensor, c: int) -> Tensor:
    """x · c mod 2³² for x in [0, 2³²), in int64 without overflow (16-bit halves)."""
    lo, hi = x & 0xFFFF, x >> 16
    return (lo * c + ((hi * (c & 0xFFFF)) << 16)) & M32


def mix32(x: Tensor) -> Tensor:
    """A 32-bit integer hash (the "lowbias32" constants of C. Wellons' hash-prospector) of x & M32."""
    x = x & M32
    x = x ^ (x >> 16)
    x = mulmod32(x, 0x7FEB352D)
    x = x ^ (x >> 15)
    x = mulmod32(x, 0x846CA68B)
    return x ^ (x >> 16)


def item_keys(seed: int, epoch: int, items: Tensor) -> Tensor:
    """One 32-bit key per item (B,) for (seed, epoch)."""
    base = mix32(mix32(torch.tensor(seed, dtype=torch.long, device=items.device)) ^ epoch)
    return mix32(base ^ mix32(items.long() + 0x9E3779B9))


def uniform(keys: Tensor, slots: Tensor) -> Tensor:
    """U[0, 1) numbers (B, S), float64: item key (B,) × slot (S,) hashed."""
    h = mix32(keys[:, None] ^ mix32(slots[None, :] * 0x85EBCA6B + 0x632BE5AB))
    return h.double() / 2.0**32


@dataclass(frozen=True)
class SpanSpec:
    """How a view is cut from a chunk (``text.*``) and the tokenizer's ids it adds or draws."""

    ratio_min: float
    ratio_max: float
    deletion: float
    replacement: float
    masking: float
    cls_id: int
    sep_id: int
    pad_id: int
    mask_id: int
    vocab_size: int
    first_regular: int  # replacements are drawn from [first_regular, vocab_size)

    def max_width(self, chunk_length: int) -> int:
        """The longest view of a chunk of ``chunk_length`` tokens, [CLS] and [SEP] included."""
        return max(int(chunk_length * self.ratio_max), 1) + 2


class TokenStream:
    """The tokenized corpus as one id tensor on the device and where each document starts.

    Args:
        docs: each document's ids (no special tokens).
        chunk_length: L, tokens a chunk.
        within_documents: chunks never cross a document's end (each document cut from its own
            start; its last chunk may be shorter); else the stream is cut every L tokens from a
            random offset in [0, L) each epoch, N = T // L − 1 chunks whatever the offset.
    """

    def __init__(self, docs: list[list[int]], chunk_length: int, within_documents: bool, device: torch.device):
        lengths = torch.tensor([len(d) for d in docs], dtype=torch.long)
        self.ids = torch.tensor([t for d in docs for t in d], dtype=torch.long, device=device)  # (T,)
        self.chunk_length, self.within_documents = chunk_length, within_documents
        if within_documents:
            per_doc = (lengths + chunk_length - 1) // chunk_length
            doc_start = torch.cumsum(lengths, 0) - lengths
            doc = torch.repeat_interleave(torch.arange(len(docs)), per_doc)
            piece = torch.arange(len(doc)) - torch.repeat_interleave(torch.cumsum(per_doc, 0) - per_doc, per_doc)
            starts = doc_start[doc] + piece * chunk_length
            self.fixed = (starts.to(device), torch.minimum(lengths[doc] - piece * chunk_length,
                                                           torch.tensor(chunk_length)).to(device))
        else:
            self.fixed = None
        self.num_chunks = len(self.fixed[0]) if within_documents else max(len(self.ids) // chunk_length - 1, 0)

    def to(self, device: torch.device) -> TokenStream:
        """This stream with its tensors on ``device`` (in place)."""
        self.ids = self.ids.to(device)
        if self.fixed is not None:
            self.fixed = (self.fixed[0].to(device), self.fixed[1].to(device))
        return self

    def chunk_tokens(self, seed: int, epoch: int) -> list[list[int]]:
        """Each chunk's ids at ``epoch``, as lists (what the plain loader of the chunks encodes)."""
        starts, lengths = (t.tolist() for t in self.chunks(seed, epoch))
        ids = self.ids.tolist()
        return [ids[s : s + n] for s, n in zip(starts, lengths)]

    def chunks(self, seed: int, epoch: int) -> tuple[Tensor, Tensor]:
        """Every chunk's first token and length in the stream at ``epoch``: (N,), (N,)."""
        if self.fixed is not None:
            return self.fixed
        key = item_keys(seed, epoch, torch.tensor([-1], device=self.ids.device))
        offset = (uniform(key, torch.zeros(1, dtype=torch.long, device=self.ids.device)) * self.chunk_length).long()[0, 0]
        starts = offset + torch.arange(self.num_chunks, device=self.ids.device) * self.chunk_length
        return starts, torch.full_like(starts, self.chunk_length)


def span_views(stream: Tensor, starts: Tensor, lengths: Tensor, keys: Tensor, view: int, spec: SpanSpec,
               chunk_length: int, width: int | None = None, host_lengths: bool = False) -> dict[str, Tensor]:
    """One random view of each of B chunks.

    Args:
        stream: the token ids (T,).
        starts, lengths: the chunks' first tokens and lengths (B,), (B,).
        keys: the items' random keys (B,) (:func:`item_keys`).
        view: 0 or 1, which of the pair (its own slots of the items' random numbers).
        chunk_length: L, the longest a chunk is.
        width: pad to this many tokens (None: to the longest view of the batch, one host sync).
        host_lengths: with ``width`` None, also give each view's tokens as a host list.

    Returns:
        {"input_ids": (B, W) long, "attention_mask": (B, W) long}: [CLS] span [SEP] [PAD]...;
        with ``host_lengths``, also "lengths": each view's tokens ([CLS] and [SEP] included) as a
        list, read in the same host sync, from which a length-bucketed encoder takes its widths
        without reading the device (``method/text_encoder.py``). Only then: a compiled encoder
        would guard on the list's values and recompile for every batch.
    """
    device = stream.device
    base = 2 * view
    head = uniform(keys, torch.tensor([base + RATIO, base + START], device=device))  # (B, 2)
    ratio = spec.ratio_min + (spec.ratio_max - spec.ratio_min) * head[:, 0]
    span = torch.clamp((lengths.double() * ratio).long(), min=1)  # int(len · ratio), at least a token
    start = starts + (head[:, 1] * (lengths - span + 1).double()).long()  # randint(0, n − length)
    longest = spec.max_width(chunk_length) - 2
    pos = torch.arange(longest, device=device)
    inside = pos[None, :] < span[:, None]  # (B, longest)
    tokens = stream[torch.where(inside, start[:, None] + pos[None, :], 0)]
    u = uniform(keys, TOKENS + view * 65536 + pos)  # one number per span token (chunks under 65,536 tokens)
    kept = inside & (u >= spec.deletion)
    cut = spec.deletion
    replace = kept & (u < cut + spec.replacement)
    if spec.replacement > 0:
        drawn = spec.first_regular + ((u - cut) / spec.replacement * (spec.vocab_size - spec.first_regular)).long()
        tokens = torch.where(replace, drawn.clamp(max=spec.vocab_size - 1), tokens)
    cut += spec.replacement
    tokens = torch.where(kept & (u >= cut) & (u < cut + spec.masking), spec.mask_id, tokens)
    # Compact the kept tokens to the left, after [CLS]: a kept token's place is 1 + the number kept before it.
    n_kept = kept.sum(1)
    known = (n_kept + 2).tolist() if width is None and host_lengths else None  # the one host read of the views
    full = width if width is not None else max(known) if known is not None else int(n_kept.max()) + 2
    ids = torch.full((len(keys), full), spec.pad_id, dtype=torch.long, device=device)
    place = torch.where(kept, torch.cumsum(kept.long(), 1), full - 1)  # dropped ones aim at the last column
    ids.scatter_(1, place, torch.where(kept, tokens, ids.gather(1, place)))
    ids[:, 0] = spec.cls_id
    ids.scatter_(1, (n_kept + 1)[:, None], spec.sep_id)
    mask = (torch.arange(full, device=device)[None, :] < (n_kept + 2)[:, None]).long()
    view = {"input_ids": ids * mask + spec.pad_id * (1 - mask), "attention_mask": mask}
    return view if known is None else {**view, "lengths": known}


class TextTwoViews:
    """Training batches ``((x_q, x_k), targets, indices)`` of chunks held on the device, in
    :class:`EpochSampler`'s order (the shuffle, rank split and mid-epoch skip of the image paths).

    Args:
        width: pad every view to this many tokens (under torchrun with shuffle-BN, whose
            gathers need one shape on every rank); None: to the batch's longest view.
        host_lengths: give each view's lengths as a host list (for length buckets).
    """

    def __init__(self, stream: TokenStream, spec: SpanSpec, batch_size: int, sampler: EpochSampler, seed: int,
                 drop_last: bool = True, width: int | None = None, host_lengths: bool = False):
        self.stream, self.spec, self.batch_size, self.sampler, self.seed = stream, spec, batch_size, sampler, seed
        self.drop_last, self.width, self.host_lengths = drop_last, width, host_lengths

    def __len__(self) -> int:
        share = self.sampler.share_size()
        return share // self.batch_size if self.drop_last else -(-share // self.batch_size)

    def views(self, items: Tensor, epoch: int) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        """Both views of the chunks ``items`` (B,) at ``epoch``."""
        starts, lengths = self.stream.chunks(self.seed, epoch)
        keys = item_keys(self.seed, epoch, items)
        return tuple(span_views(self.stream.ids, starts[items], lengths[items], keys, v, self.spec,
                                self.stream.chunk_length, self.width, self.host_lengths)
                     for v in (0, 1))

    def __iter__(self) -> Iterator[tuple[tuple[dict, dict], Tensor, Tensor]]:
        device = self.stream.ids.device
        epoch = self.sampler.epoch
        order = torch.tensor([i for _, i in self.sampler], device=device, dtype=torch.long)
        steps = len(order) // self.batch_size if self.drop_last else -(-len(order) // self.batch_size)
        for k in range(steps):
            idx = order[k * self.batch_size : (k + 1) * self.batch_size]
            yield self.views(idx, epoch), torch.full_like(idx, -1), idx


def padded(docs: list[list[int]], max_length: int, spec: SpanSpec, device: torch.device) -> dict[str, Tensor]:
    """[CLS] ids [SEP] of each token list, truncated to ``max_length`` tokens in all and padded
    to the longest: {"input_ids": (B, W), "attention_mask": (B, W)}."""
    body = [d[: max_length - 2] for d in docs]
    width = max(len(b) for b in body) + 2
    ids = torch.full((len(body), width), spec.pad_id, dtype=torch.long)
    mask = torch.zeros((len(body), width), dtype=torch.long)
    for i, b in enumerate(body):
        ids[i, : len(b) + 2] = torch.tensor([spec.cls_id, *b, spec.sep_id], dtype=torch.long)
        mask[i, : len(b) + 2] = 1
    return {"input_ids": ids.to(device), "attention_mask": mask.to(device)}


class TextPlain:
    """Evaluation batches ``(x, targets, indices)`` of token lists in index order ([CLS] ids
    [SEP], truncated at ``max_length``), as the image paths' plain loaders yield them. The lists
    are batched by length (a batch pads to its longest), which changes no embedding."""

    def __init__(self, docs: list[list[int]], spec: SpanSpec, batch_size: int, max_length: int, device: torch.device,
                 indices: list[int] | None = None):
        self.docs, self.spec, self.batch_size, self.max_length, self.device = docs, spec, batch_size, max_length, device
        self.indices = list(range(len(docs))) if indices is None else indices

    def __len__(self) -> int:
        return -(-len(self.indices) // self.batch_size)

    def __iter__(self) -> Iterator[tuple[dict[str, Tensor], Tensor, Tensor]]:
        for start in range(0, len(self.indices), self.batch_size):
            idx = self.indices[start : start + self.batch_size]
            x = padded([self.docs[i] for i in idx], self.max_length, self.spec, self.device)
            index = torch.tensor(idx, device=self.device)
            yield x, torch.full_like(index, -1), index


class ChunkPlain(TextPlain):
    """The chunks as plain views ([CLS] chunk [SEP]; the memory bank's encoding of the items),
    cut as epoch ``set_epoch(e)`` cuts them (0 until told): the stream's chunks start at another
    offset each epoch, so a refresh at an epoch's end encodes the very chunks the next one trains on."""

    def __init__(self, stream: TokenStream, seed: int, spec: SpanSpec, batch_size: int, device: torch.device,
                 indices: list[int] | None = None):
        self.stream, self.seed, self.epoch, self.cut = stream, seed, 0, 0
        super().__init__(stream.chunk_tokens(seed, 0), spec, batch_size, stream.chunk_length + 2, device, indices)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch  # cut when next encoded: runs whose negatives never encode the items pay nothing

    def __iter__(self) -> Iterator[tuple[dict[str, Tensor], Tensor, Tensor]]:
        if self.cut != self.epoch:
            self.docs, self.cut = self.stream.chunk_tokens(self.seed, self.epoch), self.epoch
        return super().__iter__()
