"""The way to a run's first optimizer step, timed, and a compiled run's compilation kept out of it.

A compiled run (``train.compile``, ``train.cuda_graphs``) compiles on the first call of each
compiled pass: the device pipeline's views when the first batch is made, f_q's forward and
backward and f_k's forward in the first step. On a GPU that is minutes of Triton code
generation, and inside a step a stop signal has to wait for the step to end. So
:class:`Warmup` makes the first batch in an interruptible region and then runs each compiled
pass once on it (:meth:`Warmup.compile`), also interruptible, with every state the passes touch
(BatchNorm statistics, gradients, random states) put back after them: a SIGTERM during
compilation stops the run at once, with nothing to lose, and the first step itself runs code
already compiled.

It prints one line when the first step has ended, so a run shows where its start-up went::

    first step after 85.2 s (compiling 57.1 s of it: f_q 38.2 s, f_k 8.1 s, views 6.0 s, other 4.8 s)

and counts the frames compiled since the last epoch record (``compiles`` in each epoch's
record): none after epoch 0 means no recompilation at evaluations, saves or the epoch's end.
"""

from __future__ import annotations

import contextlib
import time
from typing import Any

import torch

from moco_engine.method.step import StepParts, begin
from moco_engine.run.signals import StopSignals
from moco_engine.runtime import distributed as dist
from moco_engine.runtime.compiling import compile_seconds, frames_compiled
from moco_engine.runtime.precision import autocast, own_rng


class Warmup:
    """The first step of this process, and the compilations of the run.

    Args:
        launched: ``time.perf_counter()`` when the command started (the line's origin).
        compiled: the run compiles (``train.compile`` or ``train.cuda_graphs``).
        signals: the run's stop signals (the first batch and the compilation are interruptible).
        device: the training device (its work is waited for before the first step's time is read).
    """

    def __init__(self, launched: float, compiled: bool, signals: StopSignals, device: torch.device):
        self.launched, self.compiled, self.signals, self.device = launched, compiled, signals, device
        self.pending = True  # the first step of this process is still to come
        self.compile_s: dict[str, float] = {}  # compiled pass -> seconds
        self.frames = frames_compiled()  # at the last epoch record

    @contextlib.contextmanager
    def timing(self, name: str):
        """Count the compilation that happens inside as ``name``'s."""
        before = compile_seconds()
        try:
            yield
        finally:
            self.compile_s[name] = self.compile_s.get(name, 0.0) + compile_seconds() - before

    def first_batch(self, batches) -> Any:
        """``next(batches)``; for this process's first batch, interruptibly (a compiled device
        pipeline compiles its views there) and with its compilation timed."""
        if not self.pending:
            return next(batches)
        with self.signals.interruptible(), self.timing("views"):
            return next(batches)

    def compile(self, parts: StepParts, x_q: Any, x_k: Any) -> None:
        """Before the first step of a compiled run: compile f_q's forward and backward and f_k's
        forward on the first batch's views, interruptibly, and leave every state as it was.

        The step's own calls then find the code compiled for these shapes: the passes run
        under the step's autocast with gradients as the step has them.
        """
        if not (self.pending and self.compiled):
            return
        modules = [m for m in (parts.model_q, parts.encoder_k) if m is not None]
        buffers = [b for m in modules for b in m.buffers()]
        saved = [b.clone() for b in buffers]
        with self.signals.interruptible(), own_rng(self.device):
            begin(parts)
            with self.timing("f_q"), autocast(parts.device, parts.amp_dtype):
                outputs = parts.model_q(x_q)
                outputs = outputs if isinstance(outputs, tuple) else (outputs,)
                sum(t.float().sum() for t in outputs).backward()
            if parts.encoder_k is not None:
                with self.timing("f_k"), autocast(parts.device, parts.amp_dtype):
                    parts.keys(x_k)
        with torch.no_grad():
            torch._foreach_copy_(buffers, saved)  # the BatchNorm statistics as they were
        parts.optimizer.zero_grad(set_to_none=True)

    def stepped(self, tracker) -> None:
        """After each step: at the first one, print and record how long it took to come."""
        if not self.pending:
            return
        self.pending = False
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)  # the step's kernels done, once
        seconds = time.perf_counter() - self.launched
        total = compile_seconds()
        figures = {"seconds": round(seconds, 2), "compile_s": round(total, 2),
                   **{f"compile_{name}_s": round(s, 2) for name, s in self.compile_s.items()}}
        tracker.log("first_step", figures, 0, 0)
        if dist.is_main():
            print(first_step_line(seconds, total, self.compile_s), flush=True)

    def compiles_since(self) -> dict[str, int]:
        """The frames compiled since the last call (an epoch record's ``compiles``); nothing
        for a run that does not compile."""
        if not self.compiled:
            return {}
        now = frames_compiled()
        count, self.frames = now - self.frames, now
        return {"compiles": count}


def first_step_line(seconds: float, compile_total: float, parts: dict[str, float]) -> str:
    """``first step after 85.2 s (compiling 57.1 s of it: f_q 38.2 s, ...)``: the compilation of
    each pass, the rest (an evaluation's graphs before the first step) as "other"."""
    if compile_total <= 0:
        return f"first step after {seconds:.1f} s (nothing compiled)"
    named = {name: s for name, s in sorted(parts.items(), key=lambda kv: -kv[1]) if s >= 0.05}
    other = compile_total - sum(parts.values())
    if other >= 0.05:
        named["other"] = other
    shares = ", ".join(f"{name} {s:.1f} s" for name, s in named.items())
    return f"first step after {seconds:.1f} s (compiling {compile_total:.1f} s of it: {shares})"

