"""Shared fixtures: tiny configs that run in seconds on CPU."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = ROOT.parent / "shared" / "data"

# The smallest configuration that still exercises every part of a run.
TINY = [
    "data.name=synthetic",
    "data.synthetic_size=96",
    "data.synthetic_classes=3",
    "data.num_workers=0",
    "model.cifar_stem=false",
    "model.head=mlp",  # the head with the most parts (the default is linear)
    "model.hidden_dim=64",
    "model.dim=16",
    "queue.size=50",
    "optim.batch_size=16",
    "train.epochs=2",
    "train.steps_per_epoch=3",
    "train.log_every=2",
    "eval.knn_k=10",
    "eval.batch_size=64",
    "track.progress=false",
]


@pytest.fixture(autouse=True)
def _no_wandb_from_the_shell(monkeypatch):
    # Hermetic against the shell: a WANDB_MODE=offline (or any WANDB_*) exported by the user
    # would turn W&B on in every run a test starts, in-process and in subprocesses (which
    # inherit os.environ). A test that wants W&B sets its variables itself.
    import os

    for name in [n for n in os.environ if n.startswith("WANDB_")]:
        monkeypatch.delenv(name)


@pytest.fixture(autouse=True)
def _few_threads():
    # Two cores here and in CI: more threads than cores only adds contention.
    torch.set_num_threads(2)
    yield
