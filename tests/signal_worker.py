"""``moco-train`` with a real signal sent to this very process at a named moment (tests).

    python tests/signal_worker.py MOMENT SIGNAL [moco-train arguments ...]

MOMENT is where the signal lands, the first time the run gets there: ``start`` (building the
data and the model), ``knn`` (the kNN monitor), ``refresh`` (encoding the data set for the
memory bank), ``save`` (the checkpoint's fsync, mid-write).
"""

from __future__ import annotations

import os
import signal
import sys

import moco_engine.evaluation.monitor as monitor
import moco_engine.run.opening as opening
import moco_engine.run.trainer as engine
from moco_engine.tools.cli import train_main


def signal_on_first_call(owner, name: str, signum: int) -> None:
    original = getattr(owner, name)
    sent = []

    def wrapper(*args, **kwargs):
        if not sent:
            sent.append(True)
            os.kill(os.getpid(), signum)  # delivered before the next Python instruction
        return original(*args, **kwargs)

    setattr(owner, name, wrapper)


if __name__ == "__main__":
    moment, signame, *args = sys.argv[1:]
    signum = getattr(signal, signame)
    target = {"start": (opening, "build_loaders"), "knn": (monitor, "knn_monitor"),
              "refresh": (engine.Trainer, "encode_train_set"), "save": (os, "fsync")}[moment]
    signal_on_first_call(*target, signum)
    sys.exit(train_main(args))
