"""The run folder around a training run: its lock, the resume choice, the saved config, the
augmentation preview, the kNN curve, and the start of W&B (stop signals: ``signals.py``).

A run folder holds::

    config.yaml          the resolved config of the latest start
    checkpoints/         see checkpoint.py
    metrics.jsonl        every logged record (tracking.py)
    augmentations.png    the first query/key pairs, drawn as training draws them
    knn.png              kNN top-1 against epochs, redrawn after every evaluation
    .lock                held (fcntl) by the live run on rank 0; the OS releases it on death
"""

from __future__ import annotations

import fcntl
import os
import shutil
import socket
from collections.abc import Callable
from pathlib import Path
from typing import Any

from torch import Tensor

from moco_engine.config.loading import to_yaml
from moco_engine.config.schema import Config, TrainConfig, UserError, setting, valid_keys
from moco_engine.run import checkpoint as ckpt
from moco_engine.run.tracking import METRICS_FILE, Tracker, WandbBackend, knn_curve, wandb_mode
from moco_engine.runtime import distributed as dist

CONFIG_FILE = "config.yaml"
PREVIEW_FILE = "augmentations.png"
KNN_PLOT_FILE = "knn.png"
LOCK_FILE = ".lock"


def make_folder(run_dir: Path) -> None:
    """Create the run folder and prove it writable.

    Raises:
        UserError: it cannot be created or written (naming ``train.out_dir``).
    """
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        probe = run_dir / f".write_test.{os.getpid()}"  # one per process: ranks share the folder
        probe.write_text("")
        probe.unlink(missing_ok=True)
    except OSError as e:
        raise UserError(f"config key 'train.out_dir': cannot write to {run_dir}: {e.strerror}") from None


class RunLock:
    """One live run per folder: an exclusive ``fcntl`` lock on ``<run>/.lock``, which names its
    holder (pid and host). The OS drops it when the holder dies, so a crashed run never blocks
    its own resume. Used as a context manager."""

    def __init__(self, run_dir: Path):
        self.path = run_dir / LOCK_FILE
        self.file = None

    def __enter__(self) -> RunLock:
        self.file = open(self.path, "a+")
        try:
            fcntl.flock(self.file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            self.file.seek(0)
            holder = self.file.read().strip() or "another process"
            self.file.close()
            self.file = None
            raise UserError(f"{self.path.parent} is in use by a live run ({holder}); "
                            "wait for it to end or choose another train.out_dir") from None
        self.file.seek(0)
        self.file.truncate()
        self.file.write(f"pid {os.getpid()} on {socket.gethostname()}\n")
        self.file.flush()
        ckpt.remove_temporaries(self.path.parent)  # writes of a holder that died mid-save
        return self

    def __exit__(self, *exc) -> None:
        if self.file is not None:
            self.file.close()  # closing the descriptor releases the lock
            self.file = None


def choose_resume(cfg: TrainConfig, run_dir: Path, accept: Callable[[dict[str, Any]], str | None]
                  ) -> tuple[Path, dict[str, Any]] | None:
    """The checkpoint to continue from (``train.resume``), or None to start fresh; starting
    fresh in a folder with checkpoints needs ``train.overwrite`` (which deletes them).
    ``accept(state)`` says why a loaded state cannot be resumed (e.g. non-finite weights), or None.

    Raises:
        UserError: the folder holds a run and neither resume nor overwrite was asked for.
        CheckpointError: the named checkpoint cannot be used, or ``auto`` found files named
            like checkpoints of which none is usable (never a silent restart over them).
    """
    if cfg.resume == "auto":
        return ckpt.latest_checkpoint(run_dir, accept=accept)
    if cfg.resume:
        path = Path(cfg.resume).expanduser()
        state = ckpt.load_checkpoint(path)
        reason = accept(state)
        if reason is not None:
            raise ckpt.CheckpointError(f"config key 'train.resume': checkpoint {path} {reason}")
        return path, state
    if ckpt.checkpoint_files(run_dir):
        if not cfg.overwrite:
            raise UserError(
                f"{run_dir} already holds a run's checkpoints; pass train.resume=auto to continue it "
                "or train.overwrite=true to start over (deleting them)"
            )
        if dist.is_main():
            shutil.rmtree(run_dir / ckpt.CHECKPOINT_DIR)
            (run_dir / METRICS_FILE).unlink(missing_ok=True)
    return None


def agent_folder(cfg: TrainConfig) -> str | None:
    """Under ``wandb agent`` (WANDB_SWEEP_ID and WANDB_RUN_ID set) each run gets a folder of its
    own, ``<train.out_dir>/sweep-<sweep id>/<run id>``, and resumes it when the agent starts the
    run again; returns the line that says so (None when no agent started this run).

    Without this, every run of a sweep would share the recipe's ``train.out_dir``, and the
    second one would refuse a folder that holds a run.
    """
    sweep, run_id = os.environ.get("WANDB_SWEEP_ID"), os.environ.get("WANDB_RUN_ID")
    if not (sweep and run_id):
        return None
    cfg.out_dir = str(Path(cfg.out_dir).expanduser() / f"sweep-{sweep}" / run_id)
    cfg.resume = cfg.resume or "auto"
    return f"wandb agent: sweep {sweep}, run {run_id}; run folder {cfg.out_dir}"


def write_config(run_dir: Path, cfg: Config) -> None:
    """``config.yaml``: the resolved config, loadable as a YAML layer of ``moco-train``."""
    if dist.is_main():
        (run_dir / CONFIG_FILE).write_text(to_yaml(cfg))


def flat_settings(cfg: Config) -> dict[str, Any]:
    """Every setting under its dotted key (``queue.size``): the form a W&B sweep gives its
    parameters, so that a run under ``wandb agent`` has one form of each key, not two. The
    options of registered parts (``loss.params.lam``) are keys of their own too."""
    flat = {key: setting(cfg, key) for key in valid_keys()}
    for group in ("data", "model", "loss"):
        flat.update({f"{group}.params.{name}": value for name, value in setting(cfg, f"{group}.params").items()})
    return flat


def start_wandb(cfg: Config, run_dir: Path, run_id: str | None, tracker: Tracker) -> str | None:
    """Add the W&B backend on rank 0 when ``track.wandb.mode`` (or WANDB_MODE) asks for it;
    returns the W&B run id (``run_id`` continues that run: a resumed training keeps its W&B run)."""
    mode, notice = wandb_mode(cfg.track.wandb.mode)
    if mode == "disabled" or not dist.is_main():
        return run_id
    if notice:
        print(notice, flush=True)
    backend = WandbBackend(cfg.track.wandb, run_dir, flat_settings(cfg), run_id, mode)
    tracker.add_backend(backend)
    return backend.run_id


def save_preview(pairs: Tensor, run_dir: Path) -> Path:
    """``augmentations.png``: query/key pairs (2n, 3, S, S) in [0, 1], (query, key) of pair i
    at 2i and 2i + 1; 4 pairs a row, each labelled, with a gap between pairs (pixels drawn
    unsmoothed, so small images stay legible)."""
    from moco_engine.run.plots import preview_figure

    path = run_dir / PREVIEW_FILE
    preview_figure(pairs.detach().cpu().permute(0, 2, 3, 1).clamp(0, 1).numpy()).savefig(path)
    return path


def save_knn_plot(run_dir: Path) -> Path | None:
    """``knn.png``: the run's kNN top-1 against epochs, the random network's figure (epoch 0,
    ``eval.at_start``) as a dashed level; None before the first evaluation."""
    from moco_engine.run.plots import line_plot

    curve = knn_curve(run_dir / METRICS_FILE)
    title, label = f"kNN top-1 on the test split ({run_dir.name})", "kNN top-1 accuracy (%)"
    if not curve:  # a text run: retrieval on the monitor's qrels
        curve = knn_curve(run_dir / METRICS_FILE, "ndcg@10")
        title, label = f"retrieval on the monitor's qrels ({run_dir.name})", "nDCG@10"
    if not curve:  # image-text contrast: recall both ways on the monitor's split
        curve = knn_curve(run_dir / METRICS_FILE, "rsum")
        title, label = f"image-text recall on the monitor's split ({run_dir.name})", "rsum (six recalls, %)"
    trained = [(epoch, top1) for epoch, top1 in curve if epoch > 0]
    if not trained:
        return None
    start = [top1 for epoch, top1 in curve if epoch == 0]
    return line_plot({"this run": trained}, run_dir / KNN_PLOT_FILE, title, "epochs", label,
                     references={"random initialisation": start[-1]} if start else None)
