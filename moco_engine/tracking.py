"""Metrics out: a JSONL file in the run folder, the console, and (later) W&B.

Only the main process (rank 0) writes anything. A backend is any object with ``log(record)``
and ``close()``; :class:`Tracker` fans every record out to all of them, so a new destination
(W&B) is one more backend, not a change to the training loop.

Every record is one flat JSON object with ``kind`` (``step``, ``epoch``, ``eval`` or ``final``),
``epoch`` and ``step`` and the metrics, e.g.::

    {"kind": "step", "epoch": 0, "step": 20, "loss": 7.91, "top1": 12.5, "lr": 0.06, ...}
"""

from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path
from typing import Any, Protocol

from tqdm import tqdm

METRICS_FILE = "metrics.jsonl"


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
    """Prints epoch summaries, evaluations and the final result (step records go to the bar)."""

    def log(self, record: dict[str, Any]) -> None:
        kind = record.get("kind")
        if kind == "step":
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


class Tracker:
    """Fans records out to the backends and drives the progress bar (main process only)."""

    def __init__(self, run_dir: Path | None, progress: bool = True, enabled: bool = True):
        self.enabled = enabled
        self.show_progress = progress and enabled
        self.backends: list[Backend] = []
        if enabled and run_dir is not None:
            self.backends.append(JsonlBackend(Path(run_dir) / METRICS_FILE))
        if enabled:
            self.backends.append(ConsoleBackend())
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
            shown = ("loss", "top1", "lr", "img_per_s")
            self.bar.set_postfix({k: _fmt(metrics[k]) for k in shown if k in metrics}, refresh=False)

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
