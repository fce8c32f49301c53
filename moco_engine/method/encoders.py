"""The query encoder (a registered backbone and head), its momentum (EMA) copy the key encoder,
and the online network of a method with a predictor (whose predictor is the method's own:
``byol.py``, ``moco_v3.py``).

Names follow the MoCo paper: the query encoder f_q gets gradients; the key encoder f_k is
θ_k ← m·θ_k + (1−m)·θ_q after every optimizer step and gets none.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from moco_engine.config.schema import ConfigError, ModelConfig
from moco_engine.method.backbones import build_backbone
from moco_engine.method.heads import build_head
from moco_engine.method.norms import split_bn


class Encoder(nn.Module):
    """Backbone + projection head; ``forward`` returns L2-normalised embeddings.

    Attributes:
        backbone: inputs (B, ...) (a tensor, or a dict of tensors) -> features (B, width).
        head: features (B, width) -> embeddings (B, D).
        width: the backbone's feature width (the linear probe's input).
    """

    def __init__(self, backbone: nn.Module, head: nn.Module, width: int | None = None, normalize: bool = True) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = head
        self.normalize = normalize
        # Without a width given, the head's first linear layer tells it.
        self.width = width or next(m for m in head.modules() if isinstance(m, nn.Linear)).in_features

    def forward(self, x: Any) -> Tensor:
        """x: (B, ...) -> (B, D), unit norm (``model.normalize=false``: as the head gives them)."""
        z = self.head(self.backbone(x))
        return F.normalize(z, dim=1) if self.normalize else z


class OnlineNetwork(nn.Module):
    """The online branch of a method with a predictor (BYOL, MoCo v3): the query encoder's
    backbone and projector, then the predictor.

    ``forward(x)`` returns (prediction (B, D), projection (B, D)), neither normalised.
    """

    def __init__(self, encoder: Encoder, predictor: nn.Module) -> None:
        super().__init__()
        self.encoder = encoder
        self.predictor = predictor

    def forward(self, x: Any) -> tuple[Tensor, Tensor]:
        projection = self.encoder.head(self.encoder.backbone(x))
        return self.predictor(projection), projection


def build_encoder(cfg: ModelConfig, input_shape: Any) -> Encoder:
    """The query encoder f_q described by ``cfg`` for inputs of ``input_shape`` (one item's, no
    batch dimension; see ``backbones.py``); the key encoder is its :class:`MomentumEncoder`."""
    backbone, width = build_backbone(cfg, input_shape)
    if cfg.head == "none" and cfg.dim != width:
        raise ConfigError(f"config key 'model.dim' = {cfg.dim}: with model.head=none the embeddings are the "
                          f"backbone's features, so D must be its width ({width})")
    head = build_head(cfg.head, width, cfg.dim, cfg.hidden_dim)
    return batch_norm_as_configured(Encoder(backbone, head, width, cfg.normalize), cfg)


def batch_norm_as_configured(module: nn.Module, cfg: ModelConfig) -> nn.Module:
    """``module`` with its BatchNorms as ``model.bn`` and ``model.bn_splits`` ask: SyncBatchNorm,
    split-BN, or as they are."""
    if cfg.bn == "sync":
        return nn.SyncBatchNorm.convert_sync_batchnorm(module)
    return split_bn(module, cfg.bn_splits, cfg.bn_split_form) if cfg.bn_splits > 1 else module


class MomentumEncoder(nn.Module):
    """The key encoder f_k: an exponential moving average of the query encoder f_q.

    It starts as an exact copy of f_q and never takes gradients. :meth:`update` applies
    θ_k ← m·θ_k + (1−m)·θ_q to every parameter in one fused ``torch._foreach_lerp_`` call, instead
    of a Python loop over parameters.

    BatchNorm buffers (running mean/var) are *not* averaged: as in the official MoCo, f_k keeps its
    own running statistics, accumulated from the key batches it normalises in training mode. They
    are used only if f_k is run in eval mode, which training never does.
    """

    def __init__(self, query_encoder: nn.Module) -> None:
        super().__init__()
        self.encoder = copy.deepcopy(query_encoder)
        for p in self.encoder.parameters():
            p.requires_grad_(False)

    def forward(self, *x: Any) -> Any:
        """f_k on what f_q takes (two towers take images and captions)."""
        return self.encoder(*x)

    @torch.no_grad()
    def update(self, query_encoder: nn.Module, momentum: float) -> None:
        """θ_k ← m·θ_k + (1−m)·θ_q, over all parameters in one fused op.

        ``momentum`` = 1 leaves f_k unchanged, 0 copies f_q into it.
        """
        key_params = list(self.encoder.parameters())
        query_params = [p.detach() for p in query_encoder.parameters()]
        if len(key_params) != len(query_params):
            raise ValueError("query and key encoders have different parameter lists")
        torch._foreach_lerp_(key_params, query_params, 1.0 - momentum)

    @torch.no_grad()
    def relative_distance(self, query_encoder: nn.Module) -> Tensor:
        """‖θ_q − θ_k‖ / ‖θ_q‖ over all parameters, a 0-d tensor: how far f_k lags behind f_q
        (0 at the start; about (1−m)-scaled drift per step after)."""
        key_params = list(self.encoder.parameters())
        query_params = [p.detach() for p in query_encoder.parameters()]
        diff = torch.stack(torch._foreach_norm(torch._foreach_sub(query_params, key_params))).norm()
        return diff / torch.stack(torch._foreach_norm(query_params)).norm().clamp(min=1e-12)

