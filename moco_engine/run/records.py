"""The records a run writes besides its epochs: a log window's (the steps' mean metrics with the
schedules' values, throughput, memory and the encoders' distance, after the non-finite and
collapse checks) and an evaluation's (with the run's best, the figure a sweep ranks by).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from moco_engine.method.schedules import momentum_at
from moco_engine.run import folder
from moco_engine.runtime import distributed as dist
from moco_engine.runtime.precision import peak_memory_gib

if TYPE_CHECKING:  # the Trainer calls these with itself
    from moco_engine.run.trainer import Trainer


def log_window(trainer: Trainer, means: dict[str, float], samples: int, elapsed: float) -> None:
    """Log the mean metrics of the steps since the last log point (fetched in the interval's one
    host sync), with the schedules' values, throughput and memory."""
    cfg, step = trainer.cfg, trainer.step
    trainer.watch.check_loss(means["loss"], step)
    means["lr"] = trainer.optimizer.param_groups[0]["lr"]
    means["momentum"] = momentum_at(cfg.model.momentum, cfg.model.momentum_schedule,
                                    step - 1 + trainer.parts.ema_ahead, trainer.total_steps)
    means["samples_per_s"] = samples * trainer.world / max(elapsed, 1e-9)
    if trainer.loaders.images:
        means["img_per_s"] = means["samples_per_s"]
    if trainer.encoder_k is not None:
        means["qk_weight_dist"] = trainer.encoder_k.relative_distance(trainer.encoder_q).item()
    means["mem_peak_gib"] = peak_memory_gib(trainer.device)
    collapsing = trainer.watch.collapse(means["embed_std"], trainer.epoch, step)
    if collapsing:
        trainer.tracker.warn(collapsing)
    trainer.tracker.log("step", means, trainer.epoch, step)


def log_eval(trainer: Trainer, result: dict[str, float], epoch: int) -> None:
    """Log the monitor's ``result`` under ``epoch`` (-1: before training), keep the run's best
    and redraw the curve."""
    trainer.tracker.log("eval", result, epoch, trainer.step)
    # The run summary a sweep ranks by: the best over every segment of the run (W&B's own max
    # would cover only the segment since the last resume), of the trained network: the random
    # one's (epoch -1) is the baseline, not a result.
    if epoch >= 0:
        trainer.best_eval = {k: max(v, trainer.best_eval.get(k, v)) for k, v in result.items()}
        trainer.tracker.summarize({f"eval/{k}": v for k, v in trainer.best_eval.items()})
    if dist.is_main():
        folder.save_knn_plot(trainer.run_dir)
