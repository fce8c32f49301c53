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

It also counts *host reads*: values read from a tensor to the host (``item``, ``bool``,
``float``, ``nonzero``, ``tolist``, ``numpy``, ``cpu``). On a GPU each one waits for every
kernel queued before it, so a step with one cannot run ahead of the host. The dispatcher sees
``_local_scalar_dense`` (``item``, ``bool``, ``float``, ``int``), ``nonzero`` and a copy to the
CPU, but a CPU tensor's ``tolist``, ``numpy`` and ``cpu`` read its memory without an operator,
so those three are counted where they are called. On a CPU every tensor counts, except the
ones ``count_ops`` is told to ignore: the optimizer's step counters, which stay on the host on
a GPU too.
"""

from __future__ import annotations

import contextlib
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import torch
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
    host: int = 0  # operators on host values by design (the optimizer's step counters): no kernel on any device
    host_reads: Counter = field(default_factory=Counter)  # how each read happened: its count

    @property
    def total(self) -> int:
        return sum(self.by_name.values())

    @property
    def compute(self) -> int:
        """Operators that launch at least one kernel on a GPU."""
        return self.total - self.views - self.allocations - self.host

    def as_dict(self, top: int = 15) -> dict:
        """The totals and the ``top`` most frequent operators (for JSON)."""
        return {"total": self.total, "compute": self.compute, "views": self.views,
                "allocations": self.allocations, "host": self.host, "top": dict(self.by_name.most_common(top)),
                "host_reads": sum(self.host_reads.values()), "host_read_kinds": dict(self.host_reads)}


#: Operators that read a tensor's value to the host (a copy to the CPU is found by its devices).
READS = frozenset({"aten._local_scalar_dense.default", "aten.nonzero.default", "aten.nonzero_static.default"})
#: Tensor methods that read a CPU tensor's memory without dispatching an operator.
READ_METHODS = ("tolist", "numpy", "cpu")


class _Counter(TorchDispatchMode):
    def __init__(self, ignored: set[int]) -> None:
        super().__init__()
        self.counts = OpCounts()
        self.ignored = ignored  # data pointers of the tensors whose reads do not count
        self.host = set(ignored)  # ... and which live on the host by design (no kernel on any device)
        self.reading = 0  # inside a counted method: its own operators are that read

    def read(self, kind: str, tensor) -> None:
        if not (isinstance(tensor, torch.Tensor) and tensor.data_ptr() in self.ignored):
            self.counts.host_reads[kind] += 1

    def on_host(self, args) -> bool:
        """Whether an operator works on the host values named to ``count_ops`` (its first tensor)."""
        first = next((a for a in args if isinstance(a, torch.Tensor)), None)
        return first is not None and first.device.type == "cpu" and first.data_ptr() in self.host

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = str(func)
        self.counts.by_name[name] += 1
        if name in ALLOCATIONS:
            self.counts.allocations += 1
        elif getattr(func, "is_view", False) or name == "aten.detach.default":
            self.counts.views += 1
        elif self.on_host(args):
            self.counts.host += 1
        out = func(*args, **(kwargs or {}))
        if not self.reading and args and isinstance(args[0], torch.Tensor):
            to_host = (name == "aten._to_copy.default" and args[0].device.type != "cpu"
                       and isinstance(out, torch.Tensor) and out.device.type == "cpu")
            if name in READS or to_host:
                self.read(name.split(".")[1], args[0])
        return out

    @contextlib.contextmanager
    def methods(self):
        """Count the read methods where they are called, for tensors on any device."""
        originals = {name: getattr(torch.Tensor, name) for name in READ_METHODS}

        def counted(name: str, original):
            def method(tensor, *args, **kwargs):
                if not self.reading:
                    self.read(name, tensor)
                self.reading += 1
                try:
                    out = original(tensor, *args, **kwargs)
                finally:
                    self.reading -= 1
                if name == "cpu":  # a host copy now: reading it again (numpy, tolist) costs nothing more
                    self.ignored.add(out.data_ptr())
                return out
            return method

        for name, original in originals.items():
            setattr(torch.Tensor, name, counted(name, original))
        try:
            yield
        finally:
            for name, original in originals.items():
                setattr(torch.Tensor, name, original)


def count_ops(fn: Callable[[], object], ignore_reads_of: Iterable[torch.Tensor] = ()) -> OpCounts:
    """The operators one call of ``fn()`` dispatches, forward and backward, and its host reads
    (but those of ``ignore_reads_of``: the optimizer's step counters, host tensors on a GPU too,
    whose operators, an increment and a read a step, launch no kernel and are counted as ``host``,
    not compute).

    Run ``fn`` once before counting: a first call builds what later calls reuse (optimizer
    momentum buffers, lazily made workspaces) and would count those too.
    """
    with _Counter({t.data_ptr() for t in ignore_reads_of}) as mode, mode.methods():
        fn()
    return mode.counts


def step_counters(*optimizers: torch.optim.Optimizer) -> list[torch.Tensor]:
    """The optimizers' per-parameter step counters (AdamW's ``step``): host values by design."""
    return [state["step"] for optimizer in optimizers for state in optimizer.state.values()
            if isinstance(state.get("step"), torch.Tensor)]
