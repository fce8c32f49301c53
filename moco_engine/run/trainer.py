"""The Trainer: assembles a run from its parts, loops over epochs, evaluates and saves.

The step is the method's (``method/``), the batches the data source's (``data/loaders.py``), the
run's start ``opening.py``'s, its records ``records.py``'s, when to log, evaluate, save and stop
``cadence.py``'s. ``ARCHITECTURE.md`` has the map.

    final = Trainer(cfg).fit()      # or train(cfg)
"""

from __future__ import annotations

import random
import signal
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from moco_engine.config.rules import ignored_warning
from moco_engine.config.schema import Config
from moco_engine.evaluation.monitor import Monitor
from moco_engine.method.schedules import Plan, lr_at, momentum_at
from moco_engine.method.step import METHODS, Skipped, build_parts
from moco_engine.run import checkpoint as ckpt
from moco_engine.run import folder, opening, records, snapshot
from moco_engine.run.cadence import Cadence
from moco_engine.run.progress import Progress
from moco_engine.run.signals import StopNow, StopRequested, StopSignals
from moco_engine.run.tracking import Meter, Tracker
from moco_engine.run.warmup import Warmup
from moco_engine.run.watch import Watch
from moco_engine.runtime import distributed as dist
from moco_engine.runtime.batches import batch_size, to_device
from moco_engine.runtime.precision import autocast_dtype, memory_format, resolve_device


class Trainer:
    """A run of a registered method (MoCo v1/v2, MoCo v3, BYOL, ...): its loaders, its step parts (f_q, f_k, the negative source, the
    objective, the optimizer) and its counters.

    Args:
        cfg: the run's config.
        view: the CPU path's random view of an item in place of the source's or recipe's (tests).
        signals: the stop signals to honour (``moco-train`` catches them from start-up on).
        launched: ``time.perf_counter()`` when the command started (the first step's line counts
            from it; default: now).
    """

    def __init__(self, cfg: Config, view: Callable | None = None, signals: StopSignals | None = None,
                 launched: float | None = None):
        self.cfg = cfg
        self.device = resolve_device(cfg.train.device)
        self.amp_dtype = autocast_dtype(cfg.train.precision, self.device)
        self.memory_format = memory_format(cfg.train.channels_last)  # of 4-D (image) inputs, as of the encoders
        self.run_dir = Path(cfg.train.out_dir).expanduser()
        self.rank, self.world = dist.rank(), dist.world_size()
        ignored = ignored_warning(cfg)  # also checks every registered name, before the data are read
        if ignored and dist.is_main():
            print(ignored, file=sys.stderr, flush=True)
        torch.manual_seed(cfg.train.seed + self.rank)
        random.seed(cfg.train.seed + self.rank)
        # A resume reads its checkpoint once, here: the source opens with what it kept (a vocabulary).
        self.resumed = opening.resume_point(cfg, self.run_dir)
        self.loaders = opening.open_data(cfg, self.device, self.rank, self.world, view, self.resumed)
        # The model and the queue start identical on every rank; per-rank randomness after them.
        torch.manual_seed(cfg.train.seed)
        self.parts = build_parts(cfg, self.device, self.amp_dtype, self.loaders.num_items, self.loaders.input_shape,
                                 self.loaders.steps_per_epoch)
        torch.manual_seed(cfg.train.seed + self.rank)
        self.step_fn = METHODS[cfg.method].step  # the step of the method build_parts built for
        self.plan = Plan.of(cfg.train, self.loaders.steps_per_epoch)  # the run's length: epochs, or a budget of steps
        self.progress = Progress()  # epochs and steps taken, evaluations, ...: what a checkpoint keeps of the run
        self.tracker = Tracker(None, enabled=False)
        self.signals = signals or StopSignals()  # SIGTERM/SIGINT: save the completed state, exit
        self.monitor = Monitor(cfg.eval, self.loaders, self.device, self.amp_dtype)  # kNN, retrieval or recall, the train set's encoding
        self.cadence = Cadence(cfg, self.signals, self.device, self.monitor.active, self.plan.epochs)
        # The first step's time and a compiled run's compilation, kept out of it (interruptible).
        self.warmup = Warmup(time.perf_counter() if launched is None else launched,
                             cfg.train.compile or cfg.train.cuda_graphs, self.signals, self.device)
        self.watch = Watch(cfg, self.run_dir)  # non-finite numbers, skipped steps, collapse
        self.saved: Path | None = None  # the checkpoint holding the current state (saved or resumed from)
        self.unsaved = False  # steps were taken since the last save

    # The parts most often asked for, by their paper names.
    encoder_q = property(lambda self: self.parts.encoder_q, doc="f_q")
    encoder_k = property(lambda self: self.parts.encoder_k, doc="f_k, the EMA of f_q (None: end-to-end negatives)")
    negatives = property(lambda self: self.parts.negatives, doc="the negative source")
    predictor = property(lambda self: self.parts.predictor, doc="BYOL's predictor (else None)")
    optimizer = property(lambda self: self.parts.optimizer, doc="the optimizer of f_q (and the predictor)")
    total_steps = property(lambda self: self.plan.steps, doc="optimizer steps in the whole run")
    epoch = property(lambda self: self.progress.epoch, doc="epochs completed")
    step = property(lambda self: self.progress.step, doc="optimizer steps taken")
    step_in_epoch = property(lambda self: self.progress.step_in_epoch, doc="steps taken in the current epoch")

    # ======================================================================== one step
    def train_step(self, x_q: Any, x_k: Any, indices: Tensor) -> dict[str, Tensor] | None:
        """One step of the run's method at the schedules' values for the current step, on two
        views (B, ...) of the items ``indices`` (B,); None for a skipped non-finite step."""
        cfg, progress = self.cfg, self.progress
        lr = lr_at(cfg, progress.step, self.loaders.steps_per_epoch, self.world)
        momentum = momentum_at(cfg.model.momentum, cfg.model.momentum_schedule, progress.step + self.parts.ema_ahead,
                               self.total_steps)
        out = self.step_fn(self.parts, x_q, x_k, indices, lr, momentum)
        progress.step += 1  # a skipped step's batch is used up too: the schedules move on
        self.unsaved = True
        if isinstance(out, Skipped):
            progress.nonfinite_skips += 1  # past train.max_nonfinite_skips, the watch stops the run
            self.tracker.warn(self.watch.skipped(progress.nonfinite_skips, out.loss.item(), progress.step))
            return None
        return out

    # ======================================================================== epochs
    def train_epoch(self) -> dict[str, float] | None:
        """Run (the rest of) the current epoch; returns the epoch's mean metrics, or None when a
        stop signal ended it early."""
        cfg, loaders, progress = self.cfg, self.loaders, self.progress
        self.encoder_q.train()
        if self.encoder_k is not None:
            self.encoder_k.train()
        loaders.sampler.set_epoch(progress.epoch, skip=progress.step_in_epoch * cfg.optim.batch_size)
        epoch_steps = self.plan.epoch_steps(progress.epoch)  # the last epoch of a budget may be cut short
        self.tracker.start_epoch(progress.epoch, self.plan.epochs, epoch_steps, progress.step_in_epoch)
        meter = Meter()
        batches = iter(loaders.train)
        while progress.step_in_epoch < epoch_steps:
            try:
                (x_q, x_k), _, idx = self.warmup.first_batch(batches)
            except RuntimeError as e:
                if not self.cadence.loader_left(e):
                    raise
                self.tracker.end_epoch()
                return None
            x_q, x_k = to_device(x_q, self.device, self.memory_format), to_device(x_k, self.device, self.memory_format)
            self.warmup.compile(self.parts, x_q, x_k)  # a compiled run's first batch: compile, interruptibly
            metrics = self.train_step(x_q, x_k, idx.to(self.device, non_blocking=True))  # None: a skipped step
            self.warmup.stepped(self.tracker)
            progress.step_in_epoch += 1
            meter.add(metrics, batch_size(x_q))
            self.tracker.advance()
            at_log = self.cadence.log_due(progress.step, progress.step_in_epoch, epoch_steps)
            stopping = self.cadence.stop_agreed(at_log)
            window = meter.take_window() if stopping or at_log else None
            if window is not None:
                records.log_window(self.tracker, self.watch, self.parts, progress, self.total_steps, loaders.images, *window)
            if stopping:
                self.tracker.end_epoch()
                return None  # mid-epoch: step_in_epoch tells a resumed run where to go on
        self.tracker.end_epoch()
        epoch_time = meter.epoch_seconds()
        hook_start = time.perf_counter()
        loaders.items_at(progress.epoch + 1)  # a refresh encodes the items as the next epoch trains on them
        self.negatives.on_epoch_end(progress.epoch, self.encode_interruptibly)
        hook_time = time.perf_counter() - hook_start
        progress.epoch += 1
        progress.step_in_epoch = 0
        return records.epoch_record(meter.epoch.means(), epoch_time, hook_time, self.negatives.memory_bytes(),
                                    self.warmup.compiles_since())

    # ======================================================================== evaluation
    def encode_interruptibly(self) -> Tensor:
        """:meth:`encode_train_set` as a stop signal may cut short (it changes no state; the
        memory bank is refreshed from its result in one step after it)."""
        with self.signals.interruptible():
            return self.encode_train_set()

    def encode_train_set(self) -> Tensor:
        """Every training item's embedding (N, D) by the key encoder (``monitor.py``)."""
        return self.monitor.encode_train_set(self.encoder_q if self.encoder_k is None else self.encoder_k)

    def evaluate_knn(self) -> dict[str, float]:
        """The monitor (``monitor.py``): weighted kNN of the test split against the train split's
        features, or for text retrieval on the ``eval.retrieval_split`` qrels."""
        return self.monitor.evaluate(self.encoder_q)

    # ======================================================================== state
    def state_dict(self) -> dict[str, Any]:
        """The run's snapshot (``snapshot.py``): a collective under torchrun."""
        return snapshot.take(self.parts, self.cfg, self.device, self.progress.state_dict(), self.loaders.source_state(),
                             self.plan)

    def load_state_dict(self, state: dict[str, Any], source: str = "checkpoint") -> None:
        """Restore a :meth:`state_dict` (refused, naming the settings that differ, if it does not fit)."""
        snapshot.restore(self.parts, state, self.cfg, self.device, source, self.loaders.source_misfit, self.plan)
        self.progress.load_state_dict(state)

    def save(self) -> Path | None:
        """Write a checkpoint (rank 0; the others take part in gathering it and return None).

        Raises:
            NonFiniteLoss: the state holds NaN or ±inf (checked on the device, one sync): it is
                not written, and the message names the last good checkpoint.
        """
        state = self.state_dict()
        reason = snapshot.unusable(state)  # the same state on every rank: all of them stop alike
        if reason is not None:
            raise self.watch.diverged(f"at step {self.step} the state {reason}; it was not saved")
        self.unsaved = False
        if not dist.is_main():
            return None
        self.saved = ckpt.save_checkpoint(state, self.run_dir, self.step, self.cfg.train.keep_checkpoints)
        self.tracker.log_artifact(self.saved)
        return self.saved

    def stop(self) -> None:
        """Save the completed state if steps were taken since the last save, and raise
        :class:`~moco_engine.run.signals.StopRequested` (exit 128+N in ``moco-train``)."""
        new = self.unsaved
        path = self.save() if new else self.saved
        # No rank exits before rank 0's checkpoint is on disk (torchrun ends the others as
        # soon as one worker exits with an error code).
        dist.barrier()
        self.tracker.log("stopped", {"signal": self.signals.signum}, self.epoch, self.step)
        raise StopRequested(self.signals.signum or signal.SIGTERM, self.step, path, new)

    def stop_if_signalled(self) -> None:
        """Stop (see :meth:`stop`) when any rank caught a signal; a collective under torchrun."""
        if self.cadence.stop_agreed(True):
            self.stop()

    # ======================================================================== the run
    def prepare_run_dir(self) -> None:
        """Create the run folder (``opening.py``); resume from the checkpoint chosen when the run
        was built, or start fresh (refusing to clobber a run in it)."""
        opening.open_folder(self.cfg, self.run_dir)
        if self.resumed is not None:
            path, state = self.resumed
            self.load_state_dict(state, source=f"checkpoint {path}")
            self.saved, self.resumed = path, None  # the snapshot is in the run now: not held twice
            self.loaders.items_at(self.epoch)
            opening.say_resumed(path, self.progress)
        elif self.saved is None:  # a fresh start (a run already resumed or saved goes on as it is)
            opening.start_fresh(self.cfg, self.parts, self.encode_interruptibly)
        opening.write_run_files(self.cfg, self.run_dir, self.loaders)

    def fit(self) -> dict[str, float]:
        """Pretrain for the run's plan (``train.epochs`` or ``train.steps``; continuing a resumed run) and
        return the final metrics, the monitor's last figures among them. A stop signal at any moment (a
        step, evaluation, the memory bank's refresh, a save, start-up) ends it with the completed state
        saved: :class:`~moco_engine.run.signals.StopRequested`."""
        folder.make_folder(self.run_dir)
        with self.signals.catching():
            if not dist.is_main():
                return self.fit_locked()
            with folder.RunLock(self.run_dir):
                return self.fit_locked()

    def fit_locked(self) -> dict[str, float]:
        cfg, progress = self.cfg, self.progress
        try:
            with self.signals.interruptible():  # start-up: nothing new to save yet
                self.prepare_run_dir()
                self.tracker, progress.wandb_run_id = opening.open_tracking(
                    cfg, self.run_dir, progress.wandb_run_id, self.loaders, progress.step, self.cadence.monitor)
            self.stop_if_signalled()
            if cfg.eval.at_start and progress.step == 0:
                self.run_knn(-1)
            if progress.eval_pending:  # a stop cut the last run's evaluation short
                self.run_knn(progress.epoch - 1)
            while progress.epoch < self.plan.epochs:
                epoch_metrics = self.train_epoch()
                if epoch_metrics is None:
                    self.stop()
                done = progress.epoch  # epochs completed
                self.tracker.log("epoch", epoch_metrics, done - 1, progress.step)
                progress.eval_pending = self.cadence.eval_due(done)
                self.stop_if_signalled()  # e.g. during the memory bank's refresh
                if progress.eval_pending:
                    self.run_knn(done - 1)
                if self.cadence.save_due(done):
                    self.save()
                self.stop_if_signalled()
            final = {"epochs": progress.epoch, "steps": progress.step, **progress.last_eval}
            self.tracker.log("final", final, progress.epoch - 1, progress.step)
            return final
        except StopNow:
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
        progress = self.progress
        progress.last_eval, progress.eval_pending = result, False
        if result:
            progress.best_eval = records.log_eval(self.tracker, self.run_dir, result, epoch, progress.step,
                                                  progress.best_eval)


def train(cfg: Config) -> dict[str, float]:
    """Run MoCo pretraining as configured; the library's one-call entry point."""
    return Trainer(cfg).fit()
