"""What every method's step shares: the parts it is made of, the methods' registry, the
optimizer step, the non-finite guard, and the parts' model state.

A method (``method=<name>``) is an entry of :data:`METHODS`: its step, and what
:func:`build_parts` builds for it (a predictor after f_q, a negative source, f_k and when its EMA
momentum is read). The built-in ones are each a module of their own: ``moco.py`` (MoCo v1/v2),
``moco_v3.py``, ``byol.py``. :func:`build_parts` assembles what a step touches (f_q, f_k, the
negatives, the objective, the optimizer) once; the step then reads top to bottom, in the
paper's order, and returns its metrics as 0-d tensors on the device (no host sync), or
:class:`Skipped` for a step whose loss was not finite (only with ``train.max_nonfinite_skips``)::

    begin(parts); set_lr(parts.optimizer, lr)     a new step (CUDA graphs); the schedule's rate
    guard = BufferGuard(parts)                    only with parts.check_finite
    with autocast(parts.device, parts.amp_dtype):
        loss = ...                                the method's forward passes and loss
    if guard is not None and not guard.finite(loss): return Skipped(loss.detach())
    optimize(parts, loss)                         backward; optimizer step
    ...                                           then every state change: the EMA, the enqueue

Nothing hides in a module's ``forward``.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn

from moco_engine.config.registry import Registry, registry
from moco_engine.config.schema import Config, UserError
from moco_engine.method.encoders import Encoder, MomentumEncoder, OnlineNetwork, build_encoder
from moco_engine.method.losses import instance_accuracy
from moco_engine.method.negatives import NegativeSource, NoNegatives, build_source, planned_bytes
from moco_engine.method.objectives import Objective, build_objective
from moco_engine.method.optimizers import build_optimizer
from moco_engine.runtime import compiling
from moco_engine.runtime import distributed as dist
from moco_engine.runtime.precision import available_memory, memory_format


class Skipped(NamedTuple):
    """A step not taken: its loss () was NaN or infinite; nothing was updated."""

    loss: Tensor


@dataclass
class StepParts:
    """Everything a step reads or changes, built once by :func:`build_parts`.

    Attributes:
        model_q: f_q as trained: DDP-wrapped under torchrun; with a predictor (BYOL, MoCo v3)
            the online network (f_q, then the predictor), returning (prediction, projection).
        encoder_q: f_q itself, x (B, ...) -> (B, D) unit vectors: the EMA's source.
        encoder_k: f_k, the EMA of f_q; None with end-to-end (in-batch) negatives, or for a
            method without one (``MethodEntry.momentum_encoder``).
        predictor: the method's predictor (BYOL's, MoCo v3's), else None.
        keys: x (B, ...) -> k (B, D), chosen when the parts are built.
        negatives: the negative source (queue, memory bank, in-batch, or none for a method
            without negatives: BYOL).
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
        steps_per_epoch: the optimizer steps of an epoch (ITC's distillation ramps in over epoch 0).

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
    steps_per_epoch: int = 0


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


# =============================================================================== the methods
@dataclass(frozen=True)
class MethodEntry:
    """A registered method (``method=<name>``): its step, and what :func:`build_parts` builds for it.

    Attributes:
        step: ``step(parts, x_1, x_2, indices, lr, momentum) -> metrics | Skipped``: one
            optimizer step on two views x_1, x_2 (B, ...) of the items ``indices`` (B,), at the
            schedules' learning rate and EMA momentum; the metrics are 0-d tensors on the
            device, ``loss`` and ``embed_std`` among them (the log and the collapse watch read them).
        predictor: ``predictor(cfg) -> module`` (B, D) -> (B, D) after f_q's projector, which
            then trains as :class:`~moco_engine.method.encoders.OnlineNetwork` (``parts.model_q(x)``
            is (prediction, projection)); None: f_q trains as it is (unit embeddings).
        negatives: whether it takes the negative source ``negatives.kind`` names. Without, none
            is built (``NoNegatives``), and ``negatives.kind`` and what the kinds read are ignored.
        momentum_encoder: whether f_k, the EMA of f_q, is built (end-to-end negatives build none
            either way).
        ema_ahead: the EMA after step t uses the momentum of step t + ema_ahead (``StepParts``).
        ignores: further settings the method ignores (dotted keys or groups): a changed one
            draws the one warning line (``rules.ignored_by_choice``).
        refuses: kinds of negatives it cannot train with, each with the reason (one line).
        encoder: ``encoder(cfg, input_shape) -> module``: f_q when it is not ``model``'s one
            encoder (image–text contrast's two towers, ``itc.py``); None: ``build_encoder``.
        source: ``source(cfg, num_items) -> NegativeSource`` in place of the ``negatives.kind``
            registry's (ITC's two queues); None: the registry's.
        planned: ``planned(cfg, num_items) -> (setting, what, bytes)`` of its own source's buffers
            (``negatives.planned``'s form), checked against the device's memory; None: the
            registry kind's.
        pairs: it trains on image–caption pairs: a step's views are (images (B, 3, S, S),
            captions {"input_ids", "attention_mask"} (B, W)), which only a source that gives
            pairs makes (``DataSource.pairs``); the text tower is ``text_model``.
    """

    step: Callable[..., dict[str, Tensor] | Skipped]
    predictor: Callable[[Config], nn.Module] | None = None
    negatives: bool = True
    momentum_encoder: bool = True
    ema_ahead: int = 0
    ignores: tuple[str, ...] = ()
    refuses: dict[str, str] = field(default_factory=dict)
    encoder: Callable[[Config, Any], nn.Module] | None = None
    source: Callable[[Config, int], NegativeSource] | None = None
    pairs: bool = False
    planned: Callable[[Config, int], tuple[str, str, int]] | None = None


METHODS = Registry("method", "method")


def register_method(name: str, step: Callable | None = None, *, predictor: Callable | None = None,
                    negatives: bool = True, momentum_encoder: bool = True, ema_ahead: int = 0,
                    ignores: tuple[str, ...] = (), refuses: dict[str, str] | None = None, encoder: Callable | None = None,
                    source: Callable | None = None, pairs: bool = False, planned: Callable | None = None,
                    replace: bool = False):
    """Register ``step`` under ``name`` (``method=<name>``) with what it needs built
    (:class:`MethodEntry`); a decorator without ``step``."""
    return METHODS.add(name, step, lambda fn: MethodEntry(fn, predictor, negatives, momentum_encoder, ema_ahead,
                                                          tuple(ignores), dict(refuses or {}), encoder, source, pairs,
                                                          planned),
                       replace)


# =============================================================================== the parts
def build_parts(cfg: Config, device: torch.device, amp_dtype: torch.dtype | None, num_items: int,
                input_shape: Any, steps_per_epoch: int = 0) -> StepParts:
    """Build f_q, f_k, the negatives, the objective and the optimizer of a run on ``device``,
    for ``num_items`` items whose views have ``input_shape`` (no batch dimension) in epochs of
    ``steps_per_epoch`` steps, as the method ``cfg.method`` names asks (:class:`MethodEntry`).

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
    method = registry("method")[cfg.method]
    # A method without negatives (BYOL) builds no source: nothing to plan for.
    plan = method.planned or planned_bytes
    key, what, needed = plan(cfg, num_items) if method.negatives else ("negatives.kind", "no negatives", 0)
    free = available_memory(device)
    if needed > free:  # refused before allocating: the OS would kill the run, or CUDA raise mid-build
        raise UserError(f"config key '{key}': {what} needs {needed / 2**30:.1f} GiB, and {device} has "
                        f"{free / 2**30:.1f} GiB available")
    encoder_q = (method.encoder or (lambda c, shape: build_encoder(c.model, shape)))(cfg, input_shape)
    encoder_q = encoder_q.to(device, memory_format=memory_format(cfg.train.channels_last))
    negatives = ((method.source or build_source)(cfg, num_items) if method.negatives else NoNegatives()).to(device)
    # End-to-end negatives take their keys from f_q: no momentum copy is built.
    encoder_k = MomentumEncoder(encoder_q) if method.momentum_encoder and not negatives.end_to_end else None
    predictor, online = None, encoder_q
    if method.predictor is not None:  # a predictor after f_q's projector; f_k (without it) is the EMA of f_q
        predictor = method.predictor(cfg).to(device)
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
        ema_ahead=method.ema_ahead, steps_per_epoch=steps_per_epoch,
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
