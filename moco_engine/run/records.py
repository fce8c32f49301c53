"""The records a run writes besides its epochs: a log window's (the steps' mean metrics with the
schedules' values, throughput, memory and the encoders' distance, after the non-finite and
collapse checks) and an evaluation's (with the run's best, the figure a sweep ranks by).

Each function takes what it reads; what changes of the run's own state it returns, for the
Trainer to keep (the run's best).
"""

from __future__ import annotations

from pathlib import Path

from moco_engine.method.schedules import momentum_at
from moco_engine.method.step import StepParts
from moco_engine.run import folder
from moco_engine.run.progress import Progress
from moco_engine.run.tracking import Tracker
from moco_engine.run.watch import Watch
from moco_engine.runtime import distributed as dist
from moco_engine.runtime.precision import peak_memory_gib


def log_window(tracker: Tracker, watch: Watch, parts: StepParts, progress: Progress, total_steps: int, images: bool,
               means: dict[str, float], samples: int, elapsed: float) -> None:
    """Log the mean metrics of the steps since the last log point (fetched in the interval's one
    host sync), with the schedules' values, throughput and memory (``images``: also as
    ``img_per_s``)."""
    cfg, step = watch.cfg, progress.step
    watch.check_loss(means["loss"], step)
    means["lr"] = parts.optimizer.param_groups[0]["lr"]
    means["momentum"] = momentum_at(cfg.model.momentum, cfg.model.momentum_schedule, step - 1 + parts.ema_ahead,
                                    total_steps)
    means["samples_per_s"] = samples * dist.world_size() / max(elapsed, 1e-9)
    if images:
        means["img_per_s"] = means["samples_per_s"]
    if parts.encoder_k is not None:
        means["qk_weight_dist"] = parts.encoder_k.relative_distance(parts.encoder_q).item()
    means["mem_peak_gib"] = peak_memory_gib(parts.device)
    collapsing = watch.collapse(means["embed_std"], progress.epoch, step)
    if collapsing:
        tracker.warn(collapsing)
    tracker.log("step", means, progress.epoch, step)


def epoch_record(means: dict[str, float], epoch_s: float, hook_s: float, negatives_bytes: int,
                 compiles: dict[str, int]) -> dict[str, float]:
    """An epoch's record: its steps' ``means``, its time, the negatives' memory, its
    recompilations, and the epoch-end hook's cost (``hook_s``: the memory bank's refresh) in
    seconds and in % of the epoch when there was one."""
    out = {**means, "epoch_s": epoch_s, "negatives_bytes": negatives_bytes, **compiles}
    if hook_s > 1e-3:
        out.update(refresh_s=hook_s, refresh_pct=100 * hook_s / (epoch_s + hook_s))
    return out


def log_eval(tracker: Tracker, run_dir: Path, result: dict[str, float], epoch: int, step: int,
             best: dict[str, float]) -> dict[str, float]:
    """Log the monitor's ``result`` under ``epoch`` (-1: before training) and redraw the curve;
    returns the run's best figures with it (``best``: those so far)."""
    tracker.log("eval", result, epoch, step)
    # The run summary a sweep ranks by: the best over every segment of the run (W&B's own max
    # would cover only the segment since the last resume), of the trained network: the random
    # one's (epoch -1) is the baseline, not a result.
    if epoch >= 0:
        best = {k: max(v, best.get(k, v)) for k, v in result.items()}
        tracker.summarize({f"eval/{k}": v for k, v in best.items()})
    if dist.is_main():
        folder.save_knn_plot(run_dir)
    return best
