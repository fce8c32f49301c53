"""A run's start, before its first step: the checkpoint a resume continues from (read once), the
run folder and what goes into it, the tracker and W&B, the augmentation preview, and the line
that says the run has no monitor.

Each function takes what it uses and returns what it makes; the Trainer keeps the results.
Everything after :func:`resume_point` runs inside the Trainer's interruptible start-up region: a
stop signal ends it with nothing new to save.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from moco_engine.config.schema import Config, ConfigError
from moco_engine.data.loaders import Loaders, build_loaders
from moco_engine.data.sources import SavedStateMisfit
from moco_engine.method.init_from import init_backbone
from moco_engine.method.step import StepParts
from moco_engine.run import checkpoint as ckpt
from moco_engine.run import folder, snapshot
from moco_engine.run.progress import Progress
from moco_engine.run.tracking import Tracker
from moco_engine.runtime import distributed as dist


def resume_point(cfg: Config, run_dir: Path) -> tuple[Path, dict[str, Any]] | None:
    """The checkpoint a resume continues from, with its snapshot, read and verified once
    (``train.resume``: ``auto``, the folder's newest usable one; or a path); None: a fresh start.
    The data source opens with it (what the source kept of itself), then the run restores it.

    Raises:
        CheckpointError: the named checkpoint cannot be used, or ``auto`` found files named
            like checkpoints of which none is usable.
    """
    if not cfg.train.resume:
        return None
    return folder.choose_resume(cfg.train, run_dir, snapshot.unusable)


def open_data(cfg: Config, device: torch.device, rank: int, world: int, view: Callable | None,
              resumed: tuple[Path, dict[str, Any]] | None) -> Loaders:
    """This rank's loaders (``data/loaders.py``); on a resume the data source opens with the
    snapshot of :func:`resume_point` (what it kept of itself: a text run's vocabulary).

    Raises:
        CheckpointError: the source's kept state was made with other settings (named).
    """
    if resumed is None:
        return build_loaders(cfg, device, rank, world, view)
    path, state = resumed
    try:
        return build_loaders(cfg, device, rank, world, view, state)
    except SavedStateMisfit as e:
        raise ckpt.CheckpointError(f"checkpoint {path} {e}") from None


def open_folder(cfg: Config, run_dir: Path) -> None:
    """Create the run folder; a fresh start (no ``train.resume``) in a folder that holds a run is
    refused, or with ``train.overwrite`` clears it (``folder.choose_resume``)."""
    folder.make_folder(run_dir)
    if not cfg.train.resume:
        folder.choose_resume(cfg.train, run_dir, snapshot.unusable)


def write_run_files(cfg: Config, run_dir: Path, loaders: Loaders) -> None:
    """``config.yaml``, and the data source's state as a user reads it (also in every checkpoint)."""
    folder.write_config(run_dir, cfg)
    if dist.is_main():
        loaders.save_source(run_dir)


def say_resumed(path: Path, progress: Progress) -> None:
    """The line saying where a resumed run goes on."""
    if dist.is_main():
        print(f"resumed from {path} at epoch {progress.epoch}, step {progress.step}", flush=True)


def init_weights(init_from: str) -> tuple[str, dict[str, Any] | None]:
    """``model.init_from`` as the file to read and, for a run folder of this engine (or its
    ``checkpoints`` folder), that file's contents: the folder's newest verified checkpoint, read
    here (the method layer knows no run folders). A weights file is returned as named, unread.

    Raises:
        ConfigError: a folder without checkpoints, or none of them usable (each named).
    """
    path = Path(init_from).expanduser()
    if not path.is_dir():
        return init_from, None
    run = path.parent if path.name == ckpt.CHECKPOINT_DIR and not (path / ckpt.CHECKPOINT_DIR).is_dir() else path
    try:
        found = ckpt.latest_checkpoint(run)
    except ckpt.CheckpointError as e:
        raise ConfigError(f"config key 'model.init_from' = '{init_from}': {e}") from None
    if found is None:
        raise ConfigError(f"config key 'model.init_from' = '{init_from}': a folder without checkpoints "
                          f"(a weights file, or a run folder: its newest checkpoint in {run / ckpt.CHECKPOINT_DIR})")
    return str(found[0]), found[1]


def start_fresh(cfg: Config, parts: StepParts, encode: Callable[[], torch.Tensor]) -> None:
    """A fresh run's start: f_q's backbone from ``model.init_from`` (a weights file, or a run
    folder's newest checkpoint: :func:`init_weights`; every rank reads it; f_k's the same), then
    the negative source's (the memory bank's ``init=encode`` calls ``encode``, every training
    item's embedding)."""
    if cfg.model.init_from:  # a fresh run only: a resumed one holds its own weights
        line = init_backbone(parts.encoder_q.backbone, *init_weights(cfg.model.init_from))
        if parts.encoder_k is not None:  # f_k starts as a copy of f_q, as without the file
            parts.encoder_k.encoder.backbone.load_state_dict(parts.encoder_q.backbone.state_dict())
        if dist.is_main():
            print(line, file=sys.stderr, flush=True)
    parts.negatives.on_start(encode)


def open_tracking(cfg: Config, run_dir: Path, wandb_run_id: str | None, loaders: Loaders, step: int,
                  monitor: bool) -> tuple[Tracker, str | None]:
    """The tracker (metrics.jsonl, console, W&B: its run id, a resumed run's continued), a fresh
    run's augmentation preview, and the line saying the monitor is off when it is."""
    tracker = Tracker(run_dir, progress=cfg.track.progress, enabled=dist.is_main())
    wandb_run_id = folder.start_wandb(cfg, run_dir, wandb_run_id, tracker)
    if cfg.track.preview and step == 0 and dist.is_main() and loaders.images:
        pairs = loaders.preview(cfg.track.preview, cfg.train.seed)
        tracker.log_image("augmentations", folder.save_preview(pairs, run_dir), 0)
    if not monitor and (cfg.eval.at_start or cfg.eval.knn_every) and dist.is_main():
        what = {"retrieval": f"retrieval monitor off: no qrels/{cfg.eval.retrieval_split}.tsv",
                "pairs": f"image-text monitor off: data.name={cfg.data.name} has no split "
                         f"'{cfg.eval.retrieval_split}' to rank (eval.retrieval_split)"}.get(
            loaders.monitor, f"kNN monitor off: data.name={cfg.data.name} gives no labelled test split")
        print(what, flush=True)
    return tracker, wandb_run_id
