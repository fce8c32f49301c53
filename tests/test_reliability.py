"""Fault injection: NaN steps skipped within a budget, fp16 overflow, unreadable images, an
output folder that cannot be written, and kill -9 in the middle of checkpoint saves."""

from __future__ import annotations

import io
import os
import signal
import subprocess
import sys
import tarfile
import time

import numpy as np
import pytest
import torch
from conftest import ROOT, TINY
from PIL import Image

from moco_engine.config.loading import load_config
from moco_engine.data.errors import DataError
from moco_engine.data.images.sets import FolderImages, read_archive
from moco_engine.method.objectives import Objective
from moco_engine.run.checkpoint import checkpoint_files, latest_checkpoint, load_checkpoint
from moco_engine.run.trainer import Trainer
from moco_engine.run.watch import NonFiniteLoss


def trainer(tmp_path, *extra) -> Trainer:
    return Trainer(load_config([], [*TINY, f"train.out_dir={tmp_path / 'run'}", *extra]))


def poison(t: Trainer, steps: set[int]) -> None:
    """Make the loss NaN at the given (0-based) steps."""
    original = t.parts.objective
    t.parts.objective = Objective(lambda *args: original(*args) * (float("nan") if t.step in steps else 1.0))


@pytest.mark.fault("nonfinite")
def test_nonfinite_steps_are_skipped_without_touching_the_state(tmp_path, capsys):
    t = trainer(tmp_path, "train.max_nonfinite_skips=2")
    poison(t, {1, 4})
    snapshots = {}
    original_step = t.train_step

    def step(*args):
        before = (t.step, {k: v.clone() for k, v in t.encoder_q.state_dict().items()}, t.negatives.keys.clone())
        out = original_step(*args)
        snapshots[before[0]] = (before, out)
        return out

    t.train_step = step
    final = t.fit()
    assert final["steps"] == 6 and t.progress.nonfinite_skips == 2
    for skipped in (1, 4):
        (_, weights, keys), out = snapshots[skipped]
        assert out is None
        after = snapshots[skipped + 1][0]  # the state the next step started from
        assert all(torch.equal(weights[k], v) for k, v in after[1].items()) and torch.equal(keys, after[2])
    assert capsys.readouterr().err.count("step skipped") == 2


@pytest.mark.fault("nonfinite")
def test_more_nonfinite_steps_than_allowed_stop_the_run(tmp_path):
    t = trainer(tmp_path, "train.max_nonfinite_skips=1")
    poison(t, {3, 4})  # step 3 is in the second epoch: the first epoch's checkpoint exists
    with pytest.raises(NonFiniteLoss, match=r"at step 5, after 1 skipped steps .*checkpoint_00000003\.pt"):
        t.fit()


@pytest.mark.fault("nonfinite")
def test_fp16_gradscaler_skips_an_overflowing_step_and_recovers(tmp_path):
    t = trainer(tmp_path, "train.precision=fp16", "train.device=cpu")
    assert t.amp_dtype == torch.float16 and t.parts.scaler.is_enabled()
    # A scale far too large, so the first steps' fp16 gradients overflow; each overflow divides it
    # by 256 (instead of GradScaler's default 2) to reach a workable scale in a few CPU steps.
    t.parts.scaler = torch.amp.GradScaler("cpu", init_scale=2.0**40, backoff_factor=2.0**-8)
    weights = {k: v.clone() for k, v in t.encoder_q.state_dict().items() if "running" not in k and "num_batches" not in k}
    t.loaders.sampler.set_epoch(0)
    (x_q, x_k), _, idx = next(iter(t.loaders.train))
    t.train_step(x_q, x_k, idx)
    assert t.parts.scaler.get_scale() < 2.0**40  # overflow found: the scale went down...
    assert all(torch.equal(t.encoder_q.state_dict()[k], v) for k, v in weights.items())  # ...and SGD was skipped
    for _ in range(10):  # the scale comes down to where fp16 gradients fit, then steps are taken
        metrics = t.train_step(x_q, x_k, idx)
        if not all(torch.equal(t.encoder_q.state_dict()[k], v) for k, v in weights.items()):
            break
    else:
        pytest.fail("the GradScaler never recovered from the overflow")
    assert torch.isfinite(metrics["loss"])


def _jpeg(seed: int) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 255, (8, 8, 3), dtype=np.uint8)).save(buffer, "JPEG")
    return buffer.getvalue()


@pytest.mark.fault("data")
def test_an_unreadable_image_in_an_archive_fails_or_is_skipped(tmp_path, capsys):
    archive = tmp_path / "data.tar"
    with tarfile.open(archive, "w") as tar:
        for name, data in [("train/a/0.jpg", _jpeg(0)), ("train/a/1.jpg", b"not a jpeg"), ("train/b/2.jpg", _jpeg(2))]:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    with pytest.raises(DataError, match="train/a/1.jpg"):
        read_archive(archive, "train")
    images = read_archive(archive, "train", on_bad="skip")
    assert len(images) == 2 and images.targets == [0, 1]
    assert "skipped 1 unreadable image(s)" in capsys.readouterr().err


@pytest.mark.fault("data")
def test_an_unreadable_image_in_a_folder_fails_or_is_replaced(tmp_path, capsys):
    for i, cls in enumerate(["a", "a", "b"]):
        (tmp_path / cls).mkdir(exist_ok=True)
        (tmp_path / cls / f"{i}.jpg").write_bytes(_jpeg(i) if i != 1 else _jpeg(1)[:20])  # 1.jpg is truncated
    with pytest.raises(DataError, match="1.jpg"):
        FolderImages(tmp_path).load(1)
    images = FolderImages(tmp_path, on_bad="skip")
    assert images.load(1).size == (8, 8)  # the next readable image stands in
    images.load(1)
    assert capsys.readouterr().err.count("skipping unreadable image") == 1  # reported once


@pytest.mark.fault("disk")
def test_an_output_folder_that_cannot_be_written_is_one_line_exit_2(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    r = subprocess.run([sys.executable, "-m", "moco_engine", *TINY, f"train.out_dir={blocker / 'run'}"],
                       capture_output=True, text=True)
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and len(lines) == 1 and "train.out_dir" in lines[0] and "a_file" in lines[0]
    assert blocker.read_text() == ""


SAVER = """
import sys, torch
from moco_engine.run.checkpoint import save_checkpoint
run = sys.argv[1]
state = {"config": {}, "weights": torch.randn(1_500_000)}
for step in range(1, 10_000):
    state["step"] = step
    save_checkpoint(state, run, step, keep=2)
    print(step, flush=True)
"""


@pytest.mark.fault("kill")
@pytest.mark.parametrize("delay", [0.35, 0.8, 1.3])
def test_kill_9_during_saves_never_loses_the_previous_checkpoint(tmp_path, delay):
    run = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-c", SAVER, str(run)], stdout=subprocess.PIPE, text=True,
                            cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})
    first = proc.stdout.readline()  # one save done: from here every kill lands mid-stream
    assert first.strip() == "1"
    time.sleep(delay)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    files = checkpoint_files(run)
    assert 1 <= len(files) <= 3  # keep=2, plus at most one just renamed in before the pruning
    for path in files:  # everything under a checkpoint's name is whole and matches its hash
        assert load_checkpoint(path)["step"] == int(path.stem.split("_")[1])
    path, state = latest_checkpoint(run)
    # The one `latest` names (written last), or the newest if the kill fell between the two.
    assert state["step"] >= max(int(p.stem.split("_")[1]) for p in files) - 1
    leftovers = [p for p in (run / "checkpoints").iterdir() if p.suffix not in (".pt", ".sha256") and p.name != "latest"]
    assert all(p.name.startswith(".") or p.name.endswith(".tmp") for p in leftovers)  # only temp files


HOLDER = """
import sys, time
from pathlib import Path
from moco_engine.run.folder import RunLock
with RunLock(Path(sys.argv[1])):
    print("held", flush=True)
    time.sleep(120)
"""


@pytest.mark.slow  # subprocesses; -m fault runs it
@pytest.mark.fault("lock")
def test_one_live_run_per_folder_and_a_dead_holder_blocks_nothing(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(run)], stdout=subprocess.PIPE, text=True,
                              cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert holder.stdout.readline().strip() == "held"
    cmd = [sys.executable, "-m", "moco_engine", *TINY, f"train.out_dir={run}", "train.epochs=1"]
    r = subprocess.run(cmd, capture_output=True, text=True)
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and len(lines) == 1 and f"pid {holder.pid}" in lines[0] and "in use" in lines[0]
    assert not (run / "checkpoints").exists() and not (run / "metrics.jsonl").exists()  # nothing touched
    holder.kill()  # kill -9: the OS releases the lock with the process
    holder.wait()
    assert subprocess.run(cmd, capture_output=True, text=True).returncode == 0
