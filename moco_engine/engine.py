"""The Trainer: assembles a run from its parts, loops over epochs, evaluates and saves.

The step itself is in ``step.py`` (``moco_step``, ``byol_step``: the paper's order), the batches
in ``loaders.py``, the folder, lock, W&B and signals in ``run.py``, the device and autocast in
``precision.py``, the kNN monitor in ``evaluation.py``. ``ARCHITECTURE.md`` has the map.

    final = Trainer(cfg).fit()      # or train(cfg)
"""

from __future__ import annotations

import math
import random
import signal
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from . import checkpoint as ckpt
from . import distributed as dist
from . import run, snapshot
from .config import Config
from .evaluation import encode_split, knn_monitor
from .loaders import build_loaders, preview_pairs
from .precision import (
    autocast_dtype,
    memory_format,
    own_rng,
    peak_memory_gib,
    resolve_device,
)
from .rules import ignored_settings
from .schedules import lr_at, momentum_at
from .step import (
    Skipped,
    build_parts,
    byol_step,
    moco_step,
)
from .tracking import DeviceMeans, Tracker


class NonFiniteLoss(Exception):
    """The loss or the weights became NaN or infinite; nothing from that point on was saved."""


class Trainer:
    """A MoCo (or BYOL) run: its loaders, its step parts (f_q, f_k, the negative source, the
    objective, the optimizer) and its counters.

    Args:
        cfg: the run's config.
        view: the CPU path's random view of a PIL image in place of the recipe's (tests).
    """

    def __init__(self, cfg: Config, view: Callable | None = None, signals: run.StopSignals | None = None):
        self.cfg = cfg
        self.device = resolve_device(cfg.train.device)
        self.amp_dtype = autocast_dtype(cfg.train.precision, self.device)
        self.memory_format = memory_format(cfg.train.channels_last)  # of the inputs, as of the encoders
        self.run_dir = Path(cfg.train.out_dir).expanduser()
        self.rank, self.world = dist.rank(), dist.world_size()
        ignored = ignored_settings(cfg)
        if ignored and dist.is_main():
            what = "method=byol" if cfg.method == "byol" else f"negatives.kind={cfg.negatives.kind}"
            print(f"warning: {what} ignores {', '.join(ignored)}", file=sys.stderr, flush=True)
        torch.manual_seed(cfg.train.seed + self.rank)
        random.seed(cfg.train.seed + self.rank)
        self.loaders = build_loaders(cfg, self.device, self.rank, self.world, view)
        # The model and the queue start identical on every rank; per-rank randomness after them.
        torch.manual_seed(cfg.train.seed)
        self.parts = build_parts(cfg, self.device, self.amp_dtype, self.loaders.num_items)
        torch.manual_seed(cfg.train.seed + self.rank)
        self.step_fn = byol_step if cfg.method == "byol" else moco_step

        self.epoch = 0  # epochs completed
        self.step = 0  # optimizer steps taken
        self.step_in_epoch = 0
        self.last_eval: dict[str, float] = {}
        self.best_eval: dict[str, float] = {}  # each kNN figure's best over the whole run, resumes included
        self.tracker = Tracker(None, enabled=False)
        self.signals = signals or run.StopSignals()  # SIGTERM/SIGINT: save the completed state, exit
        self.wandb_run_id: str | None = None  # kept in checkpoints: a resumed run continues its W&B run
        self.collapse_warned = -1  # the epoch of the last collapse warning
        self.nonfinite_skips = 0  # steps skipped for a NaN/inf loss (train.max_nonfinite_skips)
        self.eval_pending = False  # an epoch's kNN was due and not finished (a resume runs it first)
        self.saved: Path | None = None  # the checkpoint holding the current state (saved or resumed from)
        self.unsaved = False  # steps were taken since the last save

    # The parts most often asked for, by their paper names.
    @property
    def encoder_q(self) -> torch.nn.Module:
        return self.parts.encoder_q

    @property
    def encoder_k(self) -> torch.nn.Module | None:
        return self.parts.encoder_k

    @property
    def negatives(self):
        return self.parts.negatives

    @property
    def predictor(self) -> torch.nn.Module | None:
        return self.parts.predictor

    @property
    def optimizer(self) -> torch.optim.Optimizer:
        return self.parts.optimizer

    @property
    def total_steps(self) -> int:
        return self.cfg.train.epochs * self.loaders.steps_per_epoch

    # ======================================================================== one step
    def train_step(self, x_q: Tensor, x_k: Tensor, indices: Tensor) -> dict[str, Tensor] | None:
        """One step of the run's method at the schedules' values for the current step, on two
        views (B, 3, H, W) of the items ``indices`` (B,); None for a skipped non-finite step."""
        cfg = self.cfg
        lr = lr_at(cfg, self.step, self.loaders.steps_per_epoch, self.world)
        momentum = momentum_at(cfg.model.momentum, cfg.model.momentum_schedule, self.step, self.total_steps)
        out = self.step_fn(self.parts, x_q, x_k, indices, lr, momentum)
        self.step += 1  # a skipped step's batch is used up too: the schedules move on
        self.unsaved = True
        if isinstance(out, Skipped):
            self.count_skip(out.loss)
            return None
        return out

    def count_skip(self, loss: Tensor) -> None:
        """Count a step skipped for its non-finite loss; stop past ``train.max_nonfinite_skips``."""
        self.nonfinite_skips += 1
        limit = self.cfg.train.max_nonfinite_skips
        if self.nonfinite_skips > limit:
            raise NonFiniteLoss(self.divergence_message(
                f"non-finite loss ({loss.item()}) at step {self.step}, after {limit} skipped steps (train.max_nonfinite_skips)"
            ))
        self.tracker.warn(f"non-finite loss ({loss.item()}) at step {self.step}: step skipped ({self.nonfinite_skips} of at most {limit})")

    def divergence_message(self, what: str) -> str:
        """``what`` and the newest checkpoint that verifies and holds finite numbers."""
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the files passed over are not news here
            try:
                good = ckpt.latest_checkpoint(self.run_dir, accept=snapshot.unusable)
            except ckpt.CheckpointError:
                good = None
        return f"{what}; " + (f"the last good checkpoint is {good[0]}" if good else "no good checkpoint was written")

    # ======================================================================== epochs
    def train_epoch(self) -> dict[str, float] | None:
        """Run (the rest of) the current epoch; returns the epoch's mean metrics, or None when a
        stop signal ended it early."""
        cfg, loaders = self.cfg, self.loaders
        self.encoder_q.train()
        if self.encoder_k is not None:
            self.encoder_k.train()
        loaders.sampler.set_epoch(self.epoch, skip=self.step_in_epoch * cfg.optim.batch_size)
        self.tracker.start_epoch(self.epoch, cfg.train.epochs, loaders.steps_per_epoch, self.step_in_epoch)
        window, epoch_means = DeviceMeans(), DeviceMeans()
        images, window_start = 0, time.perf_counter()
        epoch_start = time.perf_counter()
        batches = iter(loaders.train)
        while self.step_in_epoch < loaders.steps_per_epoch:
            try:
                (x_q, x_k), _, idx = next(batches)
            except RuntimeError:
                if self.signals.signum is None or dist.is_distributed():
                    raise
                # The loader workers got the stop signal too and have left: no step is under
                # way, so this is a clean place to stop.
                self.tracker.end_epoch()
                return None
            x_q = x_q.to(self.device, memory_format=self.memory_format, non_blocking=True)
            x_k = x_k.to(self.device, memory_format=self.memory_format, non_blocking=True)
            metrics = self.train_step(x_q, x_k, idx.to(self.device, non_blocking=True))
            self.step_in_epoch += 1
            images += x_q.shape[0]
            if metrics is not None:  # None: a step skipped for its non-finite loss
                window.add(metrics)
                epoch_means.add(metrics)
            self.tracker.advance()
            at_log = self.step % cfg.train.log_every == 0 or self.step_in_epoch == loaders.steps_per_epoch
            stopping = self.stop_agreed(at_log)
            if (stopping or at_log) and window.count:
                self.log_window(window.means(), images, time.perf_counter() - window_start)
                window, images, window_start = DeviceMeans(), 0, time.perf_counter()
            if stopping:
                self.tracker.end_epoch()
                return None  # mid-epoch: step_in_epoch tells a resumed run where to go on
        self.tracker.end_epoch()
        epoch_time = time.perf_counter() - epoch_start
        hook_start = time.perf_counter()
        self.negatives.on_epoch_end(self.epoch, self.encode_interruptibly)
        hook_time = time.perf_counter() - hook_start
        self.epoch += 1
        self.step_in_epoch = 0
        out = epoch_means.means()
        out.update(epoch_s=epoch_time, negatives_bytes=self.negatives.memory_bytes())
        if hook_time > 1e-3:  # the memory bank's refresh: its cost in seconds and in % of the epoch
            out.update(refresh_s=hook_time, refresh_pct=100 * hook_time / (epoch_time + hook_time))
        return out

    def stop_agreed(self, at_log: bool) -> bool:
        """Whether to stop after this step. Ranks must stop after the same step: they agree at
        each log point (a signal caught by any rank, e.g. one SIGTERM'd by the scheduler, stops
        them all)."""
        if not dist.is_distributed():
            return self.signals.signum is not None
        stopping = dist.any_rank(self.signals.signum is not None, self.device) if at_log else False
        if stopping and self.signals.signum is None:
            self.signals.signum = signal.SIGTERM
        return stopping

    def log_window(self, means: dict[str, float], images: int, elapsed: float) -> None:
        """Log the mean metrics of the steps since the last log point (fetched in the
        interval's one host sync), with the schedules' values, throughput and memory."""
        cfg = self.cfg
        if not math.isfinite(means["loss"]):
            # Checked before any save, so NaN weights never overwrite a good checkpoint.
            raise NonFiniteLoss(self.divergence_message(
                f"non-finite loss ({means['loss']}) in the steps up to step {self.step}"
            ))
        means["lr"] = self.optimizer.param_groups[0]["lr"]
        means["momentum"] = momentum_at(cfg.model.momentum, cfg.model.momentum_schedule, self.step - 1, self.total_steps)
        means["img_per_s"] = images * self.world / max(elapsed, 1e-9)
        if self.encoder_k is not None:
            means["qk_weight_dist"] = self.encoder_k.relative_distance(self.encoder_q).item()
        means["mem_peak_gib"] = peak_memory_gib(self.device)
        self.check_collapse(means["embed_std"])
        self.tracker.log("step", means, self.epoch, self.step)

    def check_collapse(self, embed_std: float) -> None:
        """Warn (once an epoch) when the queries lose their spread: embed_std·sqrt(D) below
        ``track.collapse_threshold``, where 1 is the spread of points uniform on the sphere."""
        spread = embed_std * math.sqrt(self.cfg.model.dim)
        if spread < self.cfg.track.collapse_threshold and self.collapse_warned != self.epoch:
            self.collapse_warned = self.epoch
            self.tracker.warn(
                f"embeddings collapsing at step {self.step}: embed_std·sqrt(D) = {spread:.3f} "
                f"< track.collapse_threshold {self.cfg.track.collapse_threshold}"
            )

    # ======================================================================== evaluation
    def encode_interruptibly(self) -> Tensor:
        """:meth:`encode_train_set` as a stop signal may cut short (it changes no state; the
        memory bank is refreshed from its result in one step after it)."""
        with self.signals.interruptible():
            return self.encode_train_set()

    @torch.no_grad()
    def encode_train_set(self) -> Tensor:
        """Every training item's embedding (N, D) in index order, made as keys are: by the key
        encoder (end to end: f_q) with BatchNorm on batch statistics (in eval mode its barely
        trained running statistics would give embeddings a query could tell apart from keys)."""
        encoder = self.encoder_q if self.encoder_k is None else self.encoder_k
        with own_rng(self.device):
            return encode_split(encoder, self.loaders.plain_train_shard, self.loaders.num_items, self.device,
                                self.amp_dtype, batch_stats=True)[0]

    @torch.no_grad()
    def evaluate_knn(self) -> dict[str, float]:
        """Weighted kNN (k, T from ``eval``) of the test split against the train split's features."""
        loaders, cfg = self.loaders, self.cfg.eval
        if loaders.test is None:
            return {}
        model = self.encoder_q.backbone if cfg.knn_features == "backbone" else self.encoder_q
        # Every rank encodes its shard with the same statistics: their mean, as checkpoints hold.
        with own_rng(self.device), dist.rank_mean_buffers(self.encoder_q):
            return knn_monitor(model, loaders.plain_train_shard, loaders.test_shard, loaders.num_items, loaders.num_test,
                               loaders.num_classes, cfg.knn_k, cfg.knn_t, self.device, self.amp_dtype)

    # ======================================================================== state
    def state_dict(self) -> dict[str, Any]:
        """The run's snapshot (``snapshot.py``): a collective under torchrun."""
        return snapshot.take(self.parts, self.cfg, self.device, {name: getattr(self, name) for name in snapshot.COUNTERS})

    def load_state_dict(self, state: dict[str, Any], source: str = "checkpoint") -> None:
        """Restore a :meth:`state_dict` (refused, naming the settings that differ, if it does not fit)."""
        for name, value in snapshot.restore(self.parts, state, self.cfg, self.device, source).items():
            setattr(self, name, value)  # the counters: epoch, step, ... (snapshot.COUNTERS)

    def save(self) -> Path | None:
        """Write a checkpoint (rank 0; the others take part in gathering it and return None).

        Raises:
            NonFiniteLoss: the state holds NaN or ±inf (checked on the device, one sync): it is
                not written, and the message names the last good checkpoint.
        """
        state = self.state_dict()
        reason = snapshot.unusable(state)  # the same state on every rank: all of them stop alike
        if reason is not None:
            raise NonFiniteLoss(self.divergence_message(f"at step {self.step} the state {reason}; it was not saved"))
        self.unsaved = False
        if not dist.is_main():
            return None
        self.saved = ckpt.save_checkpoint(state, self.run_dir, self.step, self.cfg.train.keep_checkpoints)
        self.tracker.log_artifact(self.saved)
        return self.saved

    def stop(self) -> None:
        """Save the completed state if steps were taken since the last save, and raise
        :class:`~moco_engine.run.StopRequested` (exit 128+N in ``moco-train``)."""
        new = self.unsaved
        path = self.save() if new else self.saved
        # No rank exits before rank 0's checkpoint is on disk (torchrun ends the others as
        # soon as one worker exits with an error code).
        dist.barrier()
        self.tracker.log("stopped", {"signal": self.signals.signum}, self.epoch, self.step)
        raise run.StopRequested(self.signals.signum or signal.SIGTERM, self.step, path, new)

    def stop_if_signalled(self) -> None:
        """Stop (see :meth:`stop`) when any rank caught a signal; a collective under torchrun."""
        if self.stop_agreed(True):
            self.stop()

    # ======================================================================== the run
    def prepare_run_dir(self) -> None:
        """Create the run folder; resume from it, or refuse to clobber a run already in it."""
        run.make_folder(self.run_dir)
        resumed = run.choose_resume(self.cfg.train, self.run_dir, snapshot.unusable)
        if resumed is not None:
            path, state = resumed
            self.load_state_dict(state, source=f"checkpoint {path}")
            self.saved = path
            if dist.is_main():
                print(f"resumed from {path} at epoch {self.epoch}, step {self.step}", flush=True)
        elif self.cfg.negatives.kind == "memory_bank" and self.cfg.memory_bank.init == "encode":
            self.negatives.refresh(self.encode_interruptibly())
        run.write_config(self.run_dir, self.cfg)

    def fit(self) -> dict[str, float]:
        """Pretrain for ``train.epochs`` epochs (continuing a resumed run) and return the final
        metrics, including the last kNN top-1 when the data set has a test split.

        A stop signal at any moment (a step, evaluation, the memory bank's refresh, a save,
        start-up) ends it with the completed state saved: :class:`~moco_engine.run.StopRequested`.
        """
        run.make_folder(self.run_dir)
        with self.signals.catching():
            if not dist.is_main():
                return self.fit_locked()
            with run.RunLock(self.run_dir):
                return self.fit_locked()

    def fit_locked(self) -> dict[str, float]:
        cfg = self.cfg
        try:
            with self.signals.interruptible():  # start-up: nothing new to save yet
                self.prepare_run_dir()
                self.tracker = Tracker(self.run_dir, progress=cfg.track.progress, enabled=dist.is_main())
                self.wandb_run_id = run.start_wandb(cfg, self.run_dir, self.wandb_run_id, self.tracker)
                if cfg.track.preview and self.step == 0 and dist.is_main():
                    pairs = preview_pairs(self.loaders, cfg.track.preview, cfg.train.seed)
                    self.tracker.log_image("augmentations", run.save_preview(pairs, self.run_dir), 0)
            self.stop_if_signalled()
            if cfg.eval.at_start and self.step == 0:
                self.run_knn(-1)
            if self.eval_pending:  # a stop cut the last run's evaluation short
                self.run_knn(self.epoch - 1)
            while self.epoch < cfg.train.epochs:
                epoch_metrics = self.train_epoch()
                if epoch_metrics is None:
                    self.stop()
                done = self.epoch  # epochs completed
                self.tracker.log("epoch", epoch_metrics, done - 1, self.step)
                last = done == cfg.train.epochs
                self.eval_pending = bool(self.loaders.test is not None
                                         and (last or (cfg.eval.knn_every and done % cfg.eval.knn_every == 0)))
                self.stop_if_signalled()  # e.g. during the memory bank's refresh
                if self.eval_pending:
                    self.run_knn(done - 1)
                if last or done % cfg.train.save_every == 0:
                    self.save()
                self.stop_if_signalled()
            final = {"epochs": self.epoch, "steps": self.step, **self.last_eval}
            self.tracker.log("final", final, self.epoch - 1, self.step)
            return final
        except run.StopNow:
            self.stop()
        finally:
            self.loaders.close()
            self.tracker.close()

    def run_knn(self, epoch: int) -> None:
        """The kNN monitor, logged under ``epoch`` (-1: before training); a stop signal cuts it
        short (then the resumed run evaluates first)."""
        with self.signals.interruptible():
            result = self.evaluate_knn()
        self.stop_if_signalled()
        self.last_eval, self.eval_pending = result, False
        if result:
            self.tracker.log("eval", result, epoch, self.step)
            # The run summary a sweep ranks by: the best over every segment of the run (W&B's own
            # max would cover only the segment since the last resume), of the trained network:
            # the random one's (epoch -1) is the baseline, not a result.
            if epoch >= 0:
                self.best_eval = {k: max(v, self.best_eval.get(k, v)) for k, v in result.items()}
                self.tracker.summarize({f"eval/{k}": v for k, v in self.best_eval.items()})
            if dist.is_main():
                run.save_knn_plot(self.run_dir)


def train(cfg: Config) -> dict[str, float]:
    """Run MoCo pretraining as configured; the library's one-call entry point."""
    return Trainer(cfg).fit()
