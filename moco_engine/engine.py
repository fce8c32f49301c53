"""The training loop: one MoCo step in plain sight, epochs, evaluation and checkpoints.

One step, in this order (DESIGN.md; nothing is hidden in a module's ``forward``)::

    q = f_q(x_q)                                  (B, D) with gradients
    k = unshuffle(f_k(shuffle(x_k)))              (B, D) no gradients
    logits = [q·k, q·negativesᵀ] / T              (B, 1+K), negatives = source.negatives()
    loss = InfoNCE(logits); backward; optimizer step
    θ_k ← m·θ_k + (1−m)·θ_q                       one fused foreach op
    source.update(all_gather(k), all_gather(idx)) identical on every process
"""

from __future__ import annotations

import contextlib
import math
import os
import random
import shutil
import signal
import threading
import time
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from . import checkpoint as ckpt
from . import distributed as dist
from .augment import random_views, view_spec
from .config import Config, UserError, to_dict, to_yaml
from .data import (
    EpochSampler,
    Indexed,
    TwoViews,
    build_splits,
    eval_transform,
    make_loader,
    view_transform,
)
from .device_data import DevicePlain, DeviceTwoViews, step_generator, to_device_tensor
from .encoders import MomentumEncoder, OnlineNetwork, build_encoder, build_predictor, momentum_at
from .evaluation import extract_features, knn_accuracy
from .losses import (
    byol_loss,
    contrastive_objective,
    estimate_log_z,
    info_nce,
    info_nce_logits,
    instance_accuracy,
    nce,
)
from .negatives import NegativeSource, build_source
from .tracking import METRICS_FILE, Tracker, WandbBackend, wandb_mode

CONFIG_FILE = "config.yaml"
PREVIEW_FILE = "augmentations.png"
# Settings a checkpoint's state depends on: resuming under other values is refused.
STATE_SHAPING_KEYS = (
    "method", "model.arch", "model.cifar_stem", "model.head", "model.hidden_dim", "model.dim", "negatives.kind", "queue.size",
)


class StopRequested(Exception):
    """Training stopped on SIGTERM or SIGINT after saving a checkpoint; ``signum`` says which."""

    def __init__(self, signum: int, step: int, path: Path | None):
        self.signum, self.step, self.path = signum, step, path
        name = signal.Signals(signum).name
        where = f"checkpoint {path}" if path else "the checkpoint of rank 0"
        super().__init__(f"stopped by {name} after step {step}; {where}; continue with train.resume=auto")


class NonFiniteLoss(Exception):
    """The loss became NaN or infinite; nothing from that point on was saved."""


def resolve_device(name: str) -> torch.device:
    """``train.device`` as a torch device; under torchrun, ``auto`` and ``cuda`` mean this
    process's GPU, cuda:LOCAL_RANK."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"config key 'train.device' = {name!r}: CUDA is not available on this machine")
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", dist.local_rank() if dist.launched_by_torchrun() else torch.cuda.current_device())
    return device


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype, or None for full fp32. ``auto``: bf16 on CUDA, fp32 on CPU."""
    if precision == "auto":
        return torch.bfloat16 if device.type == "cuda" else None
    return {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]


def lr_at(cfg: Config, step: int, steps_per_epoch: int) -> float:
    """Learning rate at global ``step``: linear warm-up, then cosine to 0, step decay or constant.

    With ``optim.lr_scaling=linear`` the peak is optim.lr × global batch / 256 (Goyal et al.).
    """
    base, total = cfg.optim.lr, cfg.train.epochs * steps_per_epoch
    if cfg.optim.lr_scaling == "linear":
        base = base * cfg.optim.batch_size * dist.world_size() / 256
    warmup = int(cfg.optim.warmup_epochs * steps_per_epoch)
    if step < warmup:
        return base * (step + 1) / warmup
    if cfg.optim.schedule == "cosine":
        progress = (step - warmup) / max(total - warmup, 1)
        return base * 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))
    if cfg.optim.schedule == "step":
        epoch = step // steps_per_epoch
        return base * cfg.optim.gamma ** sum(epoch >= m for m in cfg.optim.milestones)
    return base


def _means(sums: dict[str, Tensor], count: int) -> dict[str, float]:
    """Per-step means of metric sums kept on the device, averaged over the ranks, fetched in one
    host sync (a collective under torchrun: every rank calls it at the same steps)."""
    stacked = torch.stack([torch.as_tensor(v, dtype=torch.float32) for v in sums.values()])
    values = dist.all_reduce_mean(stacked).tolist()
    return {name: value / count for name, value in zip(sums, values)}


def peak_memory_gib(device: torch.device) -> float:
    """Peak memory so far: the CUDA allocator's on a GPU, the process's resident set on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux reports KiB


def _state_shaping(cfg_dict: dict[str, Any]) -> dict[str, Any]:
    defaults = to_dict(Config())  # checkpoints older than a key hold its default

    def get(d: dict[str, Any], key: str) -> Any:
        for part in key.split("."):
            d = d[part]
        return d

    out = {}
    for key in STATE_SHAPING_KEYS:
        try:
            out[key] = get(cfg_dict, key)
        except KeyError:
            out[key] = get(defaults, key)
    return out


class Trainer:
    """Owns everything a MoCo run holds: data, f_q, f_k, the negative source, the optimizer.

    ``Trainer(cfg).fit()`` runs the whole pretraining and returns the final metrics.
    """

    def __init__(self, cfg: Config):
        self.cfg = cfg
        self.device = resolve_device(cfg.train.device)
        self.amp_dtype = autocast_dtype(cfg.train.precision, self.device)
        self.run_dir = Path(cfg.train.out_dir).expanduser()
        self.rank, self.world = dist.rank(), dist.world_size()
        torch.manual_seed(cfg.train.seed + self.rank)
        random.seed(cfg.train.seed + self.rank)

        # ---------------------------------------------------------------- data
        splits = build_splits(cfg.data, seed=cfg.train.seed)
        self.num_classes = len(splits.train.classes)
        if len(splits.train) < cfg.optim.batch_size * self.world:
            raise UserError(
                f"config key 'optim.batch_size' = {cfg.optim.batch_size}: larger than the data set "
                f"({len(splits.train)} images), so no full batch can be drawn"
            )
        self.num_items = len(splits.train)
        self.num_test = len(splits.test) if splits.test is not None else 0
        self.sampler = EpochSampler(self.num_items, cfg.train.seed, True, self.rank, self.world)
        if cfg.data.pipeline == "device":
            self._device_loaders(splits)
        else:
            self._cpu_loaders(splits)
        self.steps_per_epoch = len(self.loader)
        if cfg.train.steps_per_epoch:
            self.steps_per_epoch = min(self.steps_per_epoch, cfg.train.steps_per_epoch)

        # ---------------------------------------------------------------- model
        # The model and the queue start identical on every rank (DDP would broadcast f_q, but
        # f_k and the queue are built here); per-rank randomness resumes after them.
        torch.manual_seed(cfg.train.seed)
        if cfg.model.bn == "sync" and self.device.type != "cuda":
            raise UserError("config key 'model.bn' = 'sync': SyncBatchNorm needs CUDA; use shuffle or plain on CPU")
        self.memory_format = torch.channels_last if cfg.train.channels_last else torch.contiguous_format
        self.encoder_q = build_encoder(cfg.model).to(self.device, memory_format=self.memory_format)
        self.encoder_k = MomentumEncoder(self.encoder_q)
        if cfg.train.compile:
            # In place, so state_dict keys stay those of the plain modules (checkpoints portable).
            self.encoder_q.compile()
            self.encoder_k.compile()
        self.negatives: NegativeSource = build_source(cfg, self.num_items).to(self.device)
        # BYOL: the online branch adds a predictor after f_q's projector (f_k is BYOL's target).
        self.predictor: torch.nn.Module | None = None
        online: torch.nn.Module = self.encoder_q
        if cfg.method == "byol":
            self.predictor = build_predictor(cfg.model.dim, cfg.loss.byol_hidden_dim).to(self.device)
            online = OnlineNetwork(self.encoder_q, self.predictor)
        torch.manual_seed(cfg.train.seed + self.rank)
        # DDP wraps f_q alone: f_k and the negatives live outside it and every rank updates them
        # identically from all-gathered keys, so nothing of theirs is broadcast as a buffer.
        self.model_q: torch.nn.Module = online
        if dist.is_distributed():
            import inspect

            from torch.nn.parallel import DistributedDataParallel

            # BatchNorm statistics stay per rank (no broadcast before each forward); newer torch
            # names the option forward_sync_buffers.
            options = inspect.signature(DistributedDataParallel.__init__).parameters
            no_sync = {"forward_sync_buffers": False} if "forward_sync_buffers" in options else {"broadcast_buffers": False}
            self.model_q = DistributedDataParallel(
                online, device_ids=[self.device.index] if self.device.type == "cuda" else None, **no_sync,
            )
        self.optimizer = torch.optim.SGD(
            online.parameters(), lr=cfg.optim.lr, momentum=cfg.optim.momentum, weight_decay=cfg.optim.weight_decay
        )
        # fp16 needs loss scaling against underflow; bf16 and fp32 do not.
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.amp_dtype == torch.float16)

        self.epoch = 0  # epochs completed
        self.step = 0  # optimizer steps taken
        self.step_in_epoch = 0
        self.last_eval: dict[str, float] = {}
        self.tracker = Tracker(None, enabled=False)
        self.stop_signal: int | None = None  # set by SIGTERM/SIGINT: finish the step, save, exit
        self.wandb_run_id: str | None = None  # kept in checkpoints: a resumed run continues its W&B run
        self._collapse_warned = -1
        self.nonfinite_skips = 0  # steps skipped for a NaN/inf loss (train.max_nonfinite_skips)

    def _cpu_loaders(self, splits) -> None:
        """DataLoaders: PIL decoding and augmentation in ``data.num_workers`` processes."""
        cfg, pin = self.cfg, self.device.type == "cuda"
        self.loader = make_loader(
            Indexed(splits.train, TwoViews(view_transform(cfg.data.augmentation, cfg.data.image_size)), cfg.train.seed),
            cfg.optim.batch_size, cfg.data.num_workers, self.sampler, drop_last=cfg.data.drop_last, pin_memory=pin,
        )
        # The train split seen without augmentation, in index order: the kNN memory and the
        # memory bank's refresh both encode it; each rank encodes its shard of it (and of the
        # test split), the shards are gathered.
        plain = eval_transform(cfg.data.augmentation, cfg.data.image_size)

        def plain_loader(split, shard=None):
            return make_loader(Indexed(split, plain), cfg.eval.batch_size, cfg.data.num_workers, sampler=shard,
                               pin_memory=pin)

        self.plain_train_loader = plain_loader(splits.train)
        self.plain_train_shard = plain_loader(splits.train, self._shard(self.num_items)) if self.world > 1 else self.plain_train_loader
        self.test_loader = self.test_shard = None
        if splits.test is not None:
            self.test_loader = plain_loader(splits.test)
            self.test_shard = plain_loader(splits.test, self._shard(self.num_test)) if self.world > 1 else self.test_loader

    def _shard(self, n: int) -> list[int]:
        """This rank's contiguous part of the indices 0 … n − 1 (sharded encoding of a split).

        Every rank's part is ceil(n / world) long, the tail padded with the last item: the ranks
        then run the same number of batches of the same sizes, which SyncBN's per-layer
        collectives need (unequal parts could leave one rank waiting for a batch that never
        comes). The gathered encodings are cut back to n.
        """
        w, r = self.world, self.rank
        size = -(-n // w)
        return [min(i, n - 1) for i in range(r * size, (r + 1) * size)]

    def _device_loaders(self, splits) -> None:
        """The same batches from images decoded once into device memory, augmented there."""
        cfg = self.cfg
        spec = view_spec(cfg.data.augmentation, cfg.data.image_size)
        train = to_device_tensor(splits.train, self.device)
        self.loader = DeviceTwoViews(
            train, splits.train.targets, spec, cfg.optim.batch_size, self.sampler, cfg.train.seed,
            compile=cfg.train.compile, drop_last=cfg.data.drop_last,
        )
        size, bs = cfg.data.image_size, cfg.eval.batch_size
        self.plain_train_loader = DevicePlain(train, splits.train.targets, bs, size, spec.mean, spec.std)

        def shard_of(images, targets, loader):
            if self.world == 1:
                return loader
            shard = self._shard(len(targets))
            return DevicePlain(images[torch.tensor(shard, device=images.device)], [targets[i] for i in shard], bs, size,
                               spec.mean, spec.std)

        self.plain_train_shard = shard_of(train, splits.train.targets, self.plain_train_loader)
        self.test_loader = self.test_shard = None
        if splits.test is not None:
            test = to_device_tensor(splits.test, self.device)
            self.test_loader = DevicePlain(test, splits.test.targets, bs, size, spec.mean, spec.std)
            self.test_shard = shard_of(test, splits.test.targets, self.test_loader)

    # ======================================================================== one step
    def _autocast(self):
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.amp_dtype)

    def compute_keys(self, x: Tensor) -> Tensor:
        """k = f_k(x): (B, 3, H, W) -> (B, D), with shuffle-BN if configured.

        In-batch negatives are end to end: the keys come from f_q, with gradients.
        """
        if self.negatives.end_to_end:
            return self.model_q(x)
        with torch.no_grad():
            if self.cfg.model.bn == "shuffle":
                shuffled, restore = dist.shuffle_batch(x, same_size=self.cfg.data.drop_last)
                return restore(self.encoder_k(shuffled))
            return self.encoder_k(x)

    def contrastive_loss(self, x_q: Tensor, x_k: Tensor, indices: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """One direction of the loss: x_q is the query crop, x_k the key crop, indices (B,).

        Returns:
            (loss (), logits (B, 1+K), queries (B, D), keys (B, D)).
        """
        q = self.model_q(x_q)
        k = self.compute_keys(x_k)
        positives = self.negatives.positives(indices)
        neg = self.negatives.negatives(q, k, indices)
        positive = k if positives is None else positives
        logits = info_nce_logits(q, positive, neg.embeddings, self.cfg.loss.temperature, neg.drop)
        name = self.cfg.loss.name
        if name == "nce":
            log_z = self.negatives.track_log_z(estimate_log_z(logits.detach(), self.num_items))
            return nce(logits, self.num_items, log_z), logits, q, k
        if name in ("infonce", "nt_xent"):
            return info_nce(logits), logits, q, k
        # Any other objective of losses.LOSSES, over the same negatives (the logits above still
        # give the instance-discrimination metrics).
        hyper = {key: value for key, value in vars(self.cfg.loss).items() if key not in ("name", "symmetric")}
        return contrastive_objective(name, q, positive, neg.embeddings, neg.drop, **hyper), logits, q, k

    def byol_objective(self, x_1: Tensor, x_2: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """BYOL's symmetrised loss: each view's prediction regresses the target's projection of
        the other view. Returns (loss (), online projections of x_1 (B, D) unit norm, target
        projections of x_2 (B, D))."""
        p_1, z_1 = self.model_q(x_1)
        p_2, _ = self.model_q(x_2)
        with torch.no_grad():
            t_1, t_2 = self.encoder_k(x_1), self.encoder_k(x_2)
        loss = byol_loss(p_1, t_2) + byol_loss(p_2, t_1)
        return loss, torch.nn.functional.normalize(z_1.float(), dim=1), t_2

    def train_step(self, x_q: Tensor, x_k: Tensor, indices: Tensor) -> dict[str, Tensor]:
        """One optimizer step on a batch of two views (B, 3, H, W) and their indices (B,).

        Returns the step's metrics as 0-d tensors on the device (no host sync here), or None for
        a step skipped because its loss was not finite (only with ``train.max_nonfinite_skips``,
        which checks every step's loss on the host).
        """
        cfg = self.cfg
        total = cfg.train.epochs * self.steps_per_epoch
        lr = lr_at(cfg, self.step, self.steps_per_epoch)
        momentum = momentum_at(cfg.model.momentum, cfg.model.momentum_schedule, self.step, total)
        for group in self.optimizer.param_groups:
            group["lr"] = lr

        source_metrics = self.negatives.metrics(indices)  # before this batch's update
        guard = cfg.train.max_nonfinite_skips > 0
        if guard:  # the forward passes update BatchNorm statistics: keep a copy to undo a bad step
            buffers = [b for m in (self.encoder_q, self.encoder_k) for b in m.buffers()]
            saved_buffers = [b.clone() for b in buffers]
        with self._autocast():
            if cfg.method == "byol":
                loss, q, k = self.byol_objective(x_q, x_k)
                logits = None
            else:
                loss, logits, q, k = self.contrastive_loss(x_q, x_k, indices)
            if cfg.loss.symmetric and logits is not None:
                # The MoCo CIFAR-10 demo's symmetric loss: the sum of both directions, both
                # keys enqueued (so its gradient is twice an asymmetric step's).
                loss_21, _, _, k_1 = self.contrastive_loss(x_k, x_q, indices)
                loss = loss + loss_21
                k = torch.cat([k_1, k])

        if guard and dist.any_rank(not torch.isfinite(loss).item(), self.device):
            with torch.no_grad():
                torch._foreach_copy_(buffers, saved_buffers)
            self._skip_nonfinite(loss)
            return None

        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        self.scaler.step(self.optimizer)
        self.scaler.update()

        if not self.negatives.end_to_end:
            self.encoder_k.update(self.encoder_q, momentum)
        self.step += 1
        if logits is None:  # BYOL: no negatives to update, no logits
            return {"loss": loss.detach(), "embed_std": q.detach().float().std(dim=0).mean(), **source_metrics}
        if cfg.loss.symmetric:
            indices = torch.cat([indices, indices])
        same = cfg.data.drop_last  # full batches on every rank: no size exchange needed
        self.negatives.update(dist.all_gather_cat(k.detach().float(), same), dist.all_gather_cat(indices, same))

        logits = logits.detach()
        negative = logits[:, 1:]
        counted = torch.isfinite(negative)  # dropped entries are -inf
        acc = instance_accuracy(logits)
        return {
            "loss": loss.detach(),
            "top1": acc["top1"],
            "top5": acc["top5"],
            "logit_pos": logits[:, 0].mean() * cfg.loss.temperature,
            "logit_neg": torch.where(counted, negative, 0.0).sum() / counted.sum().clamp(min=1) * cfg.loss.temperature,
            # Collapse detector: the per-dimension std of the unit queries, averaged over the D
            # dimensions (about 1/sqrt(D) when spread over the sphere, 0 when all alike).
            "embed_std": q.detach().float().std(dim=0).mean(),
            **source_metrics,
        }

    # ======================================================================== epochs
    def train_epoch(self) -> dict[str, float] | None:
        """Run (the rest of) the current epoch; returns the epoch's mean metrics, or None when a
        stop signal ended it early."""
        cfg = self.cfg
        self.encoder_q.train()
        self.encoder_k.train()
        self.sampler.set_epoch(self.epoch, skip=self.step_in_epoch * cfg.optim.batch_size)
        self.tracker.start_epoch(self.epoch, cfg.train.epochs, self.steps_per_epoch, self.step_in_epoch)
        window: dict[str, Tensor] = {}
        epoch_sum: dict[str, Tensor] = {}
        window_steps, epoch_steps, window_start = 0, 0, time.perf_counter()
        images = 0
        epoch_start = time.perf_counter()
        loader = iter(self.loader)
        while self.step_in_epoch < self.steps_per_epoch:
            (x_q, x_k), _, idx = next(loader)
            x_q = x_q.to(self.device, memory_format=self.memory_format, non_blocking=True)
            x_k = x_k.to(self.device, memory_format=self.memory_format, non_blocking=True)
            idx = idx.to(self.device, non_blocking=True)
            metrics = self.train_step(x_q, x_k, idx)
            self.step_in_epoch += 1
            images += x_q.shape[0]
            if metrics is not None:  # None: a step skipped for its non-finite loss
                for name, value in metrics.items():
                    window[name] = window.get(name, 0) + value
                    epoch_sum[name] = epoch_sum.get(name, 0) + value
                window_steps += 1
                epoch_steps += 1
            self.tracker.advance()
            at_log = self.step % cfg.train.log_every == 0 or self.step_in_epoch == self.steps_per_epoch
            if dist.is_distributed():
                # Ranks must stop after the same step: they agree at each log point (a signal
                # caught by any rank, e.g. one SIGTERM'd by the scheduler, stops them all).
                stopping = dist.any_rank(self.stop_signal is not None, self.device) if at_log else False
                if stopping and self.stop_signal is None:
                    self.stop_signal = signal.SIGTERM
            else:
                stopping = self.stop_signal is not None
            if (stopping or at_log) and window_steps:
                # The one host sync of the interval: metrics stayed on the device until now.
                means = _means(window, window_steps)
                if not math.isfinite(means["loss"]):
                    # Checked before any save, so NaN weights never overwrite a good checkpoint.
                    raise NonFiniteLoss(self._divergence_message(
                        f"non-finite loss ({means['loss']}) in the steps up to step {self.step}"
                    ))
                elapsed = time.perf_counter() - window_start
                means["lr"] = self.optimizer.param_groups[0]["lr"]
                means["momentum"] = momentum_at(
                    cfg.model.momentum, cfg.model.momentum_schedule, self.step - 1, cfg.train.epochs * self.steps_per_epoch
                )
                means["img_per_s"] = images * self.world / max(elapsed, 1e-9)
                if not self.negatives.end_to_end:
                    means["qk_weight_dist"] = self.encoder_k.relative_distance(self.encoder_q).item()
                means["mem_peak_gib"] = peak_memory_gib(self.device)
                self._check_collapse(means["embed_std"])
                self.tracker.log("step", means, self.epoch, self.step)
                window, window_steps, images, window_start = {}, 0, 0, time.perf_counter()
            if stopping:
                self.tracker.end_epoch()
                return None  # mid-epoch: step_in_epoch tells a resumed run where to go on
        self.tracker.end_epoch()
        epoch_time = time.perf_counter() - epoch_start
        hook_start = time.perf_counter()
        self.negatives.on_epoch_end(self.epoch, self.encode_train_set)
        hook_time = time.perf_counter() - hook_start
        self.epoch += 1
        self.step_in_epoch = 0
        out = _means(epoch_sum, epoch_steps) if epoch_steps else {}
        out.update(epoch_s=epoch_time, negatives_bytes=self.negatives.memory_bytes())
        if hook_time > 1e-3:  # the memory bank's refresh: its cost in seconds and in % of the epoch
            out.update(refresh_s=hook_time, refresh_pct=100 * hook_time / (epoch_time + hook_time))
        return out

    def _skip_nonfinite(self, loss: Tensor) -> None:
        """After a step whose loss was NaN/inf (its BatchNorm statistics already restored): no
        update of f_q, f_k or the negatives; count the skip; stop past the limit."""
        self.nonfinite_skips += 1
        self.step += 1  # the batch is used up and the schedules move on
        limit = self.cfg.train.max_nonfinite_skips
        if self.nonfinite_skips > limit:
            raise NonFiniteLoss(self._divergence_message(
                f"non-finite loss ({loss.item()}) at step {self.step}, after {limit} skipped steps (train.max_nonfinite_skips)"
            ))
        self.tracker.warn(f"non-finite loss ({loss.item()}) at step {self.step}: step skipped ({self.nonfinite_skips} of at most {limit})")

    def _divergence_message(self, what: str) -> str:
        saved = ckpt.checkpoint_files(self.run_dir)
        return f"{what}; " + (f"the last good checkpoint is {saved[-1]}" if saved else "no checkpoint was written yet")

    def _check_collapse(self, embed_std: float) -> None:
        """Warn (once an epoch) when the queries lose their spread: embed_std·sqrt(D) below
        ``track.collapse_threshold``, where 1 is the spread of points uniform on the sphere."""
        spread = embed_std * math.sqrt(self.cfg.model.dim)
        if spread < self.cfg.track.collapse_threshold and self._collapse_warned != self.epoch:
            self._collapse_warned = self.epoch
            self.tracker.warn(
                f"embeddings collapsing at step {self.step}: embed_std·sqrt(D) = {spread:.3f} "
                f"< track.collapse_threshold {self.cfg.track.collapse_threshold}"
            )

    def _own_rng(self):
        """A side stream of random numbers: evaluation and encoding passes leave the training's
        RNG as they found it, so how often they run never changes the training run."""
        return torch.random.fork_rng(devices=[self.device] if self.device.type == "cuda" else [])

    @torch.no_grad()
    def encode_train_set(self) -> Tensor:
        """Every training item's embedding (N, D) in index order, made as keys are: by the key
        encoder with BatchNorm on batch statistics (in eval mode its barely trained running
        statistics would give embeddings a query could tell apart from keys by their look)."""
        encoder = self.encoder_q if self.negatives.end_to_end else self.encoder_k
        with self._own_rng():
            return self._encode_sharded(encoder, self.plain_train_shard, self.num_items, batch_stats=True)[0]

    def _encode_sharded(self, model: torch.nn.Module, shard, n: int, batch_stats: bool = False) -> tuple[Tensor, Tensor]:
        """Features (n, F) and labels (n,) of a split, each rank encoding its shard (``_shard``).

        The parts are gathered in rank order, which is index order (then the padding, cut off),
        so every rank ends with the same tensors, each having encoded 1/world of the split.
        """
        features, labels = extract_features(model, shard, self.device, batch_stats=batch_stats)
        return dist.all_gather_cat(features, same_size=True)[:n], dist.all_gather_cat(labels, same_size=True)[:n]

    @torch.no_grad()
    def evaluate_knn(self) -> dict[str, float]:
        """Weighted kNN (k, T from ``eval``) of the test split against the train split's features."""
        if self.test_loader is None:
            return {}
        with self._own_rng():
            return self._knn()

    def _knn(self) -> dict[str, float]:
        cfg = self.cfg.eval
        model = self.encoder_q.backbone if cfg.knn_features == "backbone" else self.encoder_q
        memory, memory_labels = self._encode_sharded(model, self.plain_train_shard, self.num_items)
        query, query_labels = self._encode_sharded(model, self.test_shard, self.num_test)
        return knn_accuracy(query, query_labels, memory, memory_labels, self.num_classes, cfg.knn_k, cfg.knn_t)

    # ======================================================================== state
    def state_dict(self) -> dict[str, Any]:
        """Everything needed to continue the run exactly (tensors and plain containers only)."""
        rng = {"torch": torch.get_rng_state(), "python": random.getstate()}
        if self.device.type == "cuda":
            rng["cuda"] = torch.cuda.get_rng_state(self.device)
        return {
            "format": 1,
            "config": to_dict(self.cfg),
            "epoch": self.epoch,
            "step": self.step,
            "step_in_epoch": self.step_in_epoch,
            "encoder_q": self.encoder_q.state_dict(),
            "encoder_k": self.encoder_k.state_dict(),
            "negatives": self.negatives.state_dict(),
            "predictor": None if self.predictor is None else self.predictor.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scaler": self.scaler.state_dict(),
            "rng": rng,
            "last_eval": dict(self.last_eval),
            "wandb_run_id": self.wandb_run_id,
            "nonfinite_skips": self.nonfinite_skips,
        }

    def load_state_dict(self, state: dict[str, Any], source: str = "checkpoint") -> None:
        """Restore a :meth:`state_dict`; refuses one whose model or queue shape differs."""
        saved, now = _state_shaping(state["config"]), _state_shaping(to_dict(self.cfg))
        diffs = [f"{k} {saved[k]!r} (checkpoint) vs {now[k]!r} (config)" for k in STATE_SHAPING_KEYS if saved[k] != now[k]]
        bank = state["negatives"].get("bank")
        if bank is not None and bank.shape[0] != self.num_items:
            diffs.append(f"memory bank of N={bank.shape[0]} items (checkpoint) vs a data set of N={self.num_items} items")
        if diffs:
            raise ckpt.CheckpointError(f"{source} is incompatible with this config: {'; '.join(diffs)}")
        self.encoder_q.load_state_dict(state["encoder_q"])
        self.encoder_k.load_state_dict(state["encoder_k"])
        self.negatives.load_state_dict(state["negatives"])
        if self.predictor is not None:
            self.predictor.load_state_dict(state["predictor"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scaler.load_state_dict(state["scaler"])
        self.epoch, self.step, self.step_in_epoch = state["epoch"], state["step"], state["step_in_epoch"]
        self.last_eval = dict(state.get("last_eval", {}))
        self.wandb_run_id = state.get("wandb_run_id")
        self.nonfinite_skips = state.get("nonfinite_skips", 0)
        torch.set_rng_state(state["rng"]["torch"])
        random.setstate(state["rng"]["python"])
        if "cuda" in state["rng"] and self.device.type == "cuda":
            torch.cuda.set_rng_state(state["rng"]["cuda"], self.device)

    def save(self) -> Path | None:
        if not dist.is_main():
            return None
        path = ckpt.save_checkpoint(self.state_dict(), self.run_dir, self.step, self.cfg.train.keep_checkpoints)
        self.tracker.log_artifact(path)
        return path

    # ======================================================================== the run
    def prepare_run_dir(self) -> None:
        """Create the run folder; resume from it, or refuse to clobber a run already in it."""
        cfg = self.cfg.train
        try:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            probe = self.run_dir / f".write_test.{os.getpid()}"  # one per process: ranks share the folder
            probe.write_text("")
            probe.unlink(missing_ok=True)
        except OSError as e:
            raise UserError(f"config key 'train.out_dir': cannot write to {self.run_dir}: {e.strerror}") from None

        resumed = None
        if cfg.resume == "auto":
            resumed = ckpt.latest_checkpoint(self.run_dir)
        elif cfg.resume:
            path = Path(cfg.resume).expanduser()
            resumed = (path, ckpt.load_checkpoint(path))
        elif ckpt.checkpoint_files(self.run_dir):
            if not cfg.overwrite:
                raise UserError(
                    f"{self.run_dir} already holds a run's checkpoints; pass train.resume=auto to continue it "
                    "or train.overwrite=true to start over (deleting them)"
                )
            if dist.is_main():
                shutil.rmtree(self.run_dir / ckpt.CHECKPOINT_DIR)
                (self.run_dir / METRICS_FILE).unlink(missing_ok=True)

        if resumed is not None:
            path, state = resumed
            self.load_state_dict(state, source=f"checkpoint {path}")
            if dist.is_main():
                print(f"resumed from {path} at epoch {self.epoch}, step {self.step}", flush=True)
        elif self.cfg.negatives.kind == "memory_bank" and self.cfg.memory_bank.init == "encode":
            self.negatives.refresh(self.encode_train_set())
        if dist.is_main():
            (self.run_dir / CONFIG_FILE).write_text(to_yaml(self.cfg))

    def fit(self) -> dict[str, float]:
        """Pretrain for ``train.epochs`` epochs (continuing a resumed run) and return the final
        metrics, including the last kNN top-1 when the data set has a test split."""
        cfg = self.cfg
        self.prepare_run_dir()
        self.tracker = Tracker(self.run_dir, progress=cfg.track.progress, enabled=dist.is_main())
        self._start_wandb()
        try:
            if cfg.track.preview and self.step == 0 and dist.is_main():
                self.tracker.log_image("augmentations", self.save_preview(cfg.track.preview), 0)
            if cfg.eval.at_start and self.step == 0:
                self.last_eval = self.evaluate_knn()
                if self.last_eval:
                    self.tracker.log("eval", self.last_eval, -1, 0)
            while self.epoch < cfg.train.epochs:
                with self._stop_on_signals():
                    epoch_metrics = self.train_epoch()
                if epoch_metrics is None:
                    path = self.save()
                    self.tracker.log("stopped", {"signal": self.stop_signal}, self.epoch, self.step)
                    raise StopRequested(self.stop_signal, self.step, path)
                done = self.epoch  # epochs completed
                self.tracker.log("epoch", epoch_metrics, done - 1, self.step)
                last = done == cfg.train.epochs
                if last or (cfg.eval.knn_every and done % cfg.eval.knn_every == 0):
                    self.last_eval = self.evaluate_knn()
                    if self.last_eval:
                        self.tracker.log("eval", self.last_eval, done - 1, self.step)
                if last or done % cfg.train.save_every == 0:
                    self.save()
            final = {"epochs": self.epoch, "steps": self.step, **self.last_eval}
            self.tracker.log("final", final, self.epoch - 1, self.step)
            return final
        finally:
            self.tracker.close()


    def _start_wandb(self) -> None:
        """Add the W&B backend on rank 0 when ``track.wandb.mode`` (or WANDB_MODE) asks for it;
        a resumed run continues the W&B run its checkpoint names."""
        mode, notice = wandb_mode(self.cfg.track.wandb.mode)
        if mode == "disabled" or not dist.is_main():
            return
        if notice:
            print(notice, flush=True)
        backend = WandbBackend(self.cfg.track.wandb, self.run_dir, to_dict(self.cfg), self.wandb_run_id, mode)
        self.wandb_run_id = backend.run_id
        self.tracker.add_backend(backend)

    @torch.no_grad()
    def preview_pairs(self, n: int) -> Tensor:
        """Query and key views of the first n training images, drawn as training draws them
        (the CPU path: exactly epoch 0's views of those items), un-normalised to [0, 1]:
        (2n, 3, S, S) as q0, k0, q1, k1, ..."""
        spec = view_spec(self.cfg.data.augmentation, self.cfg.data.image_size)
        n = min(n, self.num_items)
        if isinstance(self.loader, DeviceTwoViews):
            images = self.loader.images[:n]
            views = random_views(torch.cat([images, images]), spec, step_generator(self.device, self.cfg.train.seed, 0, 0))
            pairs = torch.stack([views[:n], views[n:]], dim=1).flatten(0, 1)
        else:
            dataset = self.loader.dataset  # Indexed(TwoViews): item (epoch, i) -> ((x_q, x_k), y, i)
            pairs = torch.stack([view for i in range(n) for view in dataset[(0, i)][0]])
        mean = torch.tensor(spec.mean, device=pairs.device).view(1, 3, 1, 1)
        std = torch.tensor(spec.std, device=pairs.device).view(1, 3, 1, 1)
        return (pairs * std + mean).clamp(0, 1).cpu()

    def save_preview(self, n: int) -> Path:
        """``augmentations.png`` in the run folder: n query/key pairs side by side, 4 pairs a row
        (small images enlarged 4x with nearest-neighbour, so the pixels stay visible)."""
        from torchvision.utils import make_grid, save_image

        pairs = self.preview_pairs(n)
        if pairs.shape[-1] < 96:
            pairs = torch.nn.functional.interpolate(pairs, scale_factor=4, mode="nearest")
        path = self.run_dir / PREVIEW_FILE
        save_image(make_grid(pairs, nrow=8, padding=4, pad_value=1.0), path)
        return path

    @contextlib.contextmanager
    def _stop_on_signals(self):
        """While training: the first SIGTERM/SIGINT asks for a clean stop after the current step
        (checkpoint, then :class:`StopRequested`); a second one aborts at once."""
        if threading.current_thread() is not threading.main_thread():
            yield  # signal handlers can only be installed from the main thread
            return

        def handler(signum, frame):
            if self.stop_signal is not None:
                os._exit(128 + signum)  # the second signal: abort now (saved checkpoints are intact)
            self.stop_signal = signum
            if dist.is_main():
                print(f"\n{signal.Signals(signum).name}: finishing the step and saving a checkpoint "
                      "(send it again to abort at once)", flush=True)

        previous = {s: signal.signal(s, handler) for s in (signal.SIGTERM, signal.SIGINT)}
        try:
            yield
        finally:
            for s, h in previous.items():
                signal.signal(s, h)


def train(cfg: Config) -> dict[str, float]:
    """Run MoCo pretraining as configured; the library's one-call entry point."""
    return Trainer(cfg).fit()

