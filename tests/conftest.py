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
    "optim.lr=0.06",  # pinned, like the augmentation below: the default run's tuning is not the tests'
    "data.augmentation=cifar",
    "train.epochs=2",
    "train.steps_per_epoch=3",
    "train.log_every=2",
    "eval.knn_k=10",
    "eval.at_start=false",  # tests that want the random-init baseline ask for it
    "eval.batch_size=64",
    "track.progress=false",
    "track.preview=0",  # no matplotlib figure in every run; the preview's own tests ask for one
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


# ---------------------------------------------------------------------------------------------
# --fault-report PATH: the fault-injection tests (marked ``fault(kind)``) tallied by kind, for
# BENCHMARKS.md's reliability table: python -m pytest -m fault --fault-report=faults.json
# ---------------------------------------------------------------------------------------------
FAULT_OUTCOMES: dict[str, dict[str, str]] = {}


def pytest_addoption(parser):
    parser.addoption("--fault-report", default="", help="write the fault(kind) tests' outcomes by kind to this JSON file")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    marker = item.get_closest_marker("fault")
    if marker is not None and (report.when == "call" or report.failed or report.skipped):
        FAULT_OUTCOMES.setdefault(marker.args[0], {})[item.nodeid] = report.outcome


def pytest_sessionfinish(session):
    path = session.config.getoption("--fault-report")
    if path:
        import json

        tally = {kind: {"cases": len(cases), "passed": sum(o == "passed" for o in cases.values()),
                        "not_passed": sorted(n for n, o in cases.items() if o != "passed")}
                 for kind, cases in sorted(FAULT_OUTCOMES.items())}
        Path(path).write_text(json.dumps(tally, indent=1) + "\n")
