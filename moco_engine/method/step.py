"""One optimizer step, in the paper's order, and the parts it is made of.

:func:`build_parts` assembles what a step touches (f_q, f_k, the negatives, the objective, the
optimizer) once; :func:`moco_step` and :func:`byol_step` then read top to bottom (MoCo v3's
step, built from the same pieces, is ``moco_v3.py``'s). Each returns
the step's metrics as 0-d tensors on the device (no host sync), or :class:`Skipped` for a step
whose loss was not finite (only with ``train.max_nonfinite_skips``)::

    q = f_q(x_q)                                  (B, D) with gradients
    k = keys(x_k)                                 (B, D): f_k under shuffle-BN, no gradients
                                                  (in-batch negatives: f_q itself, end to end)
    negatives = source.negatives(q, k, idx)       (K, D) snapshot, drop (B, K) or None
    logits = [q·k, q·negativesᵀ] / T              (B, 1 + K), float32
    loss = objective(q, k, negatives, logits)     (the symmetric loss: both directions, summed)
    backward; optimizer step
    θ_k ← m·θ_k + (1 − m)·θ_q                     one fused foreach op
    objective.commit()                            NCE's normaliser
    source.update(all_gather(k), all_gather(idx)) identical on every rank

Every state change happens after the optimizer step, in that order; nothing hides in a
module's ``forward``.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from moco_engine.config.schema import Config, UserError
from moco_engine.method.encoders import (
    Encoder,
    MomentumEncoder,
    OnlineNetwork,
    build_encoder,
    build_predictor,
)
from moco_engine.method.losses import byol_loss, info_nce_logits, instance_accuracy
from moco_engine.method.negatives import NegativeSource, build_source, planned_bytes
from moco_engine.method.objectives import Objective, build_objective
from moco_engine.method.optimizers import build_optimizer
from moco_engine.runtime import compiling
from moco_engine.runtime import distributed as dist
from moco_engine.runtime.precision import autocast, available_memory, memory_format


class Skipped(NamedTuple):
    """A step not taken: its loss () was NaN or infinite; nothing was updated."""

    loss: Tensor


@dataclass
class StepParts:
    """Everything a step reads or changes, built once by :func:`build_parts`.

    Attributes:
        model_q: f_q as trained: DDP-wrapped under torchrun; for BYOL the online network
            (f_q, then the predictor), returning (prediction, projection).
        encoder_q: f_q itself, x (B, ...) -> (B, D) unit vectors: the EMA's source.
        encoder_k: f_k, the EMA of f_q; None with end-to-end (in-batch) negatives.
        predictor: BYOL's or MoCo v3's predictor, else None.
        keys: x (B, ...) -> k (B, D), chosen when the parts are built.
        negatives: the negative source (queue, memory bank, in-batch, or none for BYOL).
        objective: the loss of one direction, bound from ``cfg.loss``.
        optimizer, scaler: ``optim.name``'s optimizer over f_q (and the predictor); the fp16 loss scaler.
        device, amp_dtype: where the step runs and its autocast dtype (None: fp32).
        temperature: T of the logits.
        symmetric: each crop is once the query (two directions, both keys enqueued).
        check_finite: check each step's loss on the host and skip a non-finite one.
        graphed: the encoders replay CUDA graphs (``train.cuda_graphs``): each step marks its
            start, so a graph's outputs are known to be free for reuse from then on.
        input_shape: one input's shape (no batch dimension), as the backbone was built for.
        ema_ahead: the EMA after step t uses the momentum of step t + ema_ahead. MoCo v3 applies
            its EMA inside the forward pass, just before the keys of step t + 1, with m_{t+1}
            (moco-v3's main_moco.py and builder.py); after the optimizer step of t it is the same
            update, so its keys are the official's exactly. 0 for MoCo v1/v2 and BYOL.

    A view x is a tensor (B, ...) or a dict of such tensors (``runtime/batches.py``): the step
    only hands it to the encoders.
    """

    model_q: nn.Module
    encoder_q: Encoder
    encoder_k: MomentumEncoder | None
    predictor: nn.Module | None
    keys: Callable[[Tensor], Tensor]
    negatives: NegativeSource
    objective: Objective
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    device: torch.device
    amp_dtype: torch.dtype | None
    temperature: float
    symmetric: bool
    check_finite: bool
    graphed: bool = False
    input_shape: Any = None
    ema_ahead: int = 0


def key_function(model_q: nn.Module, encoder_k: MomentumEncoder | None, shuffle: bool,
                 graphed: bool = False) -> Callable[[Any], Tensor]:
    """k = f_k(x): (B, ...) -> (B, D) without gradients, the batch permuted across all ranks
    before f_k and restored after when ``shuffle`` (shuffle-BN). Without f_k (in-batch
    negatives) the keys are f_q's, with gradients.

    ``graphed``: f_k replays a CUDA graph, which overwrites its output at the next replay (the
    symmetric loss's second direction), so unshuffled keys are copied out of it.
    """
    if encoder_k is None:
        return model_q

    @torch.no_grad()
    def keys(x: Any) -> Tensor:
        if not shuffle:
            return encoder_k(x).clone() if graphed else encoder_k(x)
        shuffled, restore = dist.shuffle_batch(x)
        return restore(encoder_k(shuffled))

    return keys


def build_parts(cfg: Config, device: torch.device, amp_dtype: torch.dtype | None, num_items: int,
                input_shape: Any) -> StepParts:
    """Build f_q, f_k, the negatives, the objective and the optimizer of a run on ``device``,
    for ``num_items`` items whose views have ``input_shape`` (no batch dimension).

    Draws the initial weights and the queue from the global RNG: seed it identically on every
    rank first (DDP would broadcast f_q, but f_k and the queue are built here).

    Raises:
        UserError: SyncBatchNorm or CUDA graphs asked for without CUDA, CUDA graphs under
            torchrun; stored negatives that do not fit in the device's available memory.
    """
    if cfg.model.bn == "sync" and device.type != "cuda":
        raise UserError("config key 'model.bn' = 'sync': SyncBatchNorm needs CUDA; use shuffle or plain on CPU")
    distributed = dist.is_distributed()
    if cfg.train.cuda_graphs and (device.type != "cuda" or distributed):
        raise UserError(f"config key 'train.cuda_graphs' = true: CUDA graphs need one process on a CUDA device "
                        f"(this run: {device}{', under torchrun' if distributed else ''})")
    key, what, needed = planned_bytes(cfg, num_items)
    free = available_memory(device)
    if needed > free:  # refused before allocating: the OS would kill the run, or CUDA raise mid-build
        raise UserError(f"config key '{key}': {what} needs {needed / 2**30:.1f} GiB, and {device} has "
                        f"{free / 2**30:.1f} GiB available")
    encoder_q = build_encoder(cfg.model, input_shape).to(device, memory_format=memory_format(cfg.train.channels_last))
    negatives = build_source(cfg, num_items).to(device)
    # End-to-end negatives take their keys from f_q: no momentum copy is built.
    encoder_k = None if negatives.end_to_end else MomentumEncoder(encoder_q)
    predictor, online = None, encoder_q
    if cfg.method in ("byol", "moco_v3"):  # a predictor after f_q's projector; f_k (without it) is the EMA of f_q
        predictor = build_predictor(cfg.model, cfg.method, cfg.loss.byol_hidden_dim).to(device)
        online = OnlineNetwork(encoder_q, predictor)
    if cfg.train.compile or cfg.train.cuda_graphs:
        # In place, so state_dict keys stay those of the plain modules (checkpoints portable).
        # Under torchrun the DDP wrapper is compiled instead (below), as torch advises: its
        # graph then breaks at the gradient buckets, so the all-reduce overlaps the backward.
        # CUDA graphs are torch.compile's "reduce-overhead" mode: each compiled pass (f_q's
        # forward and backward, f_k's forward) is recorded once per input shape and replayed
        # as one launch, which is what a launch-bound step at 32 px needs.
        mode = "reduce-overhead" if cfg.train.cuda_graphs else None
        if not distributed:
            encoder_q.compile(mode=mode, backend=compiling.BACKEND)
        if encoder_k is not None:
            encoder_k.compile(mode=mode, backend=compiling.BACKEND)
    model_q: nn.Module = online
    if distributed:
        from torch.nn.parallel import DistributedDataParallel

        # DDP wraps f_q alone: f_k and the negatives live outside it and every rank updates them
        # identically from all-gathered keys. No buffer broadcast before each forward (newer
        # torch names the option forward_sync_buffers): the Trainer averages f_q's BatchNorm
        # statistics over the ranks before every evaluation and save instead.
        options = inspect.signature(DistributedDataParallel.__init__).parameters
        no_sync = {"forward_sync_buffers": False} if "forward_sync_buffers" in options else {"broadcast_buffers": False}
        model_q = DistributedDataParallel(online, device_ids=[device.index] if device.type == "cuda" else None,
                                          **no_sync)
        if cfg.train.compile:
            model_q = torch.compile(model_q, backend=compiling.BACKEND)
    optimizer = build_optimizer(cfg.optim, online.parameters())
    return StepParts(
        model_q=model_q, encoder_q=encoder_q, encoder_k=encoder_k, predictor=predictor,
        keys=key_function(model_q, encoder_k, cfg.model.bn == "shuffle", cfg.train.cuda_graphs), negatives=negatives,
        objective=build_objective(cfg.loss, negatives), optimizer=optimizer,
        # fp16 needs loss scaling against underflow; bf16 and fp32 do not.
        scaler=torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16),
        device=device, amp_dtype=amp_dtype, temperature=cfg.loss.temperature, symmetric=cfg.loss.symmetric,
        check_finite=cfg.train.max_nonfinite_skips > 0, graphed=cfg.train.cuda_graphs, input_shape=input_shape,
        ema_ahead=1 if cfg.method == "moco_v3" else 0,
    )


# =============================================================================== their state
#: The parts that hold tensors of the model and the negatives, as checkpoint sections.
MODEL_SECTIONS = ("encoder_q", "encoder_k", "negatives", "predictor")


def modules_of(parts: StepParts) -> dict[str, nn.Module | None]:
    """Each of :data:`MODEL_SECTIONS` and its module (None for a part the run lacks)."""
    return {name: getattr(parts, name) for name in MODEL_SECTIONS}


def model_state(parts: StepParts) -> dict[str, Any]:
    """Copies of the state of each of :data:`MODEL_SECTIONS` (None for a part the run lacks)."""
    return {name: None if m is None else {k: v.clone() for k, v in m.state_dict().items()}
            for name, m in modules_of(parts).items()}


def load_model_state(parts: StepParts, state: dict[str, Any]) -> None:
    """Load :func:`model_state`'s sections, the optimizer's and the scaler's state."""
    for name, module in modules_of(parts).items():
        if module is not None:
            module.load_state_dict(state[name])
    parts.optimizer.load_state_dict(state["optimizer"])
    parts.scaler.load_state_dict(state["scaler"])


def statistics(parts: StepParts) -> Iterator[tuple[str, Tensor]]:
    """(``section.name``, buffer) of every floating-point buffer of f_q, f_k and the predictor:
    BatchNorm's running statistics, which each rank keeps for itself under torchrun."""
    for section, module in modules_of(parts).items():
        if section == "negatives":  # the source's buffers are identical on every rank
            continue
        for name, b in module.named_buffers() if module is not None else ():
            if b.is_floating_point():
                yield f"{section}.{name}", b


# =============================================================================== the steps
def moco_step(parts: StepParts, x_q: Any, x_k: Any, indices: Tensor, lr: float,
              momentum: float) -> dict[str, Tensor] | Skipped:
    """One MoCo step on two views x_q, x_k (B, ...) of the items ``indices`` (B,), at learning
    rate ``lr`` and EMA momentum ``momentum``."""
    begin(parts)
    set_lr(parts.optimizer, lr)
    source_metrics = parts.negatives.metrics(indices)  # the source's state before this batch
    guard = BufferGuard(parts) if parts.check_finite else None
    # The symmetric loss (the MoCo CIFAR-10 demo's) sums both directions; its gradient is twice
    # an asymmetric step's.
    directions = ((x_q, x_k), (x_k, x_q)) if parts.symmetric else ((x_q, x_k),)
    losses, keys = [], []
    with autocast(parts.device, parts.amp_dtype):
        for x_query, x_key in directions:
            q = parts.model_q(x_query)  # (B, D) unit queries, with gradients
            k = parts.keys(x_key)  # (B, D) unit keys
            negatives = parts.negatives.negatives(q, k, indices)  # (K, D) snapshot, drop (B, K) or None
            supplied = parts.negatives.positives(indices)  # the memory bank's v_i (B, D), or None
            positive = k if supplied is None else supplied
            logits = info_nce_logits(q, positive, negatives.embeddings, parts.temperature, negatives.drop)
            losses.append(parts.objective(q, positive, negatives, logits))  # ()
            keys.append(k)
            if len(losses) == 1:
                first_q, first_logits = q, logits  # the metrics are the first direction's
    loss = sum(losses[1:], losses[0])

    if guard is not None and not guard.finite(loss):
        parts.objective.discard()
        return Skipped(loss.detach())
    optimize(parts, loss)

    # State changes, after the optimizer step.
    if parts.encoder_k is not None:
        parts.encoder_k.update(parts.encoder_q, momentum)  # θ_k ← m·θ_k + (1 − m)·θ_q
    parts.objective.commit()  # NCE's normaliser
    # The demo's enqueue order: the key of x_q (the second direction's) before that of x_k.
    enqueued = torch.cat(keys[::-1]).detach().float()  # (B·directions, D)
    # Equal shares on every rank (EpochSampler) make every step's batch the same size on every
    # rank, ragged last batch included: the gathers need no size exchange.
    parts.negatives.update(dist.all_gather_cat(enqueued, same_size=True),
                           dist.all_gather_cat(indices.repeat(len(directions)), same_size=True))
    return {**contrastive_metrics(first_logits.detach(), first_q.detach(), parts.temperature), "loss": loss.detach(),
            **source_metrics}


def byol_step(parts: StepParts, x_1: Any, x_2: Any, indices: Tensor, lr: float,
              momentum: float) -> dict[str, Tensor] | Skipped:
    """One BYOL step (Grill et al. 2020) on two views x_1, x_2 (B, ...): each view's
    prediction regresses the target network's projection of the other view."""
    begin(parts)
    set_lr(parts.optimizer, lr)
    guard = BufferGuard(parts) if parts.check_finite else None
    with autocast(parts.device, parts.amp_dtype):
        p_1, z_1 = parts.model_q(x_1)  # online prediction and projection (B, D), not normalised
        p_2, _ = parts.model_q(x_2)
        with torch.no_grad():
            t_1, t_2 = parts.encoder_k(x_1), parts.encoder_k(x_2)  # target projections (B, D)
        loss = byol_loss(p_1, t_2) + byol_loss(p_2, t_1)

    if guard is not None and not guard.finite(loss):
        return Skipped(loss.detach())
    optimize(parts, loss)

    parts.encoder_k.update(parts.encoder_q, momentum)  # the target: θ_k ← m·θ_k + (1 − m)·θ_q
    return {"loss": loss.detach(), "embed_std": F.normalize(z_1.detach().float(), dim=1).std(dim=0).mean()}


# =============================================================================== its pieces
def begin(parts: StepParts) -> None:
    """Mark a new step for CUDA graphs: the last step's graph outputs (queries, keys) are
    dead by now, so their memory may be overwritten by this step's replays."""
    if parts.graphed:
        torch.compiler.cudagraph_mark_step_begin()


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr


def optimize(parts: StepParts, loss: Tensor) -> None:
    """Backward and one optimizer step (loss-scaled under fp16)."""
    parts.optimizer.zero_grad(set_to_none=True)
    parts.scaler.scale(loss).backward()
    parts.scaler.step(parts.optimizer)
    parts.scaler.update()


class BufferGuard:
    """The non-finite guard: the forward passes update BatchNorm statistics before the loss is
    known, so a copy of every buffer of f_q (and the predictor) and f_k is kept; a step whose
    loss is not finite on any rank puts them back and is skipped. One host sync a step."""

    def __init__(self, parts: StepParts):
        self.buffers = [b for m in (parts.model_q, parts.encoder_k) if m is not None for b in m.buffers()]
        self.saved = [b.clone() for b in self.buffers]
        self.device = parts.device

    def finite(self, loss: Tensor) -> bool:
        if not dist.any_rank(not torch.isfinite(loss).item(), self.device):
            return True
        if self.buffers:
            with torch.no_grad():
                torch._foreach_copy_(self.buffers, self.saved)
        return False


def contrastive_metrics(logits: Tensor, q: Tensor, temperature: float) -> dict[str, Tensor]:
    """Instance-discrimination metrics of logits (B, 1 + K) and unit queries q (B, D), as 0-d
    tensors: top-1/top-5 (%), the mean positive and negative similarity, and embed_std."""
    negative = logits[:, 1:]
    counted = torch.isfinite(negative)  # dropped entries are -inf
    acc = instance_accuracy(logits)
    return {
        "top1": acc["top1"],
        "top5": acc["top5"],
        "logit_pos": logits[:, 0].mean() * temperature,
        "logit_neg": torch.where(counted, negative, 0.0).sum() / counted.sum().clamp(min=1) * temperature,
        # Collapse detector: the per-dimension std of the unit queries, averaged over the D
        # dimensions (about 1/sqrt(D) when spread over the sphere, 0 when all alike).
        "embed_std": q.float().std(dim=0).mean(),
    }
