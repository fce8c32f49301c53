"""How many operators a step dispatches: the CPU-measurable proxy of a launch-bound GPU step.

At 32 px a CIFAR ResNet-18 step on a GPU is bound by kernel launches, not by arithmetic: its
time grows with the number of operators it runs, which any device can count. :func:`count_ops`
runs a function under a ``TorchDispatchMode`` and counts every ATen operator that reaches the
dispatcher below autograd, the backward's included (autograd carries the mode to its engine).

An operator is counted as

- a *view* when it only aliases its input (``view``, ``t``, ``detach``, ...): no kernel;
- an *allocation* when it only reserves memory (``empty``, ``empty_strided``): no kernel;
- *compute* otherwise: at least one kernel launch on a GPU (a ``_foreach_*`` operator launches
  one per chunk of tensors, counted once here).

Counts on the CPU are a proxy, not the GPU's count: a few operators dispatch to other
implementations there (``native_batch_norm`` on a CPU, ``cudnn_batch_norm`` on CUDA), and
``moco-bench`` reports what it measured on the device it ran on.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

from torch.utils._python_dispatch import TorchDispatchMode

#: Operators that allocate and launch nothing.
ALLOCATIONS = frozenset({"aten.empty.memory_format", "aten.empty_strided.default", "aten.empty_like.default",
                         "aten.new_empty.default", "aten.new_empty_strided.default"})


@dataclass
class OpCounts:
    """The operators one call dispatched, by name (``aten.convolution.default``: count)."""

    by_name: Counter = field(default_factory=Counter)
    views: int = 0
    allocations: int = 0

    @property
    def total(self) -> int:
        return sum(self.by_name.values())

    @property
    def compute(self) -> int:
        """Operators that launch at least one kernel on a GPU."""
        return self.total - self.views - self.allocations

    def as_dict(self, top: int = 15) -> dict:
        """The totals and the ``top`` most frequent operators (for JSON)."""
        return {"total": self.total, "compute": self.compute, "views": self.views,
                "allocations": self.allocations, "top": dict(self.by_name.most_common(top))}


class _Counter(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.counts = OpCounts()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = str(func)
        self.counts.by_name[name] += 1
        if name in ALLOCATIONS:
            self.counts.allocations += 1
        elif getattr(func, "is_view", False) or name == "aten.detach.default":
            self.counts.views += 1
        return func(*args, **(kwargs or {}))


def count_ops(fn: Callable[[], object]) -> OpCounts:
    """The operators one call of ``fn()`` dispatches, forward and backward.

    Run ``fn`` once before counting: a first call builds what later calls reuse (optimizer
    momentum buffers, lazily made workspaces) and would count those too.
    """
    with _Counter() as mode:
        fn()
    return mode.counts
