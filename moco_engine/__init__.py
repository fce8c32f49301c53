"""moco_engine: momentum-contrast (MoCo) self-supervised pretraining on PyTorch.

The package is in layers, one sub-package each, lowest first: ``config``, ``runtime``,
``method``, ``data``, ``evaluation``, ``run``, ``tools`` (ARCHITECTURE.md). Its face is here::

    from moco_engine import Trainer, load_config, register_backbone

Each name is imported from its layer when first asked for, so ``import moco_engine`` (and the
console scripts' start, a bad config's one-line error) costs no torch import.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

#: The public names and the module that defines each.
FACE = {
    "Config": "moco_engine.config.schema",
    "ConfigError": "moco_engine.config.schema",
    "UserError": "moco_engine.config.schema",
    "load_config": "moco_engine.config.loading",
    "Backbone": "moco_engine.method.backbones",
    "register_backbone": "moco_engine.method.backbones",
    "register_head": "moco_engine.method.heads",
    "register_loss": "moco_engine.method.objectives",
    "Negatives": "moco_engine.method.negatives",
    "NegativeSource": "moco_engine.method.negatives",
    "register_negatives": "moco_engine.method.negatives",
    "register_method": "moco_engine.method.step",
    "StepParts": "moco_engine.method.step",
    "Skipped": "moco_engine.method.step",
    "ItemSet": "moco_engine.data.items",
    "Splits": "moco_engine.data.items",
    "TensorItems": "moco_engine.data.items",
    "DataSource": "moco_engine.data.sources",
    "register_data_source": "moco_engine.data.sources",
    "item_loaders": "moco_engine.data.loaders",
    "ViewSpec": "moco_engine.data.images.recipes",
    "register_recipe": "moco_engine.data.images.recipes",
    "NonFiniteLoss": "moco_engine.run.watch",
    "Trainer": "moco_engine.run.trainer",
    "train": "moco_engine.run.trainer",
    "open_checkpoint": "moco_engine.run.pretrained",
}

__all__ = ["__version__", *FACE]


def __getattr__(name: str) -> Any:
    if name not in FACE:
        raise AttributeError(f"module 'moco_engine' has no attribute {name!r}")
    value = getattr(importlib.import_module(FACE[name]), name)
    globals()[name] = value  # asked once
    return value


def __dir__() -> list[str]:
    return sorted(__all__)
