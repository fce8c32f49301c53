"""When a run logs, evaluates, saves and stops: the policy the Trainer's loop asks, in one place.

Under torchrun every rank must take the same decisions after the same step (a rank that saves
or evaluates alone would leave the others waiting in a collective): the log, evaluation and save
points are pure functions of the counters, and a stop is agreed by all ranks at a log point.
"""

from __future__ import annotations

import signal

import torch

from moco_engine.config.schema import Config
from moco_engine.run.signals import StopSignals
from moco_engine.runtime import distributed as dist


class Cadence:
    """The run's log, evaluation, save and stop points.

    Args:
        cfg: the run's config (``train.log_every``, ``train.save_every``, ``eval.knn_every``).
        signals: the run's stop signals.
        device: where the ranks' agreement is reduced.
        monitor: whether the run has a kNN monitor (a labelled test split).
        epochs: the epochs the run's :class:`~moco_engine.method.schedules.Plan` begins.
    """

    def __init__(self, cfg: Config, signals: StopSignals, device: torch.device, monitor: bool, epochs: int):
        self.train, self.eval = cfg.train, cfg.eval
        self.signals, self.device, self.monitor, self.epochs = signals, device, monitor, epochs

    def log_due(self, step: int, step_in_epoch: int, epoch_steps: int) -> bool:
        """After optimizer step ``step``: every ``train.log_every`` steps and at an epoch's end."""
        return step % self.train.log_every == 0 or step_in_epoch == epoch_steps

    def eval_due(self, done: int) -> bool:
        """After ``done`` epochs: every ``eval.knn_every`` epochs and after the last one."""
        every = self.eval.knn_every
        return self.monitor and (done == self.epochs or bool(every and done % every == 0))

    def save_due(self, done: int) -> bool:
        """After ``done`` epochs: every ``train.save_every`` epochs and after the last one."""
        return done == self.epochs or done % self.train.save_every == 0

    def stop_agreed(self, at_log: bool) -> bool:
        """Whether to stop after this step. Ranks must stop after the same step: they agree at
        each log point (a signal caught by any rank, e.g. one SIGTERM'd by the scheduler, stops
        them all); a collective under torchrun when ``at_log``."""
        if not dist.is_distributed():
            return self.signals.signum is not None
        stopping = dist.any_rank(self.signals.signum is not None, self.device) if at_log else False
        if stopping and self.signals.signum is None:
            self.signals.signum = signal.SIGTERM
        return stopping

    def loader_left(self, error: RuntimeError) -> bool:
        """Whether ``error``, raised by the training loader, is its workers having left on the
        stop signal (one process; no step is under way then, so it is a clean place to stop).
        Any other error is the run's to raise."""
        return (self.signals.signum is not None and not dist.is_distributed()
                and "DataLoader worker" in str(error))
