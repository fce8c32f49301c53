"""``torch.compile`` as a run uses it: the backend, and what compiling has cost so far.

A compiled run pays its compilation in its first steps (the encoders' forward and backward
passes, the device pipeline's views), and again whenever a guard fails (a recompilation). Both
are read from dynamo's own bookkeeping, so a run can print where its time went
(``run/first_step.py``) and count its recompilations epoch by epoch.
"""

from __future__ import annotations

#: The backend of every ``torch.compile`` the engine makes (encoders, views). Tests that only
#: count recompilations set a cheaper one ("aot_eager": dynamo's and AOT autograd's graphs, no
#: code generation): recompilation is decided by dynamo's guards, whatever the backend.
BACKEND = "inductor"

#: dynamo's timers that hold compilation: a forward frame (tracing and its code generation), and
#: the backward's graph, compiled when the first backward runs.
COMPILE_TIMERS = ("_compile.compile_inner", "compile_fx.<locals>.bw_compiler")


def compile_seconds() -> float:
    """Seconds this process has spent compiling (forward frames and backward graphs); 0 before
    the first compilation."""
    from torch._dynamo.utils import compilation_time_metrics

    return float(sum(sum(compilation_time_metrics.get(name, ())) for name in COMPILE_TIMERS))


def frames_compiled() -> int:
    """Frames dynamo has compiled in this process; each recompilation is one more."""
    from torch._dynamo.utils import counters

    return int(counters["frames"]["ok"])
