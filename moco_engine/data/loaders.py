"""The batches a run reads, whatever the items: :func:`build_loaders` and the mechanism sources
build their loaders with.

:func:`build_loaders` opens the source ``data.name`` names (``sources.open_source``: for a fresh
run, or with the snapshot a resume continues from) and asks it for this rank's :class:`Loaders`;
it knows no modality. Every source's loaders yield ``((x_q, x_k), targets, indices)`` training
batches in :class:`~moco_engine.data.sampling.EpochSampler`'s order and ``(x, targets,
indices)`` plain batches in index order, so nothing downstream asks which input path it has.

The mechanism here is the CPU path of items viewed one by one (``data.num_workers`` loader
processes, each item's views seeded by (seed, epoch, index): ``sampling.Indexed``):
:func:`item_loaders` for a source whose items have three views (:class:`SplitsSource`: a
function's items with their own; the image source: the recipe's), and the plain and probe
loaders evaluation reads. The other paths (images decoded on the device, encoded bytes, text
chunks) are their sources' own (``images/``, ``shards/``, ``text/``).
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
from moco_engine.data.items import ItemSet, Splits
from moco_engine.data.sampling import (
    EpochSampler,
    Indexed,
    ReshuffledEpochs,
    TwoViews,
    end_workers,
    make_loader,
)
from moco_engine.data.sources import DataSource, open_source


@dataclass
class Loaders:
    """What a source builds for one rank.

    Attributes:
        train: this rank's training batches ``((x_q, x_k), targets (B,), indices (B,))``, in
            ``sampler``'s order; a view is (B, ...) (images: (B, 3, S, S)) or a dict of such
            tensors; targets are -1 for unlabelled items.
        sampler: the epoch order (``set_epoch(epoch, skip)`` before iterating ``train``).
        plain_train, test: the whole train and test splits, un-augmented, in index order
            (``test`` is None when the data set has no labelled test split).
        plain_train_shard, test_shard: this rank's shards of them (:func:`shard_indices`);
            the same objects as the whole splits on one process.
        num_items, num_test, num_classes: N of the train split, of the test split, and C (0:
            unlabelled items, no kNN monitor).
        steps_per_epoch: optimizer steps per epoch (``train.steps_per_epoch`` caps it).
        input_shape: one view of an item, without the batch dimension: (3, S, S) for images; a
            dict of shapes for dict views (what the backbone's builder is given).
        source: the data source that built them (its declarations and its state).
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
    source: DataSource

    @property
    def images(self) -> bool:
        """Whether the inputs are images (the preview, the memory format, images per second)."""
        return self.source.images

    @property
    def monitor(self) -> str:
        """What the run's monitor measures: ``"knn"`` or ``"retrieval"`` (the source's word)."""
        return self.source.monitor

    # The data source's own state, which the run saves, restores and compares without knowing
    # what it is (a text run's tokenizer, the shards' fingerprint; nothing for the other images).
    def source_state(self) -> dict[str, Any]:
        """What a checkpoint keeps of the source beside the model (top-level keys of the snapshot)."""
        return self.source.state()

    def source_misfit(self, saved: dict[str, Any]) -> str | None:
        """Why a checkpoint's snapshot ``saved`` cannot continue with this source, or None."""
        return self.source.misfit(saved)

    def save_source(self, run_dir: Path) -> None:
        """Write the source's state into the run folder, as a user reads it (``tokenizer.json``)."""
        self.source.write(run_dir)

    def items_at(self, epoch: int) -> None:
        """Make the plain train views the items as ``epoch`` cuts them (the source's rule)."""
        self.source.items_at(epoch)

    def preview(self, n: int, seed: int) -> Tensor | None:
        """The first n items' query and key views as training draws them, in [0, 1] (images only)."""
        return self.source.preview(self, n, seed)

    def close(self) -> None:
        """End the persistent loader workers now, cleanly, rather than at interpreter exit
        (where multiprocessing would SIGTERM them, and a worker leaves only after its grace
        period: sampling.quiet_worker_signals)."""
        for loader in (self.train, self.plain_train, self.plain_train_shard, self.test, self.test_shard):
            end_workers(loader)


def build_loaders(cfg: Config, device: torch.device, rank: int = 0, world: int = 1, view: Callable | None = None,
                  saved: dict[str, Any] | None = None) -> Loaders:
    """Open ``cfg.data``'s source and build this rank's loaders.

    Args:
        view: the CPU path's random view of an item in place of the source's or the recipe's
            (tests use a mild one to make a few steps learn).
        saved: on a resume, the snapshot of the checkpoint it continues from: the source reads
            what it kept of itself there (a text run's tokenizer).

    Raises:
        UserError: the data cannot be used (missing, or fewer items than one global batch; an
            input path the source does not have); ``sources.SavedStateMisfit`` the source's kept
            state was made with other settings (named).
    """
    source = open_source(cfg, saved)
    if registry("method")[cfg.method].pairs and not source.pairs:
        raise UserError(f"config key 'method' = {cfg.method!r}: it trains on image-caption pairs, and "
                        f"data.name={cfg.data.name} has no captions (data.name=pairs has, and shards with .txt captions)")
    loaders = source.loaders(device, rank, world, view)
    if loaders.num_items < cfg.optim.batch_size * world:
        raise UserError(
            f"config key 'optim.batch_size' = {cfg.optim.batch_size}: larger than the data set "
            f"({loaders.num_items} items), so no full batch can be drawn"
        )
    return loaders


def refuse_gpu_decode(data: DataConfig) -> None:
    """``data.decode=gpu`` asked of a source that sends no encoded bytes: one line."""
    if data.decode == "gpu":
        raise UserError(f"config key 'data.decode' = 'gpu': the training device decodes JPEG bytes that the "
                        f"source sends, and data.name={data.name} does not (data.name=shards does)")


def epoch_sampler(cfg: Config, num_items: int, rank: int, world: int) -> EpochSampler:
    """The training order every source follows: each epoch's seeded permutation, dealt out by rank."""
    return EpochSampler(num_items, cfg.train.seed, True, rank, world)


def steps_per_epoch(cfg: Config, train: Iterable) -> int:
    """The optimizer steps of an epoch of ``train`` (``train.steps_per_epoch`` caps them)."""
    steps = len(train)
    return min(steps, cfg.train.steps_per_epoch) if cfg.train.steps_per_epoch else steps


def shard_indices(n: int, rank: int, world: int) -> list[int]:
    """This rank's contiguous part of the indices 0 … n − 1 (sharded encoding of a split).

    Every rank's part is ceil(n / world) long, the tail padded with the last item: the ranks
    then run the same number of batches of the same sizes, which SyncBN's per-layer collectives
    need (unequal parts could leave one rank waiting for a batch that never comes). The
    gathered encodings are cut back to n.
    """
    size = -(-n // world)
    return [min(i, n - 1) for i in range(rank * size, (rank + 1) * size)]


def whole_and_shard(split: ItemSet | None, plain: Callable[[ItemSet, list[int] | None], Any], rank: int,
                    world: int) -> tuple[Any, Any]:
    """``split``'s plain loader whole and this rank's shard of it (the same object on one
    process; (None, None) without the split). ``plain(split, indices)`` makes one."""
    if split is None:
        return None, None
    whole = plain(split, None)
    return whole, (plain(split, shard_indices(len(split), rank, world)) if world > 1 else whole)


def item_loaders(source: Any, device: torch.device, rank: int, world: int, view: Callable | None = None,
                 make_train: Callable[[EpochSampler], Iterable] | None = None) -> Loaders:
    """The CPU path's loaders of a source whose items are viewed one by one: ``source.splits``,
    ``source.item_views()`` (first, second, plain), ``source.input_shape()``.

    Args:
        view: one random view in place of the source's two (tests).
        make_train: the training batches in a sampler's order when the source makes them
            another way (the bytes that ``data.decode=gpu`` decodes on the device), beside
            these plain loaders.
    """
    cfg, splits = source.cfg, source.splits
    pin = device.type == "cuda"
    sampler = epoch_sampler(cfg, len(splits.train), rank, world)
    first, second, plain_view = source.item_views()
    if make_train is not None:
        train = make_train(sampler)
    else:
        views = TwoViews(view) if view is not None else TwoViews(first, second)
        train = make_loader(Indexed(splits.train, views, cfg.train.seed), cfg.optim.batch_size,
                            cfg.data.num_workers, sampler, drop_last=cfg.data.drop_last, pin_memory=pin)

    def plain(split: ItemSet, indices: list[int] | None) -> DataLoader:
        return plain_items(cfg, split, plain_view, cfg.eval.batch_size, indices, pin)

    return assembled(cfg, splits, train, sampler, plain, rank, world, source.input_shape(), source)


def assembled(cfg: Config, splits: Splits, train: Iterable, sampler: EpochSampler,
              plain: Callable[[ItemSet, list[int] | None], Any], rank: int, world: int, input_shape: Any,
              source: DataSource) -> Loaders:
    """:class:`Loaders` of a source with item sets: ``plain(split, indices)`` makes a plain
    loader; the test split counts only when labelled (else there is nothing to classify)."""
    labelled = splits.test is not None and splits.train.labelled
    plain_train, plain_train_shard = whole_and_shard(splits.train, plain, rank, world)
    test, test_shard = whole_and_shard(splits.test if labelled else None, plain, rank, world)
    return Loaders(train=train, sampler=sampler, plain_train=plain_train, plain_train_shard=plain_train_shard,
                   test=test, test_shard=test_shard, num_items=len(splits.train),
                   num_test=len(splits.test) if labelled else 0, num_classes=len(splits.train.classes),
                   steps_per_epoch=steps_per_epoch(cfg, train), input_shape=input_shape, source=source)


def plain_items(cfg: Config, split: ItemSet, plain_view: Callable, batch_size: int,
                sampler: Sampler | list[int] | None = None, pin_memory: bool = False) -> DataLoader:
    """The plain (deterministic) views of ``split`` in index order (or ``sampler``'s), as
    ``(x, targets, indices)`` batches: what evaluation encodes."""
    return make_loader(Indexed(split, plain_view), batch_size, cfg.data.num_workers, sampler=sampler,
                       pin_memory=pin_memory)


def probe_items(cfg: Config, train: ItemSet, augment: Callable, batch_size: int) -> DataLoader:
    """The linear probe's training batches: the train split under ``augment``, reshuffled
    (seeded) each time it is iterated."""
    return make_loader(Indexed(train, augment, cfg.train.seed), batch_size, cfg.data.num_workers,
                       ReshuffledEpochs(len(train), cfg.train.seed))


class SplitsSource(DataSource):
    """A function's items that carry their own ``view`` and ``plain`` (README's "Extending"):
    viewed one by one on the CPU path, seeded per (seed, epoch, item)."""

    def __init__(self, cfg: Config, splits: Splits):
        super().__init__(cfg)
        self.splits = splits

    def item_views(self) -> tuple[Callable, Callable, Callable]:
        """(the first view, the second view, the plain view) of an item: its own view twice."""
        return self.splits.view, self.splits.view, self.splits.plain

    def input_shape(self) -> Any:
        """The shape of the plain view of the first item (a dict of shapes for dict views)."""
        view = self.splits.plain(self.splits.train.load(0))
        return {k: tuple(v.shape) for k, v in view.items()} if isinstance(view, dict) else tuple(view.shape)

    def loaders(self, device: torch.device, rank: int, world: int, view: Callable | None = None) -> Loaders:
        data = self.cfg.data
        refuse_gpu_decode(data)
        if data.pipeline == "device":
            raise UserError(f"config key 'data.pipeline' = 'device': the device path makes image views, and "
                            f"data.name={data.name} gives items that are not images; use data.pipeline=cpu")
        return item_loaders(self, device, rank, world, view)

    def plain_loader(self, split: ItemSet, batch_size: int, sampler: Sampler | None = None,
                     pin_memory: bool = False) -> DataLoader:
        return plain_items(self.cfg, split, self.splits.plain, batch_size, sampler, pin_memory)

    def probe_loader(self, batch_size: int) -> DataLoader:
        return probe_items(self.cfg, self.splits.train, self.splits.view, batch_size)
