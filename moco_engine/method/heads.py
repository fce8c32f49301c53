"""Projection heads: a registry from ``model.head`` to a builder of the head after the backbone.

A builder takes the backbone's width, the embedding size D and the hidden width, and returns a
module mapping features (B, width) to embeddings (B, D)::

    @register_head("two_layer")                 # moco_engine.register_head
    def two_layer(width: int, dim: int, hidden_dim: int) -> nn.Module:
        return nn.Sequential(nn.Linear(width, hidden_dim or width), nn.GELU(), nn.Linear(hidden_dim or width, dim))
"""

from __future__ import annotations

from torch import nn

from moco_engine.config.registry import Registry

HEADS = Registry("model.head", "projection head")


def register_head(name: str, build=None, *, replace: bool = False):
    """Register ``build(width, dim, hidden_dim) -> nn.Module`` under ``name``; a decorator without ``build``."""
    return HEADS.add(name, build, lambda fn: fn, replace)


@register_head("linear")
def linear(width: int, dim: int, hidden_dim: int = 0) -> nn.Module:
    """MoCo v1's head: one fc."""
    return nn.Linear(width, dim)


@register_head("linear_no_bias")
def linear_no_bias(width: int, dim: int, hidden_dim: int = 0) -> nn.Module:
    """One fc without bias: CLIP's projections (open_clip's ``text_projection``, its Hugging Face
    text tower's ``proj_type: linear``), what an open_clip export can hold."""
    return nn.Linear(width, dim, bias=False)


@register_head("mlp")
def mlp(width: int, dim: int, hidden_dim: int = 0) -> nn.Module:
    """MoCo v2's head: fc-ReLU-fc (hidden width: ``hidden_dim``, else the backbone's)."""
    hidden = hidden_dim or width
    return nn.Sequential(nn.Linear(width, hidden), nn.ReLU(inplace=True), nn.Linear(hidden, dim))


@register_head("none")
def no_head(width: int, dim: int, hidden_dim: int = 0) -> nn.Module:
    """No projection: the backbone's features are the embeddings (Contriever's), so
    ``model.dim`` must equal the backbone's width (checked in ``encoders.build_encoder``)."""
    return nn.Identity()


def v3_mlp(layers: int, width: int, hidden: int, dim: int, last_bn: bool = True) -> nn.Sequential:
    """MoCo v3's MLP (``_build_mlp`` of its moco/builder.py): every hidden layer is
    Linear(bias=False) -> BatchNorm1d -> ReLU, the last Linear has no bias and, with ``last_bn``,
    a BatchNorm1d(affine=False) after it. (B, width) -> (B, dim)."""
    modules: list[nn.Module] = []
    for layer in range(layers):
        fan_in = width if layer == 0 else hidden
        fan_out = dim if layer == layers - 1 else hidden
        modules.append(nn.Linear(fan_in, fan_out, bias=False))
        if layer < layers - 1:
            modules += [nn.BatchNorm1d(fan_out), nn.ReLU(inplace=True)]
        elif last_bn:
            modules.append(nn.BatchNorm1d(fan_out, affine=False))
    return nn.Sequential(*modules)


@register_head("mlp_bn")
def mlp_bn(width: int, dim: int, hidden_dim: int = 0) -> nn.Module:
    """MoCo v3's projector of ResNets: 2 layers, fc-BN-ReLU-fc-BN (no affine on the last BN).
    Centring the embeddings removes the common direction that randomly initialised ReLU networks
    give all inputs, so short runs start learning at once instead of first escaping that collapse."""
    return v3_mlp(2, width, hidden_dim or width, dim)


@register_head("mlp3_bn")
def mlp3_bn(width: int, dim: int, hidden_dim: int = 0) -> nn.Module:
    """MoCo v3's projector of ViTs: 3 layers (D -> hidden -> hidden -> dim), the last BN too."""
    return v3_mlp(3, width, hidden_dim or width, dim)


def build_head(kind: str, width: int, dim: int, hidden_dim: int = 0) -> nn.Module:
    """The head ``model.head`` names: features (B, width) -> embeddings (B, D)."""
    return HEADS[kind](width, dim, hidden_dim)
