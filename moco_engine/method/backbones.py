"""Backbones: a registry from ``model.arch`` to a builder of the network before the head.

A builder takes the model's settings and the shape of one input, and returns the backbone with
its feature width::

    @register_backbone("mlp")                   # moco_engine.register_backbone
    def mlp(cfg: ModelConfig, input_shape: tuple[int, ...]) -> Backbone:
        d = input_shape[0]                      # one view of an item: (d,)
        return Backbone(nn.Sequential(nn.Linear(d, 256), nn.ReLU(), nn.Linear(256, 256)), width=256)

``input_shape`` is what the data give for one item, without the batch dimension: (3, H, W) for
images; for inputs that are dicts of tensors, a dict of such shapes. The backbone maps a batch of
them (B, *input_shape) to features (B, width). Registering with ``reads=`` the settings the
builder honours among those other backbones read (``model.cifar_stem``, ``model.norm``) makes a
changed one that the chosen backbone ignores draw a warning; with ``params={"width": 256}`` it
takes options the schema lacks, set as ``model.params.width=512`` and read from ``cfg.params``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, NamedTuple

from torch import nn

from moco_engine.config.registry import Registry
from moco_engine.config.schema import ConfigError, ModelConfig
from moco_engine.method.norms import group_norm


class Backbone(NamedTuple):
    """A built backbone: ``module`` maps inputs (B, ...) to features (B, ``width``)."""

    module: nn.Module
    width: int


@dataclass(frozen=True)
class BackboneEntry:
    """A registered backbone: ``build(cfg.model, input_shape) -> Backbone``, the settings it
    reads, and the defaults of its options the schema lacks (``model.params.<name>``)."""

    build: Callable[[ModelConfig, Any], Backbone | tuple[nn.Module, int]]
    reads: tuple[str, ...] = ()
    params: dict[str, Any] = field(default_factory=dict)


BACKBONES = Registry("model.arch", "backbone")


def register_backbone(name: str, build: Callable | None = None, *, reads: tuple[str, ...] = (),
                      params: dict[str, Any] | None = None, replace: bool = False):
    """Register a backbone builder under ``name`` (``model.arch=<name>``); a decorator without ``build``."""
    return BACKBONES.add(name, build, lambda fn: BackboneEntry(fn, tuple(reads), dict(params or {})), replace)


def build_backbone(cfg: ModelConfig, input_shape: Any) -> Backbone:
    """The backbone ``cfg.arch`` names, for inputs of ``input_shape``.

    Raises:
        ConfigError: no such backbone (the message lists the registered ones), or a builder
            that does not return (module, width).
    """
    built = BACKBONES[cfg.arch].build(cfg, input_shape)
    module, width = built
    if not isinstance(module, nn.Module) or not isinstance(width, int) or width < 1:
        raise ConfigError(f"config key 'model.arch' = {cfg.arch!r}: its builder must return (nn.Module, width >= 1), "
                          f"got ({type(module).__name__}, {width!r})")
    return Backbone(module, width)


def resnet(depth: int) -> Callable[[ModelConfig, Any], Backbone]:
    """A builder of torchvision's ResNet-``depth`` without its classifier; ``model.norm=group``
    swaps every BatchNorm for GroupNorm (each sample normalised on its own: results independent
    of how a batch is split); ``model.cifar_stem`` a 3x3 stride-1 stem without max-pool."""

    def build(cfg: ModelConfig, input_shape: Any) -> Backbone:
        import torchvision

        if not isinstance(input_shape, tuple) or len(input_shape) != 3 or input_shape[0] != 3:
            raise ConfigError(f"config key 'model.arch' = {cfg.arch!r}: a ResNet takes RGB images (3, H, W); "
                              f"the data give items of shape {input_shape}")
        # zero_init_residual (MoCo v3's ResNets): each block's last BN starts at scale 0.
        net = getattr(torchvision.models, f"resnet{depth}")(weights=None, zero_init_residual=cfg.zero_init_residual,
                                                            norm_layer=group_norm if cfg.norm == "group" else None)
        width = net.fc.in_features
        net.fc = nn.Identity()
        if cfg.cifar_stem:
            # 32 px images: a 7x7/2 conv and a max-pool would leave an 8x8 map after the stem.
            net.conv1 = nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=1, bias=False)
            net.maxpool = nn.Identity()
        return Backbone(net, width)

    return build


for _depth in (18, 34, 50):
    register_backbone(f"resnet{_depth}", resnet(_depth), reads=("model.cifar_stem", "model.norm", "model.zero_init_residual"))
