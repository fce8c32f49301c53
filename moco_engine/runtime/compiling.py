"""``torch.compile`` as a run uses it: the backend, and what compiling has cost so far.

A compiled run pays its compilation in its first steps (the encoders' forward and backward
passes, the device pipeline's views), and again whenever a guard fails (a recompilation). Both
are read from dynamo's own bookkeeping, so a run can print where its time went
(``run/warmup.py``) and count its recompilations epoch by epoch.

torch 2.14 has no public API for either (``torch.compiler`` offers none): dynamo's frame counter
and its timers are internals of ``torch._dynamo.utils``, and both read 0 for a name they do not
know, so an upgrade that renamed one would make the figures quietly 0. This module is their one
reader: each read checks the two against each other (a warning names what went missing), and
:func:`changed_names` says, from torch's own source, whether the names it reads are still the
ones dynamo and inductor write (``tests/test_compile.py`` runs it).
"""

from __future__ import annotations

import importlib
import inspect
import warnings
from typing import Any

#: The backend of every ``torch.compile`` the engine makes (encoders, views). Tests that only
#: count recompilations set a cheaper one ("aot_eager": dynamo's and AOT autograd's graphs, no
#: code generation): recompilation is decided by dynamo's guards, whatever the backend.
BACKEND = "inductor"

#: dynamo's timers that hold compilation: a forward frame (tracing and its code generation), and
#: the backward's graph, compiled when the first backward runs; each with the module that writes it.
FRAME_TIMER = "_compile.compile_inner"
BACKWARD_TIMER = "compile_fx.<locals>.bw_compiler"
COMPILE_TIMERS = (FRAME_TIMER, BACKWARD_TIMER)
WRITERS = {FRAME_TIMER: "torch._dynamo.convert_frame", BACKWARD_TIMER: "torch._inductor.compile_fx"}
#: dynamo's count of the frames it compiled, as ``convert_frame`` writes it.
FRAMES_OK = 'counters["frames"]["ok"]'


def bookkeeping() -> tuple[Any, dict[str, list[float]]]:
    """dynamo's frame counts (``total``, ``ok``) and its timers (seconds by timed function)."""
    try:
        from torch._dynamo.utils import compilation_time_metrics, counters
    except ImportError as e:
        raise RuntimeError(f"dynamo's bookkeeping moved ({e}): moco_engine/runtime/compiling.py reads it") from None
    frames, timers = counters["frames"], compilation_time_metrics
    if timers and FRAME_TIMER not in timers:
        warnings.warn(f"dynamo timed {', '.join(sorted(timers))} but no {FRAME_TIMER!r}: compile seconds read 0 "
                      "(update moco_engine/runtime/compiling.py's timer names)", RuntimeWarning, stacklevel=3)
    if FRAME_TIMER in timers and not frames["total"]:
        warnings.warn("dynamo timed compiled frames but counted none in counters['frames']: the compiles "
                      "per epoch read 0 (update moco_engine/runtime/compiling.py's counter)", RuntimeWarning, stacklevel=3)
    return frames, timers


def compile_seconds() -> float:
    """Seconds this process has spent compiling (forward frames and backward graphs); 0 before
    the first compilation."""
    _, timers = bookkeeping()
    return float(sum(sum(timers.get(name, ())) for name in COMPILE_TIMERS))


def frames_compiled() -> int:
    """Frames dynamo has compiled in this process; each recompilation is one more."""
    frames, _ = bookkeeping()
    return int(frames["ok"])


def changed_names() -> list[str]:
    """The names this module reads that torch's source no longer writes, one line each (none:
    they are as it expects)."""
    def source(module: str) -> str:
        return inspect.getsource(importlib.import_module(module)).replace("'", '"')

    written = [(f'"{name}"', writer) for name, writer in WRITERS.items()] + [(FRAMES_OK, "torch._dynamo.convert_frame")]
    changes = [f"{writer} no longer writes {name} (moco_engine/runtime/compiling.py reads it)"
               for name, writer in written if name not in source(writer)]
    try:
        bookkeeping()
    except RuntimeError as e:
        changes.append(str(e))
    return changes
