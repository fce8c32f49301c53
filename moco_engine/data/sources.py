"""Data sources: a registry from ``data.name`` to a builder of the train and test splits.

A builder takes the data settings and the run's seed and returns :class:`~moco_engine.data.items.Splits`::

    @register_data_source("points")             # moco_engine.register_data_source
    def points(cfg: DataConfig, seed: int) -> Splits:
        x = torch.randn(1000, 8, generator=torch.Generator().manual_seed(seed))
        noisy = lambda v: v + 0.1 * torch.randn_like(v)
        return Splits(TensorItems(x), None, view=noisy, plain=lambda v: v)

Image sources return image sets and no view: their views are the ``data.augmentation`` recipe
(``recipes.py``), on either input path. Others return their own ``view`` and ``plain``, and
train on the CPU path. ``reads`` names the ``data.*`` settings a source honours among those
other sources read (a changed one the chosen source ignores draws a warning); ``in_memory``
marks the sources whose size is known to fit the device path (``data.pipeline=auto``);
``params`` declares options the schema lacks (``data.params.<name>``, read from ``cfg.params``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from moco_engine.config.registry import Registry, registry
from moco_engine.config.schema import DataConfig
from moco_engine.data.items import Splits


@dataclass(frozen=True)
class SourceEntry:
    """A registered data source: ``build(cfg.data, seed) -> Splits``, the settings it reads,
    the defaults of its options the schema lacks (``data.params.<name>``), and whether its size
    is known to fit the device path."""

    build: Callable[[DataConfig, int], Splits]
    reads: tuple[str, ...] = ()
    in_memory: bool = False
    params: dict[str, Any] = field(default_factory=dict)


SOURCES = Registry("data.name", "data source")


def register_data_source(name: str, build: Callable | None = None, *, reads: tuple[str, ...] = (),
                         in_memory: bool = False, params: dict[str, Any] | None = None, replace: bool = False):
    """Register ``build(cfg.data, seed) -> Splits`` under ``name``; a decorator without ``build``."""
    return SOURCES.add(name, build, lambda fn: SourceEntry(fn, tuple(reads), in_memory, dict(params or {})), replace)


def build_splits(cfg: DataConfig, seed: int = 0) -> Splits:
    """Open the data source ``cfg.name`` names.

    Raises:
        ConfigError: no such source (the message lists the registered ones).
        DataError: a missing path, an empty folder, or a folder with no images.
    """
    return registry("data.name")[cfg.name].build(cfg, seed)  # the built-in sources registered first
