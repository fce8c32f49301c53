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
from .rules import CHOICES

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
    The running statistics are the average of the slices' updates; in eval mode it is a plain
    BatchNorm.

    Three forms compute it; they differ in speed, and ``strided`` also in which samples share a
    slice (any fixed partition serves: the loader's order is random and the keys are shuffled):

    - ``per_slice``: contiguous slices (the batch cut into ``num_splits`` parts, as DDP cuts a
      global batch), one native batch_norm each; also the form of every ragged batch;
    - ``one_pass``: the same contiguous slices, one reduction and one scale-and-shift for all;
    - ``strided``: slice k is samples k, k + s, k + 2s, ... (the MoCo demo's partition), so
      the batch is one native batch_norm over s·C channels of an (N/s, s·C, H, W) view, a free
      view of a contiguous (NCHW) batch; a channels_last batch is copied to NCHW and back.

    ``form`` (``model.bn_split_form``) picks one for even batches; "auto" is per_slice on a CPU
    (measured fastest there, BENCHMARKS.md) and strided on a GPU, where a step at 32 px is bound
    by kernel launches: strided dispatches the fewest operators per step (``moco-bench --ops``:
    1,073 against one_pass's 1,733 and per_slice's 2,233 for the demo's 8 slices), and stays
    the GPU's default until GPU timings of the three decide.
    """

    FORMS = CHOICES["model.bn_split_form"]

    def __init__(self, num_features: int, num_splits: int, form: str = "auto", **kw) -> None:
        super().__init__(num_features, **kw)
        if form not in self.FORMS:
            raise ValueError(f"unknown split-BN form {form!r}; choose from {', '.join(self.FORMS)}")
        self.num_splits = num_splits
        self.form = form

    @staticmethod
    def resolve_form(form: str, device: torch.device) -> str:
        """The form "auto" stands for on ``device`` (any other form is itself)."""
        return form if form != "auto" else ("per_slice" if device.type == "cpu" else "strided")

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, num_splits={self.num_splits}, form={self.form}"

    def _check_input_dim(self, x: Tensor) -> None:
        if x.dim() not in (2, 4):
            raise ValueError(f"expected (N, C) or (N, C, H, W) input, got {tuple(x.shape)}")

    def forward(self, x: Tensor) -> Tensor:
        """x: (N, C, *spatial) -> same shape."""
        n = x.shape[0]
        s = self.num_splits
        if not self.training or s == 1:
            return super().forward(x)
        form = self.resolve_form(self.form, x.device)
        if n % s == 0 and form == "one_pass":
            return self._one_pass(x, s)
        if n % s == 0 and form == "strided":
            return self._strided(x, s)
        # On CPU, and for a ragged batch, one native batch_norm per slice. On CPU that is the
        # fastest form for the channels_last batches the engine uses (2 cores, the CIFAR
        # ResNet-18 at batch 64: a MoCo step costs what it costs with plain BatchNorm; the
        # one-pass form's extra elementwise passes cost 2-4x a layer, the strided form's copies
        # to NCHW and back 1.2x the step). `moco-bench --split-bn` compares the forms.
        # A ragged batch gets at most n // 2 slices, so that every slice has two samples.
        return self._per_slice(x, s if n % s == 0 else max(1, min(s, n // 2)))

    def _momentum(self) -> float:
        """The running statistics' update factor (momentum=None: the cumulative average)."""
        return self.momentum if self.momentum is not None else 1.0 / float(self.num_batches_tracked + 1)

    def _per_slice(self, x: Tensor, s: int) -> Tensor:
        """Split-BN as ``s`` calls of the native batch_norm, one per slice (of unequal sizes when
        N % s != 0; a batch smaller than s leaves some slices empty)."""
        # torch.split, not tensor_split: the slices' gradients then come back as one cat, where
        # tensor_split's come back as one zero-filled full-size tensor per slice, summed.
        n = x.shape[0]
        sizes = [n // s + (k < n % s) for k in range(s)]  # tensor_split's sizes: the first n % s one longer
        parts = x.split(sizes)
        if not self.track_running_stats:
            return torch.cat([F.batch_norm(p, None, None, self.weight, self.bias, True, 0.0, self.eps) for p in parts])
        # Each slice updates its own copy of the running statistics; their mean is kept.
        stats = [(self.running_mean.clone(), self.running_var.clone()) for _ in range(s)]
        momentum = self._momentum()
        out = torch.cat([
            F.batch_norm(p, mean, var, self.weight, self.bias, True, momentum, self.eps) if len(p) else p
            for p, (mean, var) in zip(parts, stats)
        ])
        self._keep_mean_stats(torch.stack([m for m, _ in stats]), torch.stack([v for _, v in stats]))
        return out

    def _one_pass(self, x: Tensor, s: int) -> Tensor:
        """Split-BN of a batch of N = m·s samples in one pass: slice k is samples k·m … (k+1)·m − 1.

        Contiguous slices are what DDP gives each of s GPUs, and the batch axis is outermost in
        both memory formats, so the slices are views: a channels_last (NHWC) batch is viewed as
        (s, m·H·W, C) and each (slice, channel)'s statistics are one reduction over the middle
        axis. The output is ``x·scale + shift`` with per-sample (N, C) factors, computed on x
        itself, so it keeps x's memory format and is no view (an in-place ReLU after it must not
        hit a view, which autograd would make a full copy of the base).
        """
        n, c = x.shape[:2]
        m = n // s
        if x.dim() == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last):
            var, mean = torch.var_mean(x.permute(0, 2, 3, 1).reshape(s, -1, c), dim=1, correction=0)
        else:
            var, mean = torch.var_mean(x.reshape(s, m, c, -1), dim=(1, 3), correction=0)
        # (s, C) statistics -> per-sample factors (N, C), in float32 then the input's dtype.
        scale = torch.rsqrt(var.float() + self.eps)
        if self.weight is not None:
            scale = scale * self.weight
        shift = -mean.float() * scale
        if self.bias is not None:
            shift = shift + self.bias
        per_sample = (n, c) + (1,) * (x.dim() - 2)
        out = torch.addcmul(
            shift.to(x.dtype).repeat_interleave(m, dim=0).view(per_sample),
            x,
            scale.to(x.dtype).repeat_interleave(m, dim=0).view(per_sample),
        )
        if self.track_running_stats:
            count = x.numel() // (s * c)
            with torch.no_grad():
                momentum = self._momentum()
                unbiased = var.float() * (count / max(count - 1, 1))  # BN keeps the unbiased variance
                self._keep_mean_stats(torch.lerp(self.running_mean, mean.float(), momentum),
                                      torch.lerp(self.running_var, unbiased, momentum))
        return out

    def _strided(self, x: Tensor, s: int) -> Tensor:
        """Split-BN of a batch of N = m·s samples as one native batch_norm: slice k is samples
        k, k + s, ..., viewed as the k-th group of C channels of an (m, s·C, *spatial) tensor.

        Each slice's running statistics are a repeated copy (s·C,) that the native kernel
        updates; their per-channel mean is kept.
        """
        n, c = x.shape[:2]
        channels_last = x.dim() == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last)
        grouped = x.contiguous().view(n // s, s * c, *x.shape[2:])  # a copy only if x is not NCHW
        weight = self.weight.repeat(s) if self.weight is not None else None
        bias = self.bias.repeat(s) if self.bias is not None else None
        if self.track_running_stats:
            mean, var = self.running_mean.repeat(s), self.running_var.repeat(s)
            out = F.batch_norm(grouped, mean, var, weight, bias, True, self._momentum(), self.eps)
            self._keep_mean_stats(mean.view(s, c), var.view(s, c))
        else:
            out = F.batch_norm(grouped, None, None, weight, bias, True, 0.0, self.eps)
        out = out.view(x.shape)
        return out.contiguous(memory_format=torch.channels_last) if channels_last else out

    @torch.no_grad()
    def _keep_mean_stats(self, means: Tensor, variances: Tensor) -> None:
        """Each slice updated its own copy (s, C) of the running statistics; keep their mean."""
        self.running_mean.copy_(means.mean(0))
        self.running_var.copy_(variances.mean(0))
        self.num_batches_tracked.add_(1)


def split_bn(module: nn.Module, num_splits: int, form: str = "auto") -> nn.Module:
    """Replace every BatchNorm1d/2d in ``module`` by a :class:`SplitBatchNorm` (in place)."""
    for name, child in module.named_children():
        if isinstance(child, (nn.BatchNorm1d, nn.BatchNorm2d)):
            split = SplitBatchNorm(child.num_features, num_splits, form, eps=child.eps, momentum=child.momentum,
                                   affine=child.affine)
            split.load_state_dict(child.state_dict())
            setattr(module, name, split)
        else:
            split_bn(child, num_splits, form)
    return module


def group_norm(channels: int) -> nn.GroupNorm:
    """GroupNorm with 32 groups (fewer when the channels do not allow), Wu & He 2018's default."""
    return nn.GroupNorm(math.gcd(32, channels), channels)


def build_backbone(arch: str, cifar_stem: bool, norm: str = "batch") -> tuple[nn.Module, int]:
    """A torchvision ResNet without its classifier; ``norm="group"`` swaps every BatchNorm for
    GroupNorm (each sample normalised on its own: results independent of how a batch is split).

    Returns:
        (backbone, width): backbone maps images (B, 3, H, W) to features (B, width).
    """
    net = BACKBONES[arch](weights=None, norm_layer=group_norm if norm == "group" else None)
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


def build_predictor(dim: int, hidden: int) -> nn.Module:
    """BYOL's predictor q_θ: fc-BN-ReLU-fc, (B, D) -> (B, D)."""
    return nn.Sequential(nn.Linear(dim, hidden), nn.BatchNorm1d(hidden), nn.ReLU(inplace=True), nn.Linear(hidden, dim))


class OnlineNetwork(nn.Module):
    """BYOL's online branch: the query encoder's backbone and projector, then the predictor.

    ``forward(x)`` returns (prediction (B, D), projection (B, D)), neither normalised.
    """

    def __init__(self, encoder: Encoder, predictor: nn.Module) -> None:
        super().__init__()
        self.encoder = encoder
        self.predictor = predictor

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        projection = self.encoder.head(self.encoder.backbone(x))
        return self.predictor(projection), projection


def build_encoder(cfg: ModelConfig) -> Encoder:
    """The query encoder f_q described by ``cfg`` (the key encoder is its :class:`MomentumEncoder`)."""
    backbone, width = build_backbone(cfg.arch, cfg.cifar_stem, cfg.norm)
    encoder = Encoder(backbone, build_head(cfg.head, width, cfg.dim, cfg.hidden_dim))
    if cfg.bn == "sync":
        return nn.SyncBatchNorm.convert_sync_batchnorm(encoder)
    return split_bn(encoder, cfg.bn_splits, cfg.bn_split_form) if cfg.bn_splits > 1 else encoder


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

    @torch.no_grad()
    def relative_distance(self, query_encoder: nn.Module) -> Tensor:
        """‖θ_q − θ_k‖ / ‖θ_q‖ over all parameters, a 0-d tensor: how far f_k lags behind f_q
        (0 at the start; about (1−m)-scaled drift per step after)."""
        key_params = list(self.encoder.parameters())
        query_params = [p.detach() for p in query_encoder.parameters()]
        diff = torch.stack(torch._foreach_norm(torch._foreach_sub(query_params, key_params))).norm()
        return diff / torch.stack(torch._foreach_norm(query_params)).norm().clamp(min=1e-12)

