"""The run's state as a checkpoint holds it: taking it, checking it, putting it back.

A snapshot (format 2) is tensors and plain containers only::

    config                    the resolved config (to_dict)
    input_shape               one input's shape, as the backbone was built for (moco-eval rebuilds it)
    (the source's state)      the data source's own keys (``data/sources.py``, ``DataSource.state``):
                              a resume and moco-eval read the data with them
    plan                      {"steps", "steps_per_epoch", "world"}: the run's length as its data gave it
    epoch, step, step_in_epoch, last_eval, best_eval, wandb_run_id, nonfinite_skips, eval_pending
    encoder_q, encoder_k, predictor, negatives      model sections (None where the run has none);
                                                    BatchNorm statistics: the ranks' mean
    optimizer, scaler         their state_dicts
    ranks                     per rank: {"rng": random states, "buffers": its own statistics}

Taking one is a collective under torchrun (every rank calls :func:`take`; rank 0 writes it).
"""

from __future__ import annotations

import random
from collections.abc import Callable
from typing import Any

import torch

from moco_engine.config.loading import to_dict
from moco_engine.config.schema import Config, ConfigError
from moco_engine.method.schedules import Plan
from moco_engine.method.step import (
    MODEL_SECTIONS,
    StepParts,
    load_model_state,
    model_state,
    statistics,
)
from moco_engine.run import checkpoint as ckpt
from moco_engine.runtime import distributed as dist
from moco_engine.runtime.precision import rng_state, set_rng_state

FORMAT = 2
#: The snapshot's own entries besides the counters and the model sections (no source state may take them).
RESERVED = ("format", "config", "input_shape", "plan", "optimizer", "scaler", "ranks")
# Tensors whose NaN is a sentinel, not a fault: NCE's log Z before its first estimate.
NAN_SENTINELS = ("negatives.log_z",)


def take(parts: StepParts, cfg: Config, device: torch.device, progress: dict[str, Any],
         source_state: dict[str, Any] | None = None, plan: Plan | None = None) -> dict[str, Any]:
    """Everything needed to continue the run exactly, with the run's ``progress`` (its
    counters: ``progress.Progress.state_dict``), the data source's ``source_state`` and the
    run's ``plan``."""
    with dist.rank_mean_buffers(parts.encoder_q, parts.encoder_k, parts.predictor):
        model = model_state(parts)
    own = {"rng": rng_state(device), "buffers": {name: b.detach().cpu().clone() for name, b in statistics(parts)}}
    clash = sorted(set(source_state or {}) & {*RESERVED, *progress, *model})
    if clash:  # a source's entries sit beside the run's: none may take a run's name
        raise ConfigError(f"config key 'data.name' = {cfg.data.name!r}: the source's state names {', '.join(clash)}, "
                          "entries of the run's own snapshot; give them names of their own")
    return {
        "format": FORMAT,
        "config": to_dict(cfg),
        "input_shape": parts.input_shape,
        **(source_state or {}),
        "plan": None if plan is None else {"steps": plan.steps, "steps_per_epoch": plan.steps_per_epoch,
                                           "world": dist.world_size()},
        **progress,
        **model,
        "optimizer": parts.optimizer.state_dict(),
        "scaler": parts.scaler.state_dict(),
        "ranks": dist.all_gather_objects(own),
    }


def unusable(state: dict[str, Any]) -> str | None:
    """Why a snapshot cannot be trained on (its non-finite tensors, named), or None."""
    bad = ckpt.nonfinite_tensors({k: state.get(k) for k in (*MODEL_SECTIONS, "optimizer")}, allow_nan=NAN_SENTINELS)
    return f"holds non-finite values ({', '.join(bad[:3])}{' ...' if len(bad) > 3 else ''})" if bad else None


def restore(parts: StepParts, state: dict[str, Any], cfg: Config, device: torch.device, source: str,
            source_misfit: Callable[[dict[str, Any]], str | None] | None = None,
            plan: Plan | None = None) -> None:
    """Load a snapshot into ``parts`` and this rank's random streams (its counters are the
    run's ``Progress``'s to read).

    Raises:
        CheckpointError: its tensors (every name and shape of the model and the negatives) do
            not fit this run, the settings that differ named; the data source's
            ``source_misfit`` finds its state unfit (what for, in its words); on as many
            processes, this run's data give epochs of another length than the ``plan`` saved; or
            it stopped mid-epoch on another number of processes.
    """
    misfit = source_misfit(state) if source_misfit is not None else None
    if misfit:
        raise ckpt.CheckpointError(f"{source} {misfit}")
    saved = state.get("plan")  # absent from checkpoints before train.steps
    if (saved and plan is not None and saved["world"] == dist.world_size()
            and saved["steps_per_epoch"] != plan.steps_per_epoch):
        # Where the epoch's remaining items start and where the schedules are would both move.
        raise ckpt.CheckpointError(f"{source} was written with {saved['steps_per_epoch']} steps an epoch, and this "
                                   f"run gives {plan.steps_per_epoch} (its data, optim.batch_size or train.steps_per_epoch changed)")
    problems = ckpt.misfits(state, model_state(parts), MODEL_SECTIONS)
    if problems:
        settings = ckpt.differing_settings(state["config"], to_dict(cfg))
        more = f" and {len(problems) - 1} more" if len(problems) > 1 else ""
        raise ckpt.CheckpointError(f"{source} is incompatible with this config: {'; '.join(settings) or 'the model differs'} "
                                   f"({problems[0]}{more})")
    written_by = len(state.get("ranks") or [None])
    if written_by != dist.world_size() and state.get("step_in_epoch", 0):
        # The sampler deals an epoch's items out by rank: on another number of ranks the rest of
        # this epoch would be dealt anew, repeating some items and skipping others.
        raise ckpt.CheckpointError(f"{source} stopped mid-epoch (after step {state['step_in_epoch']} of its epoch) on "
                                   f"{written_by} process(es); on {dist.world_size()} the epoch's remaining items would be "
                                   f"dealt out anew, some twice and some never: resume it on {written_by}, or from a "
                                   f"checkpoint at an epoch's end")
    load_model_state(parts, state)
    restore_own(parts, state.get("ranks") or [{"rng": state["rng"]}], cfg, device, state.get("step", 0), source)  # format 1: one process's


def restore_own(parts: StepParts, ranks: list[dict[str, Any]], cfg: Config, device: torch.device, step: int,
                source: str) -> None:
    """This rank's statistics and random streams from a snapshot of ``len(ranks)`` ranks. On
    another number of ranks the streams are reseeded and the statistics stay the mean."""
    rank, world = dist.rank(), dist.world_size()
    if len(ranks) == world:
        mine = ranks[rank]
        saved = mine.get("buffers", {})  # format 1 has none: the model sections' are its own
        with torch.no_grad():
            for name, b in statistics(parts):
                if name in saved:
                    b.copy_(saved[name])
        set_rng_state(mine["rng"], device)
        return
    # One seed per (step, rank) pair for any world under 7919 (a prime), so no two ranks and
    # no two resumes share a stream.
    reseed = cfg.train.seed + 7919 * step + rank
    torch.manual_seed(reseed)
    random.seed(reseed)
    if dist.is_main():
        print(f"{source} was written by {len(ranks)} process(es), resumed on {world}: every rank starts "
              "its random streams anew from (train.seed, step, rank) and the BatchNorm statistics from their "
              "saved mean; the run goes on, not bit-identical to an uninterrupted one", flush=True)
