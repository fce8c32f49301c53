"""Any timm model as the backbone: ``model.arch=timm:<name>`` (``timm:resnet18``,
``timm:convnext_tiny``, ``timm:vit_small_patch16_224`` ...).

The model is built by ``timm.create_model(name, pretrained=False, num_classes=0,
**model.timm_kwargs)``: without its classifier, its feature width read from the model
(``num_features``), never downloading weights. timm is imported only by the runs that use it.
"""

from __future__ import annotations

import difflib
from typing import Any

from moco_engine.config.schema import ConfigError, ModelConfig
from moco_engine.method.backbones import Backbone, register_backbone


@register_backbone("timm:", reads=("model.timm_kwargs",))
def timm_model(cfg: ModelConfig, input_shape: Any) -> Backbone:
    name = cfg.arch.split(":", 1)[1]
    try:
        import timm
    except ImportError:
        raise ConfigError(f"config key 'model.arch' = {cfg.arch!r}: the timm package is not installed "
                          "(pip install timm)") from None
    if name not in timm.list_models():
        close = difflib.get_close_matches(name, timm.list_models(), n=3)
        raise ConfigError(f"config key 'model.arch' = {cfg.arch!r}: timm has no model {name!r}"
                          + (f" (close: {', '.join('timm:' + c for c in close)})" if close else ""))
    try:
        model = timm.create_model(name, pretrained=False, num_classes=0, **cfg.timm_kwargs)
    except TypeError as e:  # an option the model's constructor does not take
        raise ConfigError(f"config key 'model.timm_kwargs' = {dict(cfg.timm_kwargs)}: {e}") from None
    return Backbone(model, int(model.num_features))
