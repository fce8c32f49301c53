"""Projection heads: a registry from ``model.head`` to a builder of the head after the backbone.

A builder takes the backbone's width, the embedding size D and the hidden width, and returns a
module mapping features (B, width) to embeddings (B, D)::

    @HEADS.register("two_layer")                # or moco_engine.register_head
    def two_layer(width: int, dim: int, hidden_dim: int) -> nn.Module:
        return nn.Sequential(nn.Linear(width, hidden_dim or width), nn.GELU(), nn.Linear(hidden_dim or width, dim))
"""

from __future__ import annotations

from torch import nn

from moco_engine.config.registry import Registry

HEADS = Registry("model.head", "projection head")


def register_head(name: str, build=None, *, replace: bool = False):
    """Register ``build(width, dim, hidden_dim) -> nn.Module`` under ``name``; a decorator without ``build``."""
    return HEADS.register(name, build, replace=replace)


@register_head("linear")
def linear(width: int, dim: int, hidden_dim: int = 0) -> nn.Module:
    """MoCo v1's head: one fc."""
    return nn.Linear(width, dim)


@register_head("mlp")
def mlp(width: int, dim: int, hidden_dim: int = 0) -> nn.Module:
    """MoCo v2's head: fc-ReLU-fc (hidden width: ``hidden_dim``, else the backbone's)."""
    hidden = hidden_dim or width
    return nn.Sequential(nn.Linear(width, hidden), nn.ReLU(inplace=True), nn.Linear(hidden, dim))


@register_head("mlp_bn")
def mlp_bn(width: int, dim: int, hidden_dim: int = 0) -> nn.Module:
    """MoCo v3's projector, fc-BN-ReLU-fc-BN (no affine on the last BN). Centring the embeddings
    removes the common direction that randomly initialised ReLU networks give all inputs, so
    short runs start learning at once instead of first escaping that collapse."""
    hidden = hidden_dim or width
    return nn.Sequential(
        nn.Linear(width, hidden, bias=False),
        nn.BatchNorm1d(hidden),
        nn.ReLU(inplace=True),
        nn.Linear(hidden, dim, bias=False),
        nn.BatchNorm1d(dim, affine=False),
    )


def build_head(kind: str, width: int, dim: int, hidden_dim: int = 0) -> nn.Module:
    """The head ``model.head`` names: features (B, width) -> embeddings (B, D)."""
    return HEADS[kind](width, dim, hidden_dim)
