"""A compiled run (Issue 34): its compilation counted epoch by epoch, none after epoch 0; the
first step's line; a SIGTERM while compiling stops the run at once and loses nothing."""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import time

import pytest

from moco_engine.config.loading import load_config
from moco_engine.run.checkpoint import checkpoint_files
from moco_engine.run.tracking import METRICS_FILE, read_metrics
from moco_engine.run.trainer import Trainer
from moco_engine.run.warmup import first_step_line
from moco_engine.runtime import compiling
from tests.conftest import ROOT, TINY

# The demo's shape in small: the device pipeline (its views compiled too), split-BN over 2
# slices with shuffled keys, kNN after every epoch and before the first, a save every epoch.
COMPILED = [*TINY, "data.pipeline=device", "model.bn_splits=2", "model.bn=shuffle", "train.compile=true",
            "eval.at_start=true", "eval.knn_every=1", "train.save_every=1", "data.drop_last=true"]


def compiles_by_epoch(run) -> list[int]:
    return [r["compiles"] for r in read_metrics(run / METRICS_FILE, "epoch")]


@pytest.mark.slow  # 17 s; the compiled start-up's tests stay in the default run
def test_a_compiled_run_recompiles_nothing_after_epoch_0(tmp_path, monkeypatch, capsys):
    # Recompilation is dynamo's decision (its guards), whatever the backend: "eager" traces the
    # same frames without generating code, so the test costs seconds, not minutes.
    monkeypatch.setattr(compiling, "BACKEND", "eager")
    run = tmp_path / "run"
    Trainer(load_config([], [*COMPILED, "train.epochs=3", f"train.out_dir={run}"])).fit()
    counts = compiles_by_epoch(run)
    # Epoch 0 compiles (the start kNN's eval graphs count there too); the kNN evaluations, the
    # train/eval switches, the epochs' ends and the saves after it compile nothing.
    assert counts[0] > 0 and counts[1:] == [0, 0], counts
    first = read_metrics(run / METRICS_FILE, "first_step")
    assert len(first) == 1 and first[0]["compile_s"] > 0 and first[0]["compile_f_q_s"] > 0
    assert first[0]["seconds"] >= first[0]["compile_s"]
    assert "first step after" in capsys.readouterr().out

    # A resume compiles its own code once (a new process must), then nothing either.
    Trainer(load_config([], [*COMPILED, "train.epochs=5", f"train.out_dir={run}", "train.resume=auto"])).fit()
    assert compiles_by_epoch(run)[4] == 0, compiles_by_epoch(run)


def test_an_uncompiled_run_says_so_in_its_first_line(tmp_path, capsys):
    run = tmp_path / "run"
    Trainer(load_config([], [*TINY, "train.epochs=1", f"train.out_dir={run}"])).fit()
    assert "first step after" in capsys.readouterr().out
    assert "compiles" not in read_metrics(run / METRICS_FILE, "epoch")[0]


def test_the_first_step_line_names_each_pass_and_the_rest():
    line = first_step_line(85.2, 57.1, {"views": 6.0, "f_q": 38.2, "f_k": 8.1})
    assert line == "first step after 85.2 s (compiling 57.1 s of it: f_q 38.2 s, f_k 8.1 s, views 6.0 s, other 4.8 s)"
    assert first_step_line(3.04, 0.0, {}) == "first step after 3.0 s (nothing compiled)"


def test_the_dynamo_names_the_figures_read_are_the_ones_torch_writes():
    """dynamo's counter and timers read 0 for a name they do not know: an upgrade that renames one
    fails here rather than making a run's compile figures quietly 0."""
    changes = compiling.changed_names()
    assert not changes, "\n".join(changes)


def test_a_compiled_function_moves_both_figures(recwarn):
    import torch

    frames, seconds = compiling.frames_compiled(), compiling.compile_seconds()
    torch.compile(lambda x: x.sin() + 1, backend="eager")(torch.ones(3))
    assert compiling.frames_compiled() > frames and compiling.compile_seconds() > seconds
    assert not [w for w in recwarn if "compiling.py" in str(w.message)]


def test_a_timer_dynamo_no_longer_writes_is_a_warning(monkeypatch):
    import torch._dynamo.utils

    monkeypatch.setattr(torch._dynamo.utils, "compilation_time_metrics", {"renamed.compile_inner": [1.0]})
    with pytest.warns(RuntimeWarning, match="no '_compile.compile_inner': compile seconds read 0"):
        assert compiling.compile_seconds() == 0.0


# A backend that takes ten minutes, as Triton's code generation can on a GPU: the signal must not
# wait for it.
SLOW_COMPILER = """
import sys, time
from moco_engine.runtime import compiling
def slow(gm, example_inputs):
    print("backend compiling", file=sys.stderr, flush=True)
    time.sleep(600)
    return gm.forward
compiling.BACKEND = slow
from moco_engine.tools.cli import train_main
sys.exit(train_main(sys.argv[1:]))
"""


def digest(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.parametrize("resumed", [False, pytest.param(True, marks=pytest.mark.slow)], ids=["fresh", "resumed"])
def test_sigterm_while_compiling_stops_within_seconds_and_loses_nothing(tmp_path, resumed):
    run = tmp_path / "run"
    args = [*COMPILED, "eval.at_start=false", "train.epochs=2", f"train.out_dir={run}"]
    if resumed:  # a saved run, resumed compiled: the signal lands in the resumed run's compilation
        Trainer(load_config([], [*args, "train.compile=false", "train.epochs=1"])).fit()
    saved = {p.name: digest(p) for p in checkpoint_files(run)}
    lines = []
    proc = subprocess.Popen([sys.executable, "-c", SLOW_COMPILER, *args, "train.resume=auto"], stderr=subprocess.PIPE, text=True, cwd=ROOT,
                            env={**os.environ, "PYTHONPATH": str(ROOT)})
    try:
        for line in proc.stderr:  # wait until the compiler is at work
            lines.append(line)
            if "backend compiling" in line:
                break
        sent = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(timeout=60)
        waited = time.monotonic() - sent
        rest = proc.stderr.read()
    finally:
        proc.kill()
    assert code == 128 + signal.SIGTERM, "".join(lines) + rest
    assert waited < 30, waited
    assert {p.name: digest(p) for p in checkpoint_files(run)} == saved  # untouched (none, for a fresh run)
    if resumed:
        assert saved and "before any new step" in rest and "holds the run" in rest, rest
    else:
        assert "before any step: nothing to save" in rest, rest
