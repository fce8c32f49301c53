"""Per-step schedules: the learning rate and the key encoder's EMA momentum."""

from __future__ import annotations

import math

from moco_engine.config.schema import Config


def lr_at(cfg: Config, step: int, steps_per_epoch: int, world: int = 1) -> float:
    """Learning rate at global ``step``: linear warm-up, then cosine to 0, linear to 0
    (Contriever's ``WarmupLinearScheduler``, src/utils.py, final ratio 0), step decay or constant
    (``optim.warmup_from_zero``: MoCo v3's warm-up from exactly 0).

    With ``optim.lr_scaling=linear`` the peak is optim.lr × global batch / 256 (Goyal et al.),
    the global batch being ``optim.batch_size`` × ``world`` processes.
    """
    base, total = cfg.optim.lr, cfg.train.epochs * steps_per_epoch
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
