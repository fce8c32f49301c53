"""BatchNorm handling of the encoders: split-BN (MoCo's simulation of per-GPU BatchNorm on one
process) and GroupNorm, the normalisation that shares no statistics between samples."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from moco_engine.config.rules import CHOICES


class SplitBatchNorm(nn.modules.batchnorm._BatchNorm):
    """BatchNorm whose training statistics come from ``num_splits`` slices of the batch.

    Takes (N, C, *) input, so it stands in for BatchNorm1d (heads, sequences) and BatchNorm2d
    (image backbones) alike.

    On one process this simulates ``num_splits`` GPUs each normalising its own sub-batch, which
    is what makes MoCo's shuffle-BN matter (the MoCo authors' CIFAR-10 demo uses 8 slices).
    The running statistics are the average of the slices' updates; in eval mode it is a plain
    BatchNorm.

    Four forms compute it; they differ in speed, and in which samples share a slice (any fixed
    partition serves: the loader's order is random and the keys are shuffled):

    - ``per_slice``: contiguous slices (the batch cut into ``num_splits`` parts, as DDP cuts a
      global batch), one native batch_norm each; also the form of every ragged batch;
    - ``one_pass``: the same contiguous slices, one reduction and one scale-and-shift for all;
    - ``strided``: slice k is samples k, k + s, k + 2s, ... (the MoCo demo's partition), so
      the batch is one native batch_norm over s·C channels of an (N/s, s·C, H, W) view, a free
      view of a contiguous (NCHW) batch; a channels_last batch is copied to NCHW and back;
    - ``grouped``: for a channels_last batch, contiguous slices, as one native group norm over
      (slice, channel) groups of an (s, C, N/s, H, W) view, free in NHWC memory; any other
      layout (NCHW, (N, C) features) takes the strided form, free there.

    No native batch_norm can take a channels_last batch's slices without a copy: its channels
    must be one axis, and slice and channel are never neighbours in NHWC memory (the batch axis
    is outermost, the channels innermost). A group norm reduces over (slice, channel) pairs of a
    5-D view instead.

    ``form`` (``model.bn_split_form``) picks one for even batches; "auto" is per_slice on a CPU
    (measured fastest there, BENCHMARKS.md) and grouped on a GPU, where a step at 32 px is bound
    by kernel launches: grouped dispatches the fewest operators per step (``moco-bench --ops``,
    BENCHMARKS.md), and stays the GPU's default until GPU timings of the forms decide.
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
        return form if form != "auto" else ("per_slice" if device.type == "cpu" else "grouped")

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, num_splits={self.num_splits}, form={self.form}"

    def _check_input_dim(self, x: Tensor) -> None:
        if x.dim() < 2:
            raise ValueError(f"expected (N, C, *) input, got {tuple(x.shape)}")

    def forward(self, x: Tensor) -> Tensor:
        """x: (N, C, *spatial) -> same shape."""
        n = x.shape[0]
        s = self.num_splits
        if not self.training or s == 1:
            return super().forward(x)
        form = self.resolve_form(self.form, x.device)
        if n % s == 0 and form == "grouped":  # its view is free in NHWC memory (also 1 x 1 maps, both formats at once)
            nhwc = x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last)
            return self._grouped(x, s) if nhwc else self._strided(x, s)
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
        if is_channels_last(x):
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
        channels_last = is_channels_last(x)
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

    def _grouped(self, x: Tensor, s: int) -> Tensor:
        """Split-BN of a channels_last batch of N = m·s samples as one native group norm: slice
        k is samples k·m … (k+1)·m − 1 (contiguous, as DDP cuts a batch), and each (slice,
        channel) pair is a group of one channel normalised over its m·H·W values.

        The batch axis is outermost in NHWC memory and the channels innermost, so
        (N, C, H, W) viewed as (s, C, m, H, W) is a channels_last_3d tensor: a free view both
        ways, which the native kernel reads and writes without a copy to NCHW (on a CPU; CUDA's
        group norm makes its input NCHW-contiguous itself, ``aten/src/ATen/native/group_norm.cpp``).
        The running statistics take the slices' mean of the kernel's per-group mean and
        1/rstd² in one fused update.
        """
        n, c, height, width = x.shape
        m = n // s
        grouped = x.unflatten(0, (s, m)).transpose(1, 2)  # (s, C, m, H, W), channels_last_3d
        weight, bias = self.weight, self.bias
        if weight is not None and weight.dtype != x.dtype:  # autocast leaves norms' parameters fp32
            weight, bias = weight.to(x.dtype), bias.to(x.dtype)
        out, mean, rstd = native_group_norm(grouped, weight, bias, c, self.eps)
        # CUDA's kernel writes NCHW order: back to channels_last_3d, so that the view below is one
        # and the next convolution reads NHWC (on a CPU, where the output already is, no operator).
        out = out.contiguous(memory_format=torch.channels_last_3d)
        if self.track_running_stats:
            count = m * height * width
            with torch.no_grad():
                # 1/rstd² is the slice's biased variance + eps; BN keeps the unbiased variance.
                var = rstd.pow(-2).sub_(self.eps).mul_(count / max(count - 1, 1))
                torch._foreach_lerp_([self.running_mean, self.running_var], [mean.mean(0), var.mean(0)], self._momentum())
                self.num_batches_tracked.add_(1)
        return out.transpose(1, 2).flatten(0, 1)  # (N, C, H, W), channels_last again

    @torch.no_grad()
    def _keep_mean_stats(self, means: Tensor, variances: Tensor) -> None:
        """Each slice updated its own copy (s, C) of the running statistics; keep their mean."""
        self.running_mean.copy_(means.mean(0))
        self.running_var.copy_(variances.mean(0))
        self.num_batches_tracked.add_(1)


#: aten's group norm as the grouped form calls it. ``F.group_norm`` gives the same output but
#: alone; this op also returns each group's mean and 1/std, which the running statistics take
#: without another reduction over the batch.
NATIVE_GROUP_NORM = ("aten::native_group_norm(Tensor input, Tensor? weight, Tensor? bias, SymInt N, SymInt C, "
                     "SymInt HxW, int group, float eps) -> (Tensor, Tensor, Tensor)")


def native_group_norm(x: Tensor, weight: Tensor | None, bias: Tensor | None, groups: int,
                      eps: float) -> tuple[Tensor, Tensor, Tensor]:
    """x (N, C, *) normalised in ``groups`` groups of channels: (output, mean, rstd), the last two
    (N, groups). Every argument goes by its name in :data:`NATIVE_GROUP_NORM`, so a renamed one
    fails here instead of shifting the others; :func:`changed_group_norm` compares the schema."""
    n, c = x.shape[:2]
    return torch.native_group_norm(input=x, weight=weight, bias=bias, N=n, C=c, HxW=math.prod(x.shape[2:]),
                                   group=groups, eps=eps)


def changed_group_norm() -> str | None:
    """How this torch's native group norm differs from :data:`NATIVE_GROUP_NORM`; None if it does not."""
    found = str(torch.ops.aten.native_group_norm.default._schema)
    return None if found == NATIVE_GROUP_NORM else f"{found} (norms.native_group_norm expects {NATIVE_GROUP_NORM})"


def is_channels_last(x: Tensor) -> bool:
    """Whether x is a 4-D batch in channels_last (NHWC) memory and not also NCHW-contiguous."""
    return x.dim() == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last)


def split_bn(module: nn.Module, num_splits: int, form: str = "auto") -> nn.Module:
    """Replace every BatchNorm1d/2d in ``module`` by a :class:`SplitBatchNorm` (in place).

    The strided and grouped forms return views of their kernel's output, and an in-place ReLU
    on a view makes autograd copy the whole base in the backward (its CopySlices): their
    ReLUs work out of place (the same numbers; one more activation held per layer).
    """
    if form in ("auto", "strided", "grouped"):
        for relu in (m for m in module.modules() if isinstance(m, nn.ReLU)):
            relu.inplace = False
    return replace_batch_norms(module, num_splits, form)


def replace_batch_norms(module: nn.Module, num_splits: int, form: str) -> nn.Module:
    for name, child in module.named_children():
        if isinstance(child, (nn.BatchNorm1d, nn.BatchNorm2d)):
            split = SplitBatchNorm(child.num_features, num_splits, form, eps=child.eps, momentum=child.momentum,
                                   affine=child.affine)
            split.load_state_dict(child.state_dict())
            setattr(module, name, split)
        else:
            replace_batch_norms(child, num_splits, form)
    return module


def group_norm(channels: int) -> nn.GroupNorm:
    """GroupNorm with 32 groups (fewer when the channels do not allow), Wu & He 2018's default."""
    return nn.GroupNorm(math.gcd(32, channels), channels)
