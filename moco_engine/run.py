"""The run folder and the process around a training run: lock, resume choice, saved config,
the augmentation preview, W&B, and stop signals.

A run folder holds::

    config.yaml          the resolved config of the latest start
    checkpoints/         see checkpoint.py
    metrics.jsonl        every logged record (tracking.py)
    augmentations.png    the first query/key pairs, drawn as training draws them
    .lock                held (fcntl) by the live run on rank 0; the OS releases it on death
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
import signal
import socket
import threading
from pathlib import Path
from typing import Any

from torch import Tensor

from . import checkpoint as ckpt
from . import distributed as dist
from .config import Config, TrainConfig, UserError, to_dict, to_yaml
from .tracking import METRICS_FILE, Tracker, WandbBackend, wandb_mode

CONFIG_FILE = "config.yaml"
PREVIEW_FILE = "augmentations.png"
LOCK_FILE = ".lock"


class StopRequested(Exception):
    """Training stopped on SIGTERM or SIGINT after saving a checkpoint; ``signum`` says which."""

    def __init__(self, signum: int, step: int, path: Path | None):
        self.signum, self.step, self.path = signum, step, path
        name = signal.Signals(signum).name
        where = f"checkpoint {path}" if path else "the checkpoint of rank 0"
        super().__init__(f"stopped by {name} after step {step}; {where}; continue with train.resume=auto")


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
        return self

    def __exit__(self, *exc) -> None:
        if self.file is not None:
            self.file.close()  # closing the descriptor releases the lock
            self.file = None


def choose_resume(cfg: TrainConfig, run_dir: Path) -> tuple[Path, dict[str, Any]] | None:
    """The checkpoint to continue from (``train.resume``), or None to start fresh; starting
    fresh in a folder with checkpoints needs ``train.overwrite`` (which deletes them).

    Raises:
        UserError: the folder holds a run and neither resume nor overwrite was asked for.
        CheckpointError: the named checkpoint cannot be read.
    """
    if cfg.resume == "auto":
        return ckpt.latest_checkpoint(run_dir)
    if cfg.resume:
        path = Path(cfg.resume).expanduser()
        return path, ckpt.load_checkpoint(path)
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


def write_config(run_dir: Path, cfg: Config) -> None:
    """``config.yaml``: the resolved config, loadable as a YAML layer of ``moco-train``."""
    if dist.is_main():
        (run_dir / CONFIG_FILE).write_text(to_yaml(cfg))


def start_wandb(cfg: Config, run_dir: Path, run_id: str | None, tracker: Tracker) -> str | None:
    """Add the W&B backend on rank 0 when ``track.wandb.mode`` (or WANDB_MODE) asks for it;
    returns the W&B run id (``run_id`` continues that run: a resumed training keeps its W&B run)."""
    mode, notice = wandb_mode(cfg.track.wandb.mode)
    if mode == "disabled" or not dist.is_main():
        return run_id
    if notice:
        print(notice, flush=True)
    backend = WandbBackend(cfg.track.wandb, run_dir, to_dict(cfg), run_id, mode)
    tracker.add_backend(backend)
    return backend.run_id


def save_preview(pairs: Tensor, run_dir: Path) -> Path:
    """``augmentations.png``: query/key pairs (2n, 3, S, S) in [0, 1] side by side, 4 pairs a
    row (small images enlarged 4x with nearest-neighbour, so the pixels stay visible)."""
    import torch.nn.functional as F
    from torchvision.utils import make_grid, save_image

    if pairs.shape[-1] < 96:
        pairs = F.interpolate(pairs, scale_factor=4, mode="nearest")
    path = run_dir / PREVIEW_FILE
    save_image(make_grid(pairs, nrow=8, padding=4, pad_value=1.0), path)
    return path


class StopSignals:
    """While active, the first SIGTERM/SIGINT only sets :attr:`signum` (the loop finishes its
    step, saves and stops); a second one aborts at once (saved checkpoints are intact)."""

    def __init__(self) -> None:
        self.signum: int | None = None

    def handler(self, signum: int, frame) -> None:
        if self.signum is not None:
            os._exit(128 + signum)
        self.signum = signum
        if dist.is_main():
            print(f"\n{signal.Signals(signum).name}: finishing the step and saving a checkpoint "
                  "(send it again to abort at once)", flush=True)

    @contextlib.contextmanager
    def catching(self):
        if threading.current_thread() is not threading.main_thread():
            yield  # signal handlers can only be installed from the main thread
            return
        previous = {s: signal.signal(s, self.handler) for s in (signal.SIGTERM, signal.SIGINT)}
        try:
            yield
        finally:
            for s, h in previous.items():
                signal.signal(s, h)
