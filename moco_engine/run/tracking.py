"""Metrics out: a JSONL file in the run folder, the console, and W&B.

Only the main process (rank 0) writes anything. A backend is any object with ``log(record)``
and ``close()`` (optionally ``log_image`` and ``log_artifact``); :class:`Tracker` fans every
record out to all of them, so a new destination is one more backend, not a change to the
training loop.

Every record is one flat JSON object with ``kind`` (``step``, ``epoch``, ``eval`` or ``final``),
``epoch`` and ``step`` and the metrics, e.g.::

    {"kind": "step", "epoch": 0, "step": 20, "loss": 7.91, "top1": 12.5, "lr": 0.06, ...}
"""

from __future__ import annotations

import json
import math
import netrc
import os
import sys
import time
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import Tensor
from tqdm import tqdm

from moco_engine.runtime import distributed as dist

METRICS_FILE = "metrics.jsonl"


def read_metrics(metrics: Path, kind: str | None = None) -> list[dict[str, Any]]:
    """Every whole record of a ``metrics.jsonl`` (of ``kind`` only, if given), every segment of
    a resumed run in order; none for a missing file. A line cut short by a crash or a kill (the
    last one) is left out: what was written before it stands. The one reader of the file."""
    out = []
    path = Path(metrics)
    for line in path.read_text(encoding="utf-8").splitlines() if path.is_file() else []:
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(record, dict) and (kind is None or record.get("kind") == kind):
            out.append(record)
    return out


def knn_curve(metrics: Path, key: str = "knn_top1") -> list[tuple[int, float]]:
    """The monitor's ``key`` (kNN top-1 %; a text run's "ndcg@10") by epochs completed (0: the
    random network, ``eval.at_start``), from the ``eval`` records of a run's ``metrics.jsonl``;
    a resumed run's segments in order."""
    return [(r["epoch"] + 1, r[key]) for r in read_metrics(metrics, "eval") if r.get(key) is not None]


class DeviceMeans:
    """Running sums of per-step metrics (0-d tensors) kept on the device, so the steps never
    wait for the host; :meth:`means` fetches them in one host sync."""

    def __init__(self) -> None:
        self.sums: dict[str, Tensor] = {}
        self.count = 0

    def add(self, metrics: dict[str, Tensor]) -> None:
        for name, value in metrics.items():
            self.sums[name] = self.sums.get(name, 0) + value
        self.count += 1

    def means(self) -> dict[str, float]:
        """Per-step means, averaged over the ranks (a collective under torchrun: every rank
        calls it at the same steps)."""
        if not self.count:
            return {}
        stacked = torch.stack([torch.as_tensor(v, dtype=torch.float32) for v in self.sums.values()])
        values = dist.all_reduce_mean(stacked).tolist()
        return {name: value / self.count for name, value in zip(self.sums, values)}


class Meter:
    """The step metrics of a log window and of an epoch: their means on the device (one host
    sync a window), and the samples and seconds of the window and of the epoch."""

    def __init__(self) -> None:
        self.epoch, self.epoch_start = DeviceMeans(), time.perf_counter()
        self.new_window()

    def new_window(self) -> None:
        self.window, self.samples, self.window_start = DeviceMeans(), 0, time.perf_counter()

    def add(self, metrics: dict[str, Tensor] | None, samples: int) -> None:
        """A step's metrics (None: a skipped step, whose samples still count) and its batch size."""
        self.samples += samples
        if metrics is not None:
            self.window.add(metrics)
            self.epoch.add(metrics)

    def take_window(self) -> tuple[dict[str, float], int, float] | None:
        """(means, samples, seconds) of the window so far, and a new window; None if it holds no step."""
        if not self.window.count:
            return None
        taken = (self.window.means(), self.samples, time.perf_counter() - self.window_start)
        self.new_window()
        return taken

    def epoch_seconds(self) -> float:
        return time.perf_counter() - self.epoch_start


class Backend(Protocol):
    def log(self, record: dict[str, Any]) -> None: ...

    def close(self) -> None: ...


class JsonlBackend:
    """Appends each record as one line of ``metrics.jsonl`` (flushed, so a crash loses nothing)."""

    def __init__(self, path: Path):
        self.file = open(path, "a", encoding="utf-8")

    def log(self, record: dict[str, Any]) -> None:
        clean = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in record.items()}
        self.file.write(json.dumps(clean) + "\n")
        self.file.flush()

    def close(self) -> None:
        self.file.close()


class ConsoleBackend:
    """Prints epoch summaries, evaluations and the final result; step records too when
    ``step_lines`` (a log file, where a progress bar would be carriage-return frames)."""

    STEP_KEYS = ("loss", "top1", "lr", "samples_per_s")  # the step record's figures on one line
    QUIET = ("first_step",)  # records whose line their writer prints in words (run/warmup.py)

    def __init__(self, step_lines: bool = False):
        self.step_lines = step_lines

    def log(self, record: dict[str, Any]) -> None:
        kind = record.get("kind")
        if kind == "step":
            if self.step_lines:
                body = "  ".join(f"{k} {_fmt(record[k])}" for k in self.STEP_KEYS if k in record)
                tqdm.write(f"[step] epoch {record['epoch'] + 1}  step {record['step']}  {body}", file=sys.stdout)
            return
        if kind in self.QUIET:
            return
        skip = {"kind", "step", "time"}
        body = "  ".join(f"{k} {_fmt(v)}" for k, v in record.items() if k not in skip)
        tqdm.write(f"[{kind}] {body}", file=sys.stdout)

    def close(self) -> None:
        pass


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


WANDB_ENV_MODES = {"online": "online", "run": "online", "offline": "offline", "dryrun": "offline", "disabled": "disabled"}


def _has_wandb_key() -> bool:
    """An API key in WANDB_API_KEY or in the netrc file wandb itself reads (``$NETRC``, else
    ~/.netrc, where ``wandb login`` puts it), found by wandb's own lookup where it has one."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    url = os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")
    try:
        from wandb.sdk.lib.wbauth import read_netrc_auth  # wandb >= 0.22: NETRC, ~/.netrc, ~/_netrc
    except ImportError:  # an older wandb: the same rule by hand
        host = url.split("://")[-1].split("/")[0]
        try:
            return netrc.netrc(os.environ.get("NETRC") or None).authenticators(host) is not None
        except (OSError, netrc.NetrcParseError):
            return False
    try:
        return read_netrc_auth(host=url) is not None
    except Exception:  # a malformed entry: wandb.init would refuse it too; log offline
        return False


def wandb_mode(configured: str) -> tuple[str, str | None]:
    """The W&B mode to use, and a one-line notice when it differs from what was asked.

    wandb's own precedence: a mode set in the config (``track.wandb.mode``, as
    ``wandb.init(mode=...)``) wins; left unset (``""``) the WANDB_MODE environment variable
    decides, and without it the run is not logged, except one started by ``wandb agent``
    (WANDB_SWEEP_ID set), which logs online: the sweep needs its metrics. ``online`` without an
    API key falls back to ``offline`` (``wandb sync`` uploads the run later).

    Raises:
        UserError: WANDB_MODE holds a value that is no W&B mode.
    """
    env = os.environ.get("WANDB_MODE", "").strip().lower()
    if env and env not in WANDB_ENV_MODES:
        from moco_engine.config.schema import UserError

        raise UserError(f"environment variable WANDB_MODE={env!r} is not a W&B mode ({', '.join(WANDB_ENV_MODES)})")
    if configured:
        mode = configured
    elif env:
        mode = WANDB_ENV_MODES[env]
    else:
        mode = "online" if os.environ.get("WANDB_SWEEP_ID") else "disabled"
    if mode == "online" and not _has_wandb_key():
        return "offline", "W&B: no API key (WANDB_API_KEY or `wandb login`); logging offline, `wandb sync` uploads later"
    return mode, None


class WandbBackend:
    """Logs every record to one W&B run, under ``<kind>/<metric>`` (``step/loss``,
    ``eval/knn_top1``, ...) at the record's global step.

    ``run_id`` (stored in the checkpoint) makes a resumed training continue the same W&B run.
    wandb is imported here, so it costs nothing when W&B is off.
    """

    def __init__(self, cfg, run_dir: Path, config: dict[str, Any], run_id: str | None = None, mode: str = "offline"):
        import wandb

        self.wandb = wandb
        self.log_checkpoints = cfg.log_checkpoints
        self.run = wandb.init(
            project=cfg.project, entity=cfg.entity or None, group=cfg.group or None, tags=list(cfg.tags) or None,
            name=cfg.name or Path(run_dir).name, config=config, dir=str(run_dir), mode=mode,
            id=run_id, resume="allow" if run_id else None,
        )
        # The eval figures' summary is set by `summarize` alone (the best over every segment of
        # the run): left to wandb, each committed history row would overwrite it with its last value.
        self.run.define_metric("eval/*", summary="none")

    @property
    def run_id(self) -> str:
        return self.run.id

    def log(self, record: dict[str, Any]) -> None:
        kind = record["kind"]
        data = {f"{kind}/{k}": v for k, v in record.items() if k not in ("kind", "step") and isinstance(v, (int, float))}
        self.run.log(data, step=int(record["step"]))

    def log_image(self, name: str, path: Path, step: int) -> None:
        self.run.log({name: self.wandb.Image(str(path))}, step=step)

    def summarize(self, values: dict[str, float]) -> None:
        self.run.summary.update(values)

    def log_artifact(self, path: Path) -> None:
        if self.log_checkpoints:
            artifact = self.wandb.Artifact(f"checkpoints-{self.run.id}", type="model")
            artifact.add_file(str(path))
            self.run.log_artifact(artifact)

    def close(self) -> None:
        self.run.finish()


class Tracker:
    """Fans records out to the backends and drives the progress bar (main process only)."""

    def __init__(self, run_dir: Path | None, progress: bool = True, enabled: bool = True):
        self.enabled = enabled
        self.backends: list[Backend] = []
        if enabled and run_dir is not None:
            self.backends.append(JsonlBackend(Path(run_dir) / METRICS_FILE))
        # A progress bar only on a terminal; in a log file one plain line per logged step instead.
        interactive = sys.stdout.isatty()
        self.show_progress = progress and enabled and interactive
        if enabled:
            self.backends.append(ConsoleBackend(step_lines=progress and not interactive))
        self.bar: tqdm | None = None
        self.start = time.time()

    def add_backend(self, backend: Backend) -> None:
        if self.enabled:
            self.backends.append(backend)

    def log(self, kind: str, metrics: dict[str, Any], epoch: int, step: int) -> None:
        if not self.enabled:
            return
        record = {"kind": kind, "epoch": epoch, "step": step, "time": round(time.time() - self.start, 3), **metrics}
        for backend in self.backends:
            backend.log(record)
        if kind == "step" and self.bar is not None:
            # Refreshed now: the bar moved before this step's figures arrived, so without a
            # refresh it would show them only at the next step, beside the next step's count.
            self.bar.set_postfix({k: _fmt(metrics[k]) for k in ConsoleBackend.STEP_KEYS if k in metrics})

    def log_image(self, name: str, path: Path, step: int) -> None:
        """An image file (already written to the run folder) to the backends that show images."""
        for backend in self.backends:
            if hasattr(backend, "log_image"):
                backend.log_image(name, path, step)

    def summarize(self, values: dict[str, float]) -> None:
        """Set the run summary's values (what a W&B sweep ranks runs by) in the backends that keep one."""
        for backend in self.backends:
            if hasattr(backend, "summarize"):
                backend.summarize(values)

    def log_artifact(self, path: Path) -> None:
        for backend in self.backends:
            if hasattr(backend, "log_artifact"):
                backend.log_artifact(path)

    def warn(self, message: str) -> None:
        """One line on the console, above the progress bar."""
        if self.enabled:
            tqdm.write(f"warning: {message}", file=sys.stderr)

    def start_epoch(self, epoch: int, epochs: int, total_steps: int, done: int = 0) -> None:
        if self.show_progress:
            self.bar = tqdm(total=total_steps, initial=done, desc=f"epoch {epoch + 1}/{epochs}", file=sys.stdout,
                            dynamic_ncols=True, leave=True)

    def advance(self, steps: int = 1) -> None:
        if self.bar is not None:
            self.bar.update(steps)

    def end_epoch(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None

    def close(self) -> None:
        self.end_epoch()
        for backend in self.backends:
            backend.close()
        self.backends = []
