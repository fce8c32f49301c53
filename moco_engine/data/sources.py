"""Data sources: a registry from ``data.name`` to what opens the data, and the one protocol every
source follows (:class:`DataSource`).

A source is opened from the config and, on a resume, from the snapshot its checkpoint holds; it
builds this rank's loaders (training, plain, test: its input path is its own choice) and owns
its state: what a checkpoint keeps of it, why a kept state cannot continue, what it writes into
the run folder, and how an epoch moves its items. The run saves, checks and restores that state
without knowing what it is, and learns what it needs of the items from the source's
declarations (``images``, ``monitor``).

Two forms register. The whole protocol, a :class:`DataSource` subclass (the text and shards
sources are)::

    @register_data_source("points")
    class Points(DataSource):
        ...

or a function of the data settings and the run's seed that returns
:class:`~moco_engine.data.items.Splits` (the image sources are; ``docs/extending.md`` shows
one)::

    @register_data_source("points")             # moco_engine.register_data_source
    def points(cfg: DataConfig, seed: int) -> Splits:
        x = torch.randn(1000, 8, generator=torch.Generator().manual_seed(seed))
        noisy = lambda v: v + 0.1 * torch.randn_like(v)
        return Splits(TensorItems(x), None, view=noisy, plain=lambda v: v)

A function's items are viewed one by one on the CPU path: through their own ``view`` and
``plain`` (``loaders.py``'s ``SplitsSource``), or, when they are images (no view of their own), through the
``data.augmentation`` recipe on either input path (``images/source.py``'s ``ImageSource``).

``reads`` names the ``data.*`` settings a source honours among those other sources read (a
changed one the chosen source ignores draws a warning); ``in_memory`` marks the image sources
whose size is known to fit the device path (``data.pipeline=auto``); ``params`` declares options
the schema lacks (``data.params.<name>``, read from ``cfg.params``).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from torch import Tensor
from torch.utils.data import DataLoader, Sampler

from moco_engine.config.registry import Registry, registry
from moco_engine.config.schema import Config, ConfigError, DataConfig, UserError
from moco_engine.data.items import ItemSet, Splits

if TYPE_CHECKING:  # the loaders' mechanism builds on the sources' protocol, not the other way
    import torch

    from moco_engine.data.loaders import Loaders


class SavedStateMisfit(ConfigError):
    """A resumed source's kept state (``saved``) was made with other settings than this run's;
    the message names them (the run prefixes the checkpoint's path)."""


class DataSource:
    """One data set as a run reads it; every registered source is one (a function's ``Splits``
    through ``loaders.SplitsSource`` or ``images/source.ImageSource``).

    Args:
        cfg: the run's config.
        saved: on a resume, the snapshot its checkpoint holds (what the source kept of itself in
            :meth:`state`: a text run's tokenizer); None for a fresh run. A source whose kept
            state was made with other settings raises :class:`SavedStateMisfit` naming them.

    Attributes (what the run layer asks, so that it never asks which modality it has):
        images: the items are images (the augmentation preview, ``train.channels_last``, the
            ``img_per_s`` metric).
        monitor: what the run's monitor measures: ``"knn"`` (a labelled test split),
            ``"retrieval"`` (queries judged in ``eval.retrieval_split``: :attr:`corpus`) or
            ``"pairs"`` (image–text recall on the ``eval.retrieval_split`` pairs: ``ranked_pairs``).
        pairs: it gives image–caption pairs when the method trains on them (``MethodEntry.pairs``):
            training views (images, captions).
        splits: the train and test item sets (``moco-eval``'s kNN and probe read them).
        corpus: the documents, queries and qrels retrieval is measured on (``monitor ==
            "retrieval"``), else None.
    """

    images: bool = False
    monitor: str = "knn"
    corpus: Any = None
    pairs: bool = False

    def __init__(self, cfg: Config, saved: dict[str, Any] | None = None):
        self.cfg = cfg
        self.splits: Splits | None = None

    def loaders(self, device: torch.device, rank: int, world: int, view: Callable | None = None) -> Loaders:
        """This rank's loaders (``data/loaders.py``'s :class:`Loaders`, made with its helpers).
        ``view``: the CPU path's random view of an item in place of the source's (tests)."""
        raise NotImplementedError

    def plain_loader(self, split: ItemSet, batch_size: int, sampler: Sampler | None = None,
                     pin_memory: bool = False) -> DataLoader:
        """``split``'s deterministic views in index order (or ``sampler``'s), as ``(x, targets,
        indices)`` batches: what ``moco-eval`` encodes (a source without them is refused in one line)."""
        raise UserError(f"config key 'data.name' = {self.cfg.data.name!r}: the source gives moco-eval no plain "
                        "views of its items (DataSource.plain_loader)")

    def probe_loader(self, batch_size: int) -> DataLoader:
        """The linear probe's training batches: the train split under the probe's augmentation."""
        raise UserError(f"config key 'data.name' = {self.cfg.data.name!r}: the source gives the linear probe no "
                        "training views (DataSource.probe_loader)")

    def ranked_pairs(self, split: str, batch_size: int) -> tuple[DataLoader, Any]:
        """Split ``split``'s images, plain, in index order, and every caption of them: what
        image–text recall ranks (``monitor == "pairs"``, ``moco-eval pairs``)."""
        raise UserError(f"config key 'data.name' = {self.cfg.data.name!r}: the source has no image-caption pairs "
                        "to rank (data.name=pairs has, and shards with .txt captions)")

    def ranked_splits(self) -> tuple[str, ...]:
        """The splits :meth:`ranked_pairs` can rank (the ``"pairs"`` monitor is off for another)."""
        return ()

    # ------------------------------------------------------------------ the source's state
    def state(self) -> dict[str, Any]:
        """What a checkpoint keeps of the source beside the model (top-level keys of the snapshot)."""
        return {}

    def misfit(self, saved: dict[str, Any]) -> str | None:
        """Why a checkpoint's snapshot ``saved`` cannot continue with this source, or None."""
        return None

    def write(self, run_dir: Path) -> None:
        """Write the source's state into the run folder as a user reads it (a ``tokenizer.json``)."""

    def items_at(self, epoch: int) -> None:
        """Make the plain train views the items as ``epoch`` cuts them (text's chunks move each
        epoch); items that never move need nothing."""

    def preview(self, loaders: Loaders, n: int, seed: int) -> Tensor | None:
        """Query and key views of the first n training items as training draws them, in [0, 1]:
        (2n, 3, S, S) as q0, k0, q1, k1, ...; None: the items are not images."""
        return None


@dataclass(frozen=True)
class SourceEntry:
    """A registered data source: ``build`` (a :class:`DataSource` subclass, or a function
    ``(cfg.data, seed) -> Splits``), the settings it reads, the defaults of its options the
    schema lacks (``data.params.<name>``), and whether its size is known to fit the device path."""

    build: Callable[..., Any]
    reads: tuple[str, ...] = ()
    in_memory: bool = False
    params: dict[str, Any] = field(default_factory=dict)

    def open(self, cfg: Config, saved: dict[str, Any] | None = None) -> DataSource:
        """The source, for a fresh run (``saved`` None) or a resume from the snapshot ``saved``."""
        if isinstance(self.build, type) and issubclass(self.build, DataSource):
            return self.build(cfg, saved)
        splits = self.build(cfg.data, cfg.train.seed)
        # Imported by name (an edge ARCHITECTURE.md names): both build on the loaders' mechanism,
        # which builds on this protocol, so this module cannot import them in its source.
        if splits.images:  # items with no view of their own: the recipes view them
            return importlib.import_module("moco_engine.data.images.source").ImageSource(cfg, splits)
        return importlib.import_module("moco_engine.data.loaders").SplitsSource(cfg, splits)


SOURCES = Registry("data.name", "data source")


def register_data_source(name: str, build: Callable | None = None, *, reads: tuple[str, ...] = (),
                         in_memory: bool = False, params: dict[str, Any] | None = None, replace: bool = False):
    """Register ``build`` (a :class:`DataSource` subclass, or ``build(cfg.data, seed) -> Splits``)
    under ``name``; a decorator without ``build``."""
    return SOURCES.add(name, build, lambda fn: SourceEntry(fn, tuple(reads), in_memory, dict(params or {})), replace)


def source_entry(name: str) -> SourceEntry:
    """The entry of ``data.name``, the built-in sources registered first.

    Raises:
        ConfigError: no such source (the message lists the registered ones).
    """
    return registry("data.name")[name]


def open_source(cfg: Config, saved: dict[str, Any] | None = None) -> DataSource:
    """Open the data source ``cfg.data.name`` names: for a fresh run, or (``saved``: the
    snapshot of the checkpoint it resumes from) for a resume.

    Raises:
        ConfigError: no such source, or its kept state was made with other settings (named).
        DataError: a missing path, an empty folder, or a folder with no images.
    """
    return source_entry(cfg.data.name).open(cfg, saved)


def build_splits(cfg: DataConfig, seed: int = 0) -> Splits:
    """The train and test item sets of a function-registered source (``data.name``).

    Raises:
        ConfigError: the source is a :class:`DataSource` class (:func:`open_source` opens it).
    """
    entry = source_entry(cfg.name)
    if isinstance(entry.build, type):
        raise ConfigError(f"config key 'data.name' = {cfg.name!r}: a DataSource class, opened whole by open_source")
    return entry.build(cfg, seed)
