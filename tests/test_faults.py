"""The faults that must never cost saved work (issue 17), each caused for real: NaN in the
weights, stray and damaged files among the checkpoints, real signals at named moments, a
full disk and a file-size limit, signals to moco-sweep. Every test carries ``fault(class)``;
``--fault-report`` tallies them (BENCHMARKS.md, "Reliability")."""

from __future__ import annotations

import errno
import json
import os
import resource
import signal
import subprocess
import sys
import time
import warnings

import pytest
import torch
from conftest import ROOT, TINY

from moco_engine.config.loading import load_config
from moco_engine.run.checkpoint import (
    CheckpointError,
    checkpoint_files,
    latest_checkpoint,
    load_checkpoint,
    save_checkpoint,
    verified_files,
)
from moco_engine.run.trainer import Trainer
from moco_engine.run.watch import NonFiniteLoss


def env() -> dict[str, str]:
    """The subprocesses' environment, read when a test runs: after conftest has cleared the
    shell's WANDB_* variables (a copy made at import would keep WANDB_MODE=offline)."""
    return {**os.environ, "PYTHONPATH": str(ROOT)}

SIGNAL_WORKER = [sys.executable, str(ROOT / "tests" / "signal_worker.py")]


def trainer(run, *extra) -> Trainer:
    return Trainer(load_config([], [*TINY, f"train.out_dir={run}", *extra]))


def errors(stderr: str) -> list[str]:
    """The lines of stderr that are not warnings."""
    return [line for line in stderr.strip().splitlines() if line and not line.startswith("warning:")]


def weights(run) -> dict[str, torch.Tensor]:
    state = latest_checkpoint(run)[1]
    return {f"{s}.{k}": v for s in ("encoder_q", "encoder_k", "negatives") for k, v in (state[s] or {}).items()}


# ============================================================================ 1. finite or not written
@pytest.mark.fault("nonfinite")
def test_a_state_with_nonfinite_weights_is_never_saved(tmp_path):
    t = trainer(tmp_path / "run")
    original = t.negatives.on_epoch_end

    def poison_at_second_epoch(epoch, encode):
        if epoch == 1:  # a statistic the loss never sees: only the save-time check can find it
            t.encoder_k.encoder.backbone.bn1.running_var.fill_(float("inf"))
        return original(epoch, encode)

    t.negatives.on_epoch_end = poison_at_second_epoch
    with pytest.raises(NonFiniteLoss, match=r"at step 6 the state holds non-finite values \(encoder_k\..*bn1\.running_var"
                                            r".*not saved; the last good checkpoint is .*checkpoint_00000003\.pt"):
        t.fit()
    assert [p.name for p in checkpoint_files(tmp_path / "run")] == ["checkpoint_00000003.pt"]


@pytest.mark.fault("nonfinite")
def test_exit_3_and_resume_pass_over_a_checkpoint_holding_nan(tmp_path):
    run = tmp_path / "run"
    t = trainer(run, "train.epochs=1")
    t.fit()
    state = latest_checkpoint(run)[1]
    next(iter(state["encoder_q"].values())).fill_(float("nan"))  # e.g. from an older version
    state["step"] = 7
    save_checkpoint(state, run, 7, keep=5)
    message = str(t.watch.diverged("x"))
    assert "the last good checkpoint is" in message and message.endswith("checkpoint_00000003.pt")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        resumed = trainer(run, "train.resume=auto")
        resumed.prepare_run_dir()
    assert resumed.step == 3 and any("checkpoint_00000007.pt holds non-finite values" in str(w.message) for w in caught)


# ============================================================================ 2-3. only verified checkpoints count
@pytest.mark.fault("rotation")
def test_a_stray_file_named_like_a_checkpoint_is_never_counted_deleted_or_followed(tmp_path):
    run = tmp_path / "run"
    t = trainer(run, "train.keep_checkpoints=1", "train.epochs=1")
    t.fit()
    folder = run / "checkpoints"
    (folder / "checkpoint_99999999.pt").write_bytes(b"a stray copy")
    (folder / "checkpoint_00000006.pt").write_bytes(b"not ours either")  # the name the next save wants
    (folder / "latest").write_text("checkpoint_99999999.pt")
    with warnings.catch_warnings(record=True) as caught:  # the resume is chosen when the run is built
        warnings.simplefilter("always")
        t2 = trainer(run, "train.keep_checkpoints=1", "train.resume=auto")
        t2.fit()
    assert t2.step == 6
    names = sorted(p.name for p in folder.iterdir())
    assert names == ["checkpoint_00000006-1.pt", "checkpoint_00000006-1.pt.sha256", "checkpoint_00000006.pt",
                     "checkpoint_99999999.pt", "latest"]
    assert (folder / "checkpoint_99999999.pt").read_bytes() == b"a stray copy"
    assert (folder / "checkpoint_00000006.pt").read_bytes() == b"not ours either"
    assert any("checkpoint_99999999.pt has no" in str(w.message) for w in caught)  # passed over, said so
    assert latest_checkpoint(run)[1]["step"] == 6 and [p.name for p in verified_files(run)] == ["checkpoint_00000006-1.pt"]


@pytest.mark.fault("rotation")
def test_rotation_never_prunes_checkpoints_of_later_steps(tmp_path):
    for step in (1, 5):
        save_checkpoint({"config": {}, "step": step}, tmp_path, step, keep=1)
    first = save_checkpoint({"config": {}, "step": 1}, tmp_path, 1, keep=5)  # re-saved
    save_checkpoint({"config": {}, "step": 3}, tmp_path, 3, keep=1)  # a run resumed from step 1
    assert [p.name for p in checkpoint_files(tmp_path)] == ["checkpoint_00000003.pt", "checkpoint_00000005.pt"]
    assert not first.exists()


@pytest.mark.fault("resume")
def test_resume_auto_among_only_bad_checkpoints_exits_2_naming_them(tmp_path):
    run = tmp_path / "run"
    folder = run / "checkpoints"
    folder.mkdir(parents=True)
    (folder / "checkpoint_00000003.pt").write_bytes(b"truncated")
    (folder / "checkpoint_00000003.pt.sha256").write_text("0" * 64)
    (folder / "checkpoint_00000009.pt").write_bytes(b"foreign")
    r = subprocess.run([sys.executable, "-m", "moco_engine", *TINY, f"train.out_dir={run}", "train.resume=auto"],
                       capture_output=True, text=True, env=env())
    lines = errors(r.stderr)
    assert r.returncode == 2 and len(lines) == 1, r.stderr
    assert "no usable checkpoint" in lines[0] and "checkpoint_00000003.pt" in lines[0] and "checkpoint_00000009.pt" in lines[0]
    assert (folder / "checkpoint_00000003.pt").read_bytes() == b"truncated"  # nothing overwritten
    assert sorted(p.name for p in folder.iterdir()) == ["checkpoint_00000003.pt", "checkpoint_00000003.pt.sha256",
                                                         "checkpoint_00000009.pt"]
    assert not (run / "metrics.jsonl").exists()


@pytest.mark.fault("resume")
def test_a_checkpoint_of_pickled_objects_is_refused_without_running_them(tmp_path):
    marker = tmp_path / "ran"

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    path = tmp_path / "checkpoint_00000001.pt"
    torch.save({"config": {}, "payload": Payload()}, path)
    with pytest.raises(CheckpointError) as e:
        load_checkpoint(path)
    assert "holds pickled Python objects" in str(e.value) and "\n" not in str(e.value) and not marker.exists()


# ============================================================================ 4. a signal at any moment
@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    """The uninterrupted run of a negatives kind, to compare resumed ones with (made on first use)."""
    runs: dict[str, dict[str, torch.Tensor]] = {}

    def of(kind: str) -> dict[str, torch.Tensor]:
        if kind not in runs:
            run = tmp_path_factory.mktemp("straight") / kind
            cmd = [sys.executable, "-m", "moco_engine", *TINY, "eval.knn_every=1", f"train.out_dir={run}",
                   f"negatives.kind={kind}"]
            assert subprocess.run(cmd, capture_output=True, env=env()).returncode == 0
            runs[kind] = weights(run)
        return runs[kind]

    return of


@pytest.mark.fault("signals")
@pytest.mark.parametrize("moment, signame, kind", [
    ("start", "SIGINT", "queue"),
    ("knn", "SIGTERM", "queue"),
    pytest.param("save", "SIGTERM", "queue", marks=pytest.mark.slow),
    pytest.param("refresh", "SIGINT", "memory_bank", marks=pytest.mark.slow),
])
def test_a_signal_at_any_moment_saves_the_finished_work_and_the_resume_is_exact(tmp_path, straight, moment, signame, kind):
    run = tmp_path / "run"
    args = [*TINY, "eval.knn_every=1", f"train.out_dir={run}", f"negatives.kind={kind}"]
    r = subprocess.run([*SIGNAL_WORKER, moment, signame, *args], capture_output=True, text=True, env=env())
    signum = getattr(signal, signame)
    lines = errors(r.stderr)
    assert r.returncode == 128 + signum and "Traceback" not in r.stderr and len(lines) == 1, r.stderr
    assert lines[0].startswith(f"stopped by {signame}")
    if moment == "start":
        assert "nothing to save" in lines[0] and not checkpoint_files(run)
        return
    state = latest_checkpoint(run)[1]
    assert state["step"] == 3 and [p.name for p in checkpoint_files(run)] == ["checkpoint_00000003.pt"]
    # kNN: the epoch is done, its evaluation pending; refresh: the epoch's steps are done, its
    # refresh not; save: the write under way finished before the stop.
    assert (state["epoch"], state["eval_pending"]) == {"knn": (1, True), "save": (1, False), "refresh": (0, False)}[moment]
    r = subprocess.run([sys.executable, "-m", "moco_engine", *args, "train.resume=auto"], capture_output=True, text=True, env=env())
    assert r.returncode == 0, r.stderr
    resumed, expected = weights(run), straight(kind)
    assert resumed.keys() == expected.keys()
    # Bit for bit (NaN counts as equal to NaN: NCE's log Z is NaN until a batch estimates it).
    assert all(torch.equal(resumed[k], expected[k]) or torch.allclose(resumed[k], expected[k], rtol=0, atol=0, equal_nan=True)
               for k in resumed)
    evals = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [e["epoch"] for e in evals if e["kind"] == "eval"] == [0, 1]  # the cut evaluation was made up


@pytest.mark.fault("signals")
def test_sigterm_to_the_process_group_while_workers_decode_saves_the_steps_taken(tmp_path):
    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "moco_engine", *TINY, "data.num_workers=2", "train.epochs=200", "train.log_every=1",
           f"train.out_dir={run}"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env(),
                            start_new_session=True)
    metrics = run / "metrics.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and not (metrics.is_file() and metrics.read_text().count('"kind": "step"') >= 4):
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGTERM)  # as a scheduler or Ctrl-C does: the workers get it too
    _, stderr = proc.communicate(timeout=120)
    lines = errors(stderr)
    assert proc.returncode == 143 and "Traceback" not in stderr and len(lines) == 1, stderr
    state = latest_checkpoint(run)[1]
    assert f"after step {state['step']};" in lines[0] and state["step"] >= 4
    with pytest.raises(ProcessLookupError):
        os.killpg(proc.pid, 0)  # no worker left behind


# ============================================================================ 6. disk full, I/O errors
@pytest.mark.fault("disk")
def test_a_full_disk_at_the_write_is_one_error_and_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    previous = save_checkpoint({"config": {}, "step": 1}, tmp_path, 1, keep=2)
    real_fdopen = os.fdopen

    class Full:
        def __init__(self, f):
            self.f = f

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.f.close()

        def write(self, data):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr("moco_engine.run.checkpoint.os.fdopen", lambda fd, mode: Full(real_fdopen(fd, mode)))
    with pytest.raises(CheckpointError) as e:
        save_checkpoint({"config": {}, "step": 2, "w": torch.zeros(10)}, tmp_path, 2, keep=2)
    monkeypatch.undo()
    message = str(e.value)
    assert "checkpoint_00000002.pt" in message and "No space left on device" in message and "intact" in message
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == [
        "checkpoint_00000001.pt", "checkpoint_00000001.pt.sha256", "latest"]  # no temporary, no stray hash
    assert latest_checkpoint(tmp_path)[0] == previous


def _limit_file_size():
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG instead
    resource.setrlimit(resource.RLIMIT_FSIZE, (2 << 20, 2 << 20))


@pytest.mark.slow  # three runs
@pytest.mark.fault("disk")
def test_a_write_the_os_refuses_midway_exits_2_and_the_run_resumes_from_the_last_checkpoint(tmp_path):
    run = tmp_path / "run"
    base = [sys.executable, "-m", "moco_engine", *TINY, f"train.out_dir={run}"]
    assert subprocess.run([*base, "train.epochs=1"], capture_output=True, env=env()).returncode == 0
    before = checkpoint_files(run)
    r = subprocess.run([*base, "train.resume=auto"], capture_output=True, text=True, env=env(), preexec_fn=_limit_file_size)
    lines = errors(r.stderr)
    assert r.returncode == 2 and len(lines) == 1, r.stderr  # a real EFBIG from the kernel, mid-write
    assert "cannot write checkpoint" in lines[0] and "File too large" in lines[0]
    assert checkpoint_files(run) == before and load_checkpoint(before[0], require_hash=True)["step"] == 3
    assert not [p for p in (run / "checkpoints").iterdir() if p.name.endswith(".tmp")]
    assert subprocess.run([*base, "train.resume=auto"], capture_output=True, env=env()).returncode == 0


@pytest.mark.fault("disk")
def test_temporaries_of_a_killed_save_are_removed_by_the_next_holder_of_the_folder(tmp_path):
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    stale = run / "checkpoints" / ".checkpoint_00000003.pt.abc123.tmp"
    stale.write_bytes(b"half a checkpoint")
    trainer(run, "train.epochs=1").fit()
    assert not stale.exists()


# ============================================================================ 7. moco-sweep passes signals on
@pytest.mark.slow  # two sweeps
@pytest.mark.fault("sweep")
def test_sigterm_to_moco_sweep_reaches_its_run_which_saves_and_the_rerun_resumes(tmp_path):
    sweep = tmp_path / "sweep.yaml"
    overrides = [o for o in TINY if not o.startswith("train.epochs")] + ["train.epochs=200", "train.log_every=1"]
    command = ["${env}", "python", "-m", "moco_engine", *overrides, "${args_no_hyphens}"]
    sweep.write_text("name: s\nmethod: grid\nparameters:\n  queue.size: {values: [50]}\ncommand:\n"
                     + "".join(f"  - {word}\n" for word in command))
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "moco_engine.tools.sweep", str(sweep), "--out", str(out)]
    metrics = out / "000_run" / "metrics.jsonl"

    def start_and_signal(ready):
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env())
        deadline = time.time() + 120
        while not ready():
            assert time.time() < deadline and proc.poll() is None, "the run never got going"
            time.sleep(0.2)
        child = int((out / "000_run" / ".lock").read_text().split()[1])
        proc.send_signal(signal.SIGTERM)  # to moco-sweep alone
        stdout, stderr = proc.communicate(timeout=120)
        return proc.returncode, stdout, stderr, child

    code, _, stderr, child = start_and_signal(lambda: metrics.is_file() and '"kind": "step"' in metrics.read_text())
    assert code == 143 and "Traceback" not in stderr, stderr
    assert errors(stderr)[-1].startswith("moco-sweep: stopped by SIGTERM during run 000_run (which exited with code 143)")
    with pytest.raises(ProcessLookupError):
        os.kill(child, 0)  # the run ended with moco-sweep, not after it
    step = latest_checkpoint(out / "000_run")[1]["step"]
    assert step >= 1
    steps_before = metrics.read_text().count('"kind": "step"')
    code, stdout, stderr, _ = start_and_signal(lambda: metrics.read_text().count('"kind": "step"') > steps_before)
    assert code == 143, stderr
    assert latest_checkpoint(out / "000_run")[1]["step"] > step  # the rerun went on from the checkpoint
