"""The query encoder, its momentum (EMA) copy the key encoder, and BatchNorm handling.

Names follow the MoCo paper: the query encoder f_q gets gradients; the key encoder f_k is
θ_k ← m·θ_k + (1−m)·θ_q after every optimizer step and gets none.
"""

from __future__ import annotations

import copy
import math

import torch
import torch.nn.functional as F
import torchvision
from torch import Tensor, nn

from .config import ModelConfig

BACKBONES = {
    "resnet18": torchvision.models.resnet18,
    "resnet34": torchvision.models.resnet34,
    "resnet50": torchvision.models.resnet50,
}


class SplitBatchNorm(nn.modules.batchnorm._BatchNorm):
    """BatchNorm whose training statistics come from ``num_splits`` slices of the batch.

    Takes (N, C) or (N, C, H, W) input, so it stands in for BatchNorm1d (heads) and
    BatchNorm2d (backbones) alike.

    On one process this simulates ``num_splits`` GPUs each normalising its own sub-batch, which
    is what makes MoCo's shuffle-BN matter (the MoCo authors' CIFAR-10 demo uses 8 slices).
    Sample ``i`` of the batch falls in slice ``i % num_splits``. The running statistics are the
    average of the slices' updates; in eval mode it is a plain BatchNorm.
    """

    def __init__(self, num_features: int, num_splits: int, **kw) -> None:
        super().__init__(num_features, **kw)
        self.num_splits = num_splits

    def _check_input_dim(self, x: Tensor) -> None:
        if x.dim() not in (2, 4):
            raise ValueError(f"expected (N, C) or (N, C, H, W) input, got {tuple(x.shape)}")

    def forward(self, x: Tensor) -> Tensor:
        """x: (N, C, *spatial) -> same shape."""
        n, c, *spatial = x.shape
        s = self.num_splits
        if not self.training or s == 1:
            return super().forward(x)
        if n % s:
            # A ragged batch: normalise each uneven slice on its own (rare, so a loop is fine).
            stats = [(self.running_mean.clone(), self.running_var.clone()) for _ in range(s)]
            out = None
            for i, (mean, var) in enumerate(stats):
                part = F.batch_norm(x[i::s], mean, var, self.weight, self.bias, True, self.momentum, self.eps)
                out = part.new_empty(x.shape) if out is None else out
                out[i::s] = part
            self._keep_mean_stats(torch.stack([m for m, _ in stats]), torch.stack([v for _, v in stats]))
            return out
        # Fold the slices into channels: (N, C, ...) -> (N/s, s*C, ...); channel j*C + c is
        # channel c of the samples with i % s == j, so one batch_norm call does all slices.
        running_mean = self.running_mean.repeat(s)
        running_var = self.running_var.repeat(s)
        out = F.batch_norm(
            x.reshape(n // s, s * c, *spatial),
            running_mean,
            running_var,
            None if self.weight is None else self.weight.repeat(s),
            None if self.bias is None else self.bias.repeat(s),
            True,
            self.momentum,
            self.eps,
        )
        self._keep_mean_stats(running_mean.view(s, c), running_var.view(s, c))
        return out.reshape(x.shape)

    @torch.no_grad()
    def _keep_mean_stats(self, means: Tensor, variances: Tensor) -> None:
        """Each slice updated its own copy (s, C) of the running statistics; keep their mean."""
        self.running_mean.copy_(means.mean(0))
        self.running_var.copy_(variances.mean(0))
        self.num_batches_tracked.add_(1)


def split_bn(module: nn.Module, num_splits: int) -> nn.Module:
    """Replace every BatchNorm2d in ``module`` by a :class:`SplitBatchNorm` (in place)."""
    for name, child in module.named_children():
        if isinstance(child, (nn.BatchNorm1d, nn.BatchNorm2d)):
            split = SplitBatchNorm(child.num_features, num_splits, eps=child.eps, momentum=child.momentum, affine=child.affine)
            split.load_state_dict(child.state_dict())
            setattr(module, name, split)
        else:
            split_bn(child, num_splits)
    return module


def build_backbone(arch: str, cifar_stem: bool) -> tuple[nn.Module, int]:
    """A torchvision ResNet without its classifier.

    Returns:
        (backbone, width): backbone maps images (B, 3, H, W) to features (B, width).
    """
    net = BACKBONES[arch](weights=None)
    width = net.fc.in_features
    net.fc = nn.Identity()
    if cifar_stem:
        # 32 px images: a 7x7/2 conv and a max-pool would leave an 8x8 map after the stem.
        net.conv1 = nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=1, bias=False)
        net.maxpool = nn.Identity()
    return net, width


def build_head(kind: str, width: int, dim: int, hidden_dim: int = 0) -> nn.Module:
    """Projection head from backbone features (B, width) to embeddings (B, D).

    - ``linear``: MoCo v1, one fc.
    - ``mlp``: MoCo v2, fc-ReLU-fc.
    - ``mlp_bn``: MoCo v3's projector, fc-BN-ReLU-fc-BN (no affine on the last BN). Centring the
      embeddings removes the common direction that randomly initialised ReLU networks give all
      images, so short runs start learning at once instead of first escaping that collapse.
    """
    if kind == "linear":
        return nn.Linear(width, dim)
    hidden = hidden_dim or width
    if kind == "mlp":
        return nn.Sequential(nn.Linear(width, hidden), nn.ReLU(inplace=True), nn.Linear(hidden, dim))
    return nn.Sequential(
        nn.Linear(width, hidden, bias=False),
        nn.BatchNorm1d(hidden),
        nn.ReLU(inplace=True),
        nn.Linear(hidden, dim, bias=False),
        nn.BatchNorm1d(dim, affine=False),
    )


class Encoder(nn.Module):
    """Backbone + projection head; ``forward`` returns L2-normalised embeddings.

    Attributes:
        backbone: images (B, 3, H, W) -> features (B, width).
        head: features (B, width) -> embeddings (B, D).
    """

    def __init__(self, backbone: nn.Module, head: nn.Module) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = head

    def forward(self, x: Tensor) -> Tensor:
        """x: (B, 3, H, W) -> (B, D), unit norm."""
        return F.normalize(self.head(self.backbone(x)), dim=1)


def build_encoder(cfg: ModelConfig) -> Encoder:
    """The query encoder f_q described by ``cfg`` (the key encoder is its :class:`MomentumEncoder`)."""
    backbone, width = build_backbone(cfg.arch, cfg.cifar_stem)
    encoder = Encoder(backbone, build_head(cfg.head, width, cfg.dim, cfg.hidden_dim))
    return split_bn(encoder, cfg.bn_splits) if cfg.bn_splits > 1 else encoder


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

    def forward(self, x: Tensor) -> Tensor:
        return self.encoder(x)

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


def momentum_at(base: float, schedule: str, step: int, total_steps: int) -> float:
    """The EMA momentum m at ``step`` of ``total_steps``.

    ``constant``: m = base. ``cosine`` (BYOL's): m rises from base to 1,
    m = 1 − (1 − base)·(cos(π·step/total) + 1)/2.
    """
    if schedule == "constant" or total_steps <= 0:
        return base
    progress = min(step / total_steps, 1.0)
    return 1.0 - (1.0 - base) * (math.cos(math.pi * progress) + 1.0) / 2.0
