"""Stop signals: SIGTERM and SIGINT end a run with its completed state saved.

:class:`StopSignals` catches them (deferred during a step or a save, at once in an interruptible
region); :class:`StopNow` cuts an interruptible region short; :class:`StopRequested` is what a
stopped run raises (``moco-train`` exits 128+N with its one line).
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
from pathlib import Path

from moco_engine.runtime import distributed as dist


class StopRequested(Exception):
    """Training stopped on SIGTERM or SIGINT with its completed state saved; ``signum`` says
    which, ``path`` is the checkpoint that holds the state (None: nothing was saved yet)."""

    def __init__(self, signum: int, step: int, path: Path | None, new: bool = True):
        self.signum, self.step, self.path = signum, step, path
        name = signal.Signals(signum).name
        if path is None:
            text = f"stopped by {name} during start-up, before any step: nothing to save"
        elif new:
            text = f"stopped by {name} after step {step}; saved checkpoint {path}; continue with train.resume=auto"
        else:
            text = f"stopped by {name} at step {step}, before any new step; checkpoint {path} holds the run"
        super().__init__(text)


class StopNow(BaseException):
    """Raised by a stop signal inside :meth:`StopSignals.interruptible` (evaluation, the memory
    bank's encoding, start-up): the work under way is dropped, the completed state is saved.
    A BaseException, so that no ``except Exception`` on the way swallows it."""


class StopSignals:
    """SIGTERM and SIGINT, caught so that the completed state is saved before the process ends.

    By default the first signal only sets :attr:`signum`: the step or the checkpoint write
    under way finishes, then the run saves and stops. Inside :meth:`interruptible` (work that
    changes no state: evaluation, encoding, start-up) the handler raises :class:`StopNow` at
    once in a single process; under torchrun it only records the signal, and the ranks agree
    to stop after the region (raising mid-collective would leave the others waiting). A second
    signal ends the process at once (exit 128+N); checkpoints already saved are intact.
    """

    def __init__(self) -> None:
        self.signum: int | None = None
        self.depth = 0  # nesting of interruptible regions
        self.installed = 0  # nesting of catching()

    def handler(self, signum: int, frame) -> None:
        if self.signum is not None:
            os._exit(128 + signum)
        self.signum = signum
        if dist.is_main():
            print(f"\n{signal.Signals(signum).name}: stopping and saving the completed state "
                  "(send it again to abort at once)", flush=True)
        if self.depth and not dist.is_distributed():
            raise StopNow()

    @contextlib.contextmanager
    def catching(self):
        """Install the handler (re-entrant; a no-op outside the main thread, where Python
        cannot install signal handlers)."""
        if self.installed or threading.current_thread() is not threading.main_thread():
            self.installed += 1
            try:
                yield
            finally:
                self.installed -= 1
            return
        previous = {s: signal.signal(s, self.handler) for s in (signal.SIGTERM, signal.SIGINT)}
        self.installed += 1
        try:
            yield
        finally:
            self.installed -= 1
            for s, h in previous.items():
                signal.signal(s, h)

    @contextlib.contextmanager
    def interruptible(self):
        """A region a stop signal may cut short (see the class): it must change no state that a
        checkpoint holds, or change it in one step at its end."""
        if self.signum is not None and not dist.is_distributed():
            raise StopNow()
        self.depth += 1
        try:
            yield
        finally:
            self.depth -= 1
