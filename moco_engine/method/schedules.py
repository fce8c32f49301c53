"""Per-step schedules: the run's length, the learning rate and the key encoder's EMA momentum."""

from __future__ import annotations

import math
from dataclasses import dataclass

from moco_engine.config.schema import Config, TrainConfig


@dataclass(frozen=True)
class Plan:
    """The run's length in optimizer steps, fixed when its data are read.

    ``train.steps`` > 0 is a budget: the run takes that many steps whatever the data's size, in
    ``ceil(steps / steps_per_epoch)`` epochs, the last one cut where the budget ends; so a small
    corpus gets the same training as a large one, in more passes. Otherwise the run is
    ``train.epochs`` whole epochs. The schedules count to :attr:`steps` either way, and a
    checkpoint records both numbers (a resume whose data give another epoch is refused).
    """

    steps: int
    steps_per_epoch: int

    @classmethod
    def of(cls, train: TrainConfig, steps_per_epoch: int) -> Plan:
        return cls(train.steps or train.epochs * steps_per_epoch, steps_per_epoch)

    @property
    def epochs(self) -> int:
        """Epochs begun in the whole run (the last one may be cut short)."""
        return -(-self.steps // self.steps_per_epoch)

    def epoch_steps(self, epoch: int) -> int:
        """Optimizer steps in epoch ``epoch`` (0-based)."""
        return min(self.steps_per_epoch, self.steps - epoch * self.steps_per_epoch)


def lr_at(cfg: Config, step: int, steps_per_epoch: int, world: int = 1) -> float:
    """Learning rate at global ``step`` of the run's :class:`Plan`: linear warm-up, then cosine to 0, linear to 0
    (Contriever's ``WarmupLinearScheduler``, src/utils.py, final ratio 0), step decay or constant
    (``optim.warmup_from_zero``: MoCo v3's warm-up from exactly 0).

    With ``optim.lr_scaling=linear`` the peak is optim.lr × global batch / 256 (Goyal et al.),
    the global batch being ``optim.batch_size`` × ``world`` processes.
    """
    base, total = cfg.optim.lr, Plan.of(cfg.train, steps_per_epoch).steps
    if cfg.optim.lr_scaling == "linear":
        base = base * cfg.optim.batch_size * world / 256
    if cfg.optim.warmup_from_zero:
        # MoCo v3's adjust_learning_rate (main_moco.py): lr·e/warmup at fractional epoch e =
        # step / steps_per_epoch, exactly 0 at the first step; the cosine after it alike.
        warmup: float = cfg.optim.warmup_epochs * steps_per_epoch
        if step < warmup:
            return base * step / warmup
    else:
        warmup = int(cfg.optim.warmup_epochs * steps_per_epoch)
        if step < warmup:
            return base * (step + 1) / warmup
    if cfg.optim.schedule == "cosine":
        progress = (step - warmup) / max(total - warmup, 1)
        return base * 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))
    if cfg.optim.schedule == "linear":
        return base * max(0.0, 1.0 - (step - warmup) / max(total - warmup, 1))
    if cfg.optim.schedule == "step":
        epoch = step // steps_per_epoch
        return base * cfg.optim.gamma ** sum(epoch >= m for m in cfg.optim.milestones)
    return base


def momentum_at(base: float, schedule: str, step: int, total_steps: int) -> float:
    """The EMA momentum m at ``step`` of ``total_steps``.

    ``constant``: m = base. ``cosine`` (BYOL's): m rises from base to 1,
    m = 1 − (1 − base)·(cos(π·step/total) + 1)/2.
    """
    if schedule == "constant" or total_steps <= 0:
        return base
    progress = min(step / total_steps, 1.0)
    return 1.0 - (1.0 - base) * (math.cos(math.pi * progress) + 1.0) / 2.0
