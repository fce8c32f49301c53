"""A run's start, before its first step: the folder (a resume from its checkpoint, or a fresh
start), the tracker and W&B, the augmentation preview, and the lines that say what the run lacks.

Everything here runs inside the Trainer's interruptible start-up region: a stop signal ends it
with nothing new to save.
"""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING

from moco_engine.data.loaders import preview_pairs
from moco_engine.method.init_from import init_backbone
from moco_engine.run import folder, snapshot
from moco_engine.run.tracking import Tracker
from moco_engine.runtime import distributed as dist

if TYPE_CHECKING:  # the Trainer calls these with itself
    from moco_engine.run.trainer import Trainer


def prepare_run_dir(trainer: Trainer) -> None:
    """Create the run folder; resume from it, or start fresh (refusing to clobber a run in it)."""
    cfg = trainer.cfg
    folder.make_folder(trainer.run_dir)
    resumed = folder.choose_resume(cfg.train, trainer.run_dir, snapshot.unusable)
    if resumed is not None:
        path, state = resumed
        trainer.load_state_dict(state, source=f"checkpoint {path}")
        trainer.saved = path
        trainer.loaders.items_at(trainer.epoch)
        if dist.is_main():
            print(f"resumed from {path} at epoch {trainer.epoch}, step {trainer.step}", flush=True)
    else:
        if cfg.model.init_from:  # a fresh run only: a resumed one holds its own weights
            load_backbone(trainer)
        trainer.negatives.on_start(trainer.encode_interruptibly)  # e.g. the memory bank's init=encode
    folder.write_config(trainer.run_dir, cfg)
    if dist.is_main():  # the source's state, also in every checkpoint
        trainer.loaders.save_source(trainer.run_dir)


def load_backbone(trainer: Trainer) -> None:
    """f_q's backbone from ``model.init_from`` (every rank reads the file), f_k's the same."""
    line = init_backbone(trainer.encoder_q.backbone, trainer.cfg.model.init_from)
    if trainer.encoder_k is not None:  # f_k starts as a copy of f_q, as without the file
        trainer.encoder_k.encoder.backbone.load_state_dict(trainer.encoder_q.backbone.state_dict())
    if dist.is_main():
        print(line, file=sys.stderr, flush=True)


def open_run(trainer: Trainer) -> None:
    """The folder, then the tracker (metrics.jsonl, console, W&B) and a fresh run's preview."""
    cfg = trainer.cfg
    prepare_run_dir(trainer)
    trainer.tracker = Tracker(trainer.run_dir, progress=cfg.track.progress, enabled=dist.is_main())
    trainer.wandb_run_id = folder.start_wandb(cfg, trainer.run_dir, trainer.wandb_run_id, trainer.tracker)
    if cfg.track.preview and trainer.step == 0 and dist.is_main() and trainer.loaders.images:
        pairs = preview_pairs(trainer.loaders, cfg.track.preview, cfg.train.seed)
        trainer.tracker.log_image("augmentations", folder.save_preview(pairs, trainer.run_dir), 0)
    if not trainer.cadence.monitor and (cfg.eval.at_start or cfg.eval.knn_every) and dist.is_main():
        what = (f"retrieval monitor off: no qrels/{cfg.eval.retrieval_split}.tsv" if trainer.loaders.text is not None
                else f"kNN monitor off: data.name={cfg.data.name} gives no labelled test split")
        print(what, flush=True)
