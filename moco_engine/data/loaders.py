"""The batches a run reads: training pairs, and the plain splits the evaluations encode.

:func:`build_loaders` builds either data path from ``cfg.data`` and hands back one
:class:`Loaders`:

- ``data.pipeline=cpu``: DataLoaders, the source's items viewed in ``data.num_workers``
  processes (``sampling.Indexed`` seeds each item's views by (seed, epoch, index)): images
  through the recipe's PIL transforms, other items through the source's own view;
- ``data.pipeline=device`` (images only): decoded once into device memory and augmented there
  in batches (``images/on_device.py``; each step's views seeded by (seed, epoch, step, rank));
- ``data.pipeline=auto`` (the default): the device path for the small data sets of known size,
  :func:`resolve_pipeline`.

Both yield ``((x_q, x_k), targets, indices)`` training batches in :class:`sampling.EpochSampler`'s
order, and ``(x, targets, indices)`` plain batches in index order, so nothing downstream asks
which path it has. :func:`plain_loader` and :func:`probe_loader` are evaluation's (``moco-eval``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import DataLoader, Sampler

from moco_engine.config.registry import registry
from moco_engine.config.schema import Config, DataConfig, UserError
from moco_engine.data.images.on_device import (
    DevicePlain,
    DeviceTwoViews,
    step_generator,
    to_device_tensor,
)
from moco_engine.data.images.recipes import (
    ViewSpec,
    eval_transform,
    probe_transform,
    view_specs,
    view_transforms,
)
from moco_engine.data.items import ItemSet, Splits
from moco_engine.data.sampling import EpochSampler, Indexed, ReshuffledEpochs, TwoViews, make_loader
from moco_engine.data.shards.decode import StreamTwoViews, decode_batch
from moco_engine.data.sources import build_splits
from moco_engine.data.text.source import query_length, resumed_tokenizer, text_splits
from moco_engine.data.text.tokenizer import TextTokenizer
from moco_engine.data.text.views import ChunkPlain, TextTwoViews


@dataclass
class Loaders:
    """What :func:`build_loaders` makes for one rank.

    Attributes:
        train: this rank's training batches ``((x_q, x_k), targets (B,), indices (B,))``, in
            ``sampler``'s order; a view is (B, ...) (images: (B, 3, S, S)) or a dict of such
            tensors; targets are -1 for unlabelled items.
        sampler: the epoch order (``set_epoch(epoch, skip)`` before iterating ``train``).
        plain_train, test: the whole train and test splits, un-augmented, in index order
            (``test`` is None when the data set has no test split).
        plain_train_shard, test_shard: this rank's shards of them (:func:`shard_indices`);
            the same objects as the whole splits on one process.
        num_items, num_test, num_classes: N of the train split, of the test split, and C (0:
            unlabelled items, no kNN monitor).
        steps_per_epoch: optimizer steps per epoch (``train.steps_per_epoch`` caps it).
        input_shape: one view of an item, without the batch dimension: (3, S, S) for images; a
            dict of shapes for dict views (what the backbone's builder is given).
        spec: the augmentation recipe the training views follow (None: the items are not images).
        text: the text source's corpus, tokenizer and view spec (None: not text); the retrieval
            monitor reads its queries and qrels.
        origin: the source's state for checkpoints (``items.Splits.origin``; None: nothing).
    """

    train: Iterable
    sampler: EpochSampler
    plain_train: Iterable
    plain_train_shard: Iterable
    test: Iterable | None
    test_shard: Iterable | None
    num_items: int
    num_test: int
    num_classes: int
    steps_per_epoch: int
    input_shape: Any
    spec: ViewSpec | None
    text: Any = None
    origin: Any = None

    @property
    def images(self) -> bool:
        """Whether the inputs are images (the preview, the memory format, images per second)."""
        return self.spec is not None

    # The data source's own state, which the run saves, restores and compares without knowing
    # what it is (a text run's tokenizer, the shards' fingerprint; nothing for the other images).
    def source_state(self) -> dict[str, Any]:
        """What a checkpoint keeps of the source beside the model (top-level keys of the snapshot)."""
        return self.origin.state() if self.origin is not None else {}

    def source_misfit(self, saved: dict[str, Any]) -> str | None:
        """Why a checkpoint's snapshot ``saved`` cannot continue with this source, or None."""
        return self.origin.misfit(saved) if self.origin is not None else None

    def save_source(self, run_dir: Path) -> None:
        """Write the source's state into the run folder, as a user reads it (``tokenizer.json``)."""
        if self.text is not None:
            self.text.tokenizer.save(run_dir)

    def items_at(self, epoch: int) -> None:
        """Make the plain train views the items as ``epoch`` cuts them: text's stream chunks
        move each epoch (``data/text/views.py``); images and other items stay as they are."""
        for loader in (self.plain_train, self.plain_train_shard):
            if isinstance(loader, ChunkPlain):
                loader.set_epoch(epoch)

    def close(self) -> None:
        """End the persistent loader workers now, cleanly, rather than at interpreter exit
        (where multiprocessing would SIGTERM them, and a worker leaves only after its grace
        period: sampling.quiet_worker_signals)."""
        for loader in (self.train, self.plain_train, self.plain_train_shard, self.test, self.test_shard):
            if isinstance(loader, DataLoader) and getattr(loader, "_iterator", None) is not None:
                loader._iterator = None  # torch shuts a persistent iterator's workers down when it is dropped


def shard_indices(n: int, rank: int, world: int) -> list[int]:
    """This rank's contiguous part of the indices 0 … n − 1 (sharded encoding of a split).

    Every rank's part is ceil(n / world) long, the tail padded with the last item: the ranks
    then run the same number of batches of the same sizes, which SyncBN's per-layer collectives
    need (unequal parts could leave one rank waiting for a batch that never comes). The
    gathered encodings are cut back to n.
    """
    size = -(-n // world)
    return [min(i, n - 1) for i in range(rank * size, (rank + 1) * size)]


def resolve_pipeline(data: DataConfig) -> str:
    """The input path ``data.pipeline`` stands for: "auto" is the device path for the sources
    registered ``in_memory`` (size known and small: the embedded sample 12 MB decoded, CIFAR-10
    150 MB; on 2 CPU cores the embedded run's epochs take 13.5 s instead of 22 s: batched tensor
    ops in the main process against PIL in workers that share its cores), else the CPU path (an
    image folder may not fit; synthetic images are drawn per item: nothing to decode)."""
    if data.pipeline != "auto":
        return data.pipeline
    return "device" if registry("data.name")[data.name].in_memory else "cpu"


def resumed_source(cfg: Config, saved: dict[str, Any]) -> Any:
    """What a resumed run's source continues with, from the snapshot ``saved`` it resumes from
    (:func:`build_loaders`' ``resumed``): a text run's tokenizer; None for the others.

    Raises:
        ConfigError: the checkpoint's source state was made with other settings (named).
    """
    return resumed_tokenizer(cfg, saved) if cfg.data.name == "text" else None


def build_loaders(cfg: Config, device: torch.device, rank: int = 0, world: int = 1,
                  view: Callable | None = None, resumed: Any = None) -> Loaders:
    """Open ``cfg.data`` and build this rank's loaders.

    Args:
        view: the CPU path's random view of an item in place of the source's or the recipe's
            (tests use a mild one to make a few steps learn); the device path takes only recipes.
        resumed: :func:`resumed_source`'s result for a resume: a text run's tokenizer (JSON)
            in place of the configured one.

    Raises:
        UserError: the data cannot be used (missing, or fewer items than one global batch; the
            device path for items that are not images).
    """
    if resumed is None:
        splits = build_splits(cfg.data, seed=cfg.train.seed)
    else:  # a text run's: its checkpoint's tokenizer
        splits = text_splits(cfg.data, TextTokenizer.from_json(resumed, "the checkpoint's tokenizer"))
    num_items = len(splits.train)
    if num_items < cfg.optim.batch_size * world:
        raise UserError(
            f"config key 'optim.batch_size' = {cfg.optim.batch_size}: larger than the data set "
            f"({num_items} items), so no full batch can be drawn"
        )
    sampler = EpochSampler(num_items, cfg.train.seed, True, rank, world)
    specs = view_specs(cfg.data.augmentation, cfg.data.image_size, cfg.data.crop_min) if splits.images else None
    spec = specs[0] if specs else None
    pipeline = resolve_pipeline(cfg.data)
    if splits.text is not None:
        train, plain = _text_loaders(cfg, splits.text, sampler, device, rank, world)
    elif cfg.data.decode == "gpu":  # whatever data.pipeline says: the bytes go to the device
        if spec is None or not hasattr(splits.train, "load_encoded"):
            raise UserError(f"config key 'data.decode' = 'gpu': the training device decodes JPEG bytes that the "
                            f"source sends, and data.name={cfg.data.name} does not (data.name=shards does)")
        train = StreamTwoViews(splits.train, specs, cfg.optim.batch_size, sampler, cfg.train.seed,
                               cfg.data.num_workers, device, cfg.data.drop_last)
        plain = _plain_loaders(cfg, splits, device, rank, world)
    elif pipeline == "device" and spec is None:
        raise UserError(f"config key 'data.pipeline' = 'device': the device path makes image views, and "
                        f"data.name={cfg.data.name} gives items that are not images; use data.pipeline=cpu")
    elif pipeline == "device":
        train, plain = _device_loaders(cfg, splits, specs, sampler, device, rank, world)
    else:
        train, plain = _cpu_loaders(cfg, splits, sampler, device, rank, world, view)
    steps = len(train)
    if cfg.train.steps_per_epoch:
        steps = min(steps, cfg.train.steps_per_epoch)
    labelled = splits.test is not None and splits.train.labelled
    return Loaders(
        train=train, sampler=sampler, plain_train=plain["train"], plain_train_shard=plain["train_shard"],
        test=plain["test"] if labelled else None, test_shard=plain["test_shard"] if labelled else None,
        num_items=num_items, num_test=len(splits.test) if labelled else 0, num_classes=len(splits.train.classes),
        steps_per_epoch=steps, input_shape=input_shape(cfg.data, splits), spec=spec, text=splits.text,
        origin=splits.origin,
    )


def input_shape(cfg: DataConfig, splits: Splits) -> Any:
    """One view of an item, without the batch dimension: (3, S, S) for images; else the shape
    of the source's plain view of its first item (a dict of shapes for dict views)."""
    if splits.images:
        return (3, cfg.image_size, cfg.image_size)
    if splits.text is not None:  # token ids of up to W positions, and the vocabulary they index
        t = cfg.text  # W: the longest of a view, a whole chunk (the bank's refresh), a document, a query
        width = max(splits.text.spec.max_width(t.chunk_length), t.chunk_length + 2, t.max_length, query_length(t))
        return {"input_ids": (width,), "attention_mask": (width,), "vocab_size": (splits.text.tokenizer.vocab_size,)}
    view = splits.plain(splits.train.load(0))
    return {k: tuple(v.shape) for k, v in view.items()} if isinstance(view, dict) else tuple(view.shape)


def transforms(cfg: DataConfig, splits: Splits) -> tuple[Callable, Callable, Callable]:
    """(the first view, the second view, the plain view) of an item: the source's own view
    twice, else the recipe's two."""
    if not splits.images:
        return splits.view, splits.view, splits.plain
    first, second = view_transforms(cfg.augmentation, cfg.image_size, cfg.crop_min)
    return first, second, eval_transform(cfg.augmentation, cfg.image_size)


def plain_loader(cfg: Config, splits: Splits, split: ItemSet, batch_size: int, sampler: Sampler | None = None,
                 pin_memory: bool = False) -> DataLoader:
    """The plain (deterministic) views of ``split`` in index order (or ``sampler``'s), as
    ``(x, targets, indices)`` batches: what evaluation encodes."""
    return make_loader(Indexed(split, transforms(cfg.data, splits)[2]), batch_size, cfg.data.num_workers,
                       sampler=sampler, pin_memory=pin_memory)


def probe_loader(cfg: Config, splits: Splits, batch_size: int) -> DataLoader:
    """The linear probe's training batches: the train split under the probe's augmentation
    (images: ``recipes.probe_transform``; other items: the source's random view), reshuffled
    (seeded) each time it is iterated."""
    augment = (probe_transform(cfg.data.augmentation, cfg.data.image_size) if splits.images else splits.view)
    return make_loader(Indexed(splits.train, augment, cfg.train.seed), batch_size, cfg.data.num_workers,
                       ReshuffledEpochs(len(splits.train), cfg.train.seed))


def _cpu_loaders(cfg: Config, splits: Splits, sampler: EpochSampler, device: torch.device, rank: int, world: int,
                 view: Callable | None) -> tuple[Iterable, dict]:
    pin = device.type == "cuda"
    first, second, _ = transforms(cfg.data, splits)
    views = TwoViews(view) if view is not None else TwoViews(first, second)
    train = make_loader(Indexed(splits.train, views, cfg.train.seed), cfg.optim.batch_size,
                        cfg.data.num_workers, sampler, drop_last=cfg.data.drop_last, pin_memory=pin)
    return train, _plain_loaders(cfg, splits, device, rank, world)


def _plain_loaders(cfg: Config, splits: Splits, device: torch.device, rank: int, world: int) -> dict:
    """The CPU path's plain loaders of the train and test splits, whole and this rank's shard."""
    pin = device.type == "cuda"

    def plain(split, shard=None):
        return plain_loader(cfg, splits, split, cfg.eval.batch_size, shard, pin)

    def whole_and_shard(split):
        whole = plain(split)
        return whole, (plain(split, shard_indices(len(split), rank, world)) if world > 1 else whole)

    out = dict(zip(("train", "train_shard"), whole_and_shard(splits.train)))
    out["test"], out["test_shard"] = whole_and_shard(splits.test) if splits.test is not None else (None, None)
    return out


def _text_loaders(cfg: Config, corpus: Any, sampler: EpochSampler, device: torch.device, rank: int,
                  world: int) -> tuple[Iterable, dict]:
    stream = corpus.stream.to(device)
    # One width on every rank where shuffle-BN gathers the key views across ranks, and on CUDA
    # (no host sync for the batch's longest view); else each batch pads to its longest.
    fixed = (world > 1 and cfg.model.bn == "shuffle") or device.type == "cuda"
    width = corpus.spec.max_width(cfg.data.text.chunk_length) if fixed else None
    buckets = int(cfg.model.params.get("length_buckets", 1)) > 1  # they take their widths from the host lengths
    train = TextTwoViews(stream, corpus.spec, cfg.optim.batch_size, sampler, cfg.train.seed, cfg.data.drop_last, width,
                         host_lengths=buckets)
    # The items' plain views (the memory bank's encodings): the chunks as the epoch
    # Loaders.items_at names cuts them, [CLS] chunk [SEP].
    whole = ChunkPlain(stream, cfg.train.seed, corpus.spec, cfg.eval.batch_size, device)
    shard = ChunkPlain(stream, cfg.train.seed, corpus.spec, cfg.eval.batch_size, device,
                       shard_indices(stream.num_chunks, rank, world)) if world > 1 else whole
    return train, {"train": whole, "train_shard": shard, "test": None, "test_shard": None}


def _device_loaders(cfg: Config, splits: Splits, specs: tuple[ViewSpec, ViewSpec], sampler: EpochSampler,
                    device: torch.device, rank: int, world: int) -> tuple[Iterable, dict]:
    images = to_device_tensor(splits.train, device)
    spec = specs[0]
    train = DeviceTwoViews(images, splits.train.targets, specs, cfg.optim.batch_size, sampler, cfg.train.seed,
                           compile=cfg.train.compile or cfg.train.cuda_graphs, drop_last=cfg.data.drop_last)
    size, bs = cfg.data.image_size, cfg.eval.batch_size

    def whole_and_shard(split, pixels: Tensor):
        whole = DevicePlain(pixels, split.targets, bs, size, spec.mean, spec.std)
        if world == 1:
            return whole, whole
        shard = shard_indices(len(split), rank, world)
        part = pixels[torch.tensor(shard, device=pixels.device)]
        return whole, DevicePlain(part, [split.targets[i] for i in shard], bs, size, spec.mean, spec.std)

    out = dict(zip(("train", "train_shard"), whole_and_shard(splits.train, images)))
    out["test"], out["test_shard"] = (whole_and_shard(splits.test, to_device_tensor(splits.test, device))
                                      if splits.test is not None else (None, None))
    return train, out


@torch.no_grad()
def preview_pairs(loaders: Loaders, n: int, seed: int) -> Tensor | None:
    """Query and key views of the first n training images, drawn as training draws them (the
    CPU path: exactly epoch 0's views of those items), un-normalised to [0, 1]:
    (2n, 3, S, S) as q0, k0, q1, k1, ...; None when the items are not images."""
    spec = loaders.spec
    if spec is None:
        return None
    n = min(n, loaders.num_items)
    if isinstance(loaders.train, DeviceTwoViews):
        images = loaders.train.images[:n]
        generator = step_generator(images.device, seed, 0, 0)
        views = loaders.train.apply_to(torch.cat([images, images]), generator)
        pairs = torch.stack([views[:n], views[n:]], dim=1).flatten(0, 1)
    elif isinstance(loaders.train, StreamTwoViews):
        stream = loaders.train
        images = decode_batch([stream.items.load_encoded(i) for i in range(n)], torch.arange(n), stream.device, stream.items)
        x_q, x_k = stream.views(images, step_generator(stream.device, seed, 0, 0))
        pairs = torch.stack([x_q, x_k], dim=1).flatten(0, 1)
    else:
        dataset = loaders.train.dataset  # Indexed(TwoViews): item (epoch, i) -> ((x_q, x_k), y, i)
        pairs = torch.stack([view for i in range(n) for view in dataset[(0, i)][0]])
    mean = torch.tensor(spec.mean, device=pairs.device).view(1, 3, 1, 1)
    std = torch.tensor(spec.std, device=pairs.device).view(1, 3, 1, 1)
    return (pairs * std + mean).clamp(0, 1).cpu()
