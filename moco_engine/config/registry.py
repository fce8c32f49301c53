"""Registries: the places a user extends the engine, each a name -> entry table behind one setting.

| setting | registry (its owner) | entry |
| --- | --- | --- |
| ``method`` | ``method.step.METHODS`` | a step and the parts it has built |
| ``model.arch`` | ``method.backbones.BACKBONES`` | a builder of (backbone, feature width) |
| ``model.head`` | ``method.heads.HEADS`` | a builder of the projection head |
| ``loss.name`` | ``method.objectives.LOSSES`` | the objective and its hyper-parameters |
| ``negatives.kind`` | ``method.negatives.NEGATIVES`` | a builder of the negative source |
| ``data.name`` | ``data.sources.SOURCES`` | a ``DataSource`` class, or a function returning the splits |
| ``data.augmentation`` | ``data.images.recipes.RECIPES`` | a view recipe (``ViewSpec``) |

Each owner creates its registry and registers the built-in entries; a user adds one with the
``moco_engine.register_*`` helpers (each makes its registry's entry and calls ``Registry.add``)
before loading a config. The config layer sits below every owner, so it names them in :data:`OWNERS` and imports
an owner by that name the first time its registry is asked for: the one import that runs upward,
so that ``load_config`` checks each of these settings against every registered name.

An entry says which settings it reads (``reads``: dotted keys or whole groups); a setting that
some entry of the registry reads and the chosen one does not is ignored by the run, and changing
it draws one warning (``rules.ignored_settings``).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any

from moco_engine.config.schema import ConfigError

#: Each registry-backed setting and the module that owns its registry (then any other modules
#: that register built-in entries in it).
OWNERS = {
    "method": ("moco_engine.method.step", "moco_engine.method.moco", "moco_engine.method.moco_v3",
               "moco_engine.method.byol", "moco_engine.method.itc"),
    "model.arch": ("moco_engine.method.backbones", "moco_engine.method.vit", "moco_engine.method.timm_backbones",
                   "moco_engine.method.text_encoder"),
    "model.head": "moco_engine.method.heads",
    "loss.name": "moco_engine.method.objectives",
    "negatives.kind": ("moco_engine.method.negatives", "moco_engine.method.memory_bank"),
    "data.name": ("moco_engine.data.sources", "moco_engine.data.images.sources", "moco_engine.data.text.source",
                  "moco_engine.data.shards.source", "moco_engine.data.pairs.source"),
    "data.augmentation": "moco_engine.data.images.recipes",
}

#: The registries created so far, by setting.
REGISTRIES: dict[str, Registry] = {}


class Registry:
    """The names one setting may take, each with its entry.

    Args:
        key: the setting the names are chosen with (``model.arch``).
        what: what an entry is, for messages ("backbone").
    """

    def __init__(self, key: str, what: str):
        if key not in OWNERS:
            raise ValueError(f"no owner is named for setting {key!r} (config.registry.OWNERS)")
        self.key, self.what = key, what
        self.entries: dict[str, Any] = {}
        self.complete = False  # every module of its OWNERS imported
        REGISTRIES[key] = self

    def register(self, name: str, entry: Any, *, replace: bool = False) -> Any:
        """Register ``entry`` under ``name`` (a name taken already is refused unless ``replace``).
        A name ending in ":" is a family: ``"timm:"`` stands for every ``timm:<model>``, its
        entry reading the rest."""
        if not isinstance(name, str) or not name.rstrip(":") or any(c.isspace() or c in "=,{}[]" for c in name):
            raise ValueError(f"{self.what} name {name!r}: give a non-empty name without spaces, '=', ',' or brackets")
        if name in self.entries and not replace:
            raise ValueError(f"{self.what} {name!r} is registered already ({self.key}); pass replace=True to replace it")
        self.entries[name] = entry
        return entry

    def add(self, name: str, build: Callable | None, entry_of: Callable[[Callable], Any], replace: bool = False) -> Any:
        """Register ``entry_of(build)`` under ``name``; without ``build``, a decorator that does
        so and hands back what it decorates (the form of every ``register_*`` helper)."""
        if build is None:
            def decorate(fn: Callable) -> Callable:
                self.register(name, entry_of(fn), replace=replace)
                return fn
            return decorate
        return self.register(name, entry_of(build), replace=replace)

    def names(self) -> tuple[str, ...]:
        """The registered names, in the order they were registered."""
        return tuple(self.entries)

    def __iter__(self):
        return iter(self.entries)

    def __contains__(self, name: str) -> bool:
        try:
            self[name]
        except ConfigError:
            return False
        return True

    def __getitem__(self, name: str) -> Any:
        """The entry of ``name``.

        Raises:
            ConfigError: no entry of that name; the message lists the registered names.
        """
        family = name.split(":", 1)[0] + ":" if ":" in name else None
        if name not in self.entries and family in self.entries and name != family:
            return self.entries[family]
        if name not in self.entries or name.endswith(":"):
            shown = [n + "<name>" if n.endswith(":") else n for n in self.entries]
            raise ConfigError(f"config key '{self.key}' = {name!r}: no {self.what} of that name is registered "
                              f"(registered: {', '.join(shown)})")
        return self.entries[name]


def registry(key: str) -> Registry:
    """The registry of setting ``key``, its owner imported (and so its built-ins registered)."""
    if key not in REGISTRIES or not REGISTRIES[key].complete:
        owners = OWNERS[key]
        for module in (owners,) if isinstance(owners, str) else owners:
            importlib.import_module(module)
        REGISTRIES[key].complete = True
    return REGISTRIES[key]


def reads(entry: Any) -> tuple[str, ...]:
    """The settings an entry reads (its ``reads`` attribute; none if it has none)."""
    return tuple(getattr(entry, "reads", ()))


def covers(patterns: tuple[str, ...], key: str) -> bool:
    """Whether dotted ``key`` is one of ``patterns`` or lies in one of their groups."""
    return any(key == p or key.startswith(p + ".") for p in patterns)


def params_of(entry: Any) -> dict[str, Any]:
    """The hyper-parameters an entry takes from its group's ``params`` (name -> default)."""
    return dict(getattr(entry, "params", {}) or {})

