"""train.steps: a run sized by a budget of optimizer steps, not by epochs (method/schedules.py's Plan)."""

import json
import signal

import pytest
import torch
from conftest import TINY

from moco_engine.config.loading import load_config
from moco_engine.method.schedules import Plan, lr_at
from moco_engine.run.checkpoint import CheckpointError, latest_checkpoint
from moco_engine.run.trainer import Trainer


def tiny(tmp_path, *extra):
    return load_config([], [*TINY, f"train.out_dir={tmp_path / 'run'}", *extra])


def kinds(run_dir, kind):
    return [r for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines()) if r["kind"] == kind]


def test_the_plan_of_a_budget_and_of_epochs():
    train = load_config([], ["train.steps=7", "train.epochs=50"]).train
    plan = Plan.of(train, 3)  # a budget: train.epochs is not read
    assert (plan.steps, plan.epochs) == (7, 3)
    assert [plan.epoch_steps(e) for e in range(3)] == [3, 3, 1]  # the last epoch cut where the budget ends
    plan = Plan.of(load_config([], ["train.epochs=4"]).train, 3)
    assert (plan.steps, plan.epochs, plan.epoch_steps(3)) == (12, 4, 3)


def test_the_schedules_count_to_the_budget():
    cfg = load_config([], ["train.steps=100", "train.epochs=3", "optim.lr=1.0", "optim.schedule=cosine",
                           "optim.warmup_epochs=1"])
    # By hand: 10 steps an epoch, 10 of warm-up, then the cosine over the budget's other 90 steps.
    assert lr_at(cfg, 9, 10) == pytest.approx(1.0)
    assert lr_at(cfg, 10 + 45, 10) == pytest.approx(0.5)
    assert lr_at(cfg, 100, 10) == pytest.approx(0.0)
    linear = load_config([], ["train.steps=5", "optim.lr=1.0", "optim.schedule=linear"])
    assert [lr_at(linear, s, 3) for s in range(5)] == pytest.approx([1.0, 0.8, 0.6, 0.4, 0.2])


def test_a_budget_run_stops_at_its_step_and_records_its_plan(tmp_path):
    final = Trainer(tiny(tmp_path, "train.steps=5", "train.epochs=9", "train.log_every=1",
                         "optim.schedule=linear")).fit()
    assert (final["steps"], final["epochs"]) == (5, 2)
    run = tmp_path / "run"
    assert [r["step"] for r in kinds(run, "epoch")] == [3, 5]  # the second epoch cut after 2 of its 3 steps
    assert [r["lr"] for r in kinds(run, "step")] == pytest.approx([0.06 * (1 - s / 5) for s in range(5)])
    assert latest_checkpoint(run)[1]["plan"] == {"steps": 5, "steps_per_epoch": 3, "world": 1}


def test_a_budget_run_resumed_in_its_cut_epoch_ends_bit_identical(tmp_path):
    straight = Trainer(tiny(tmp_path / "a", "train.steps=5"))
    straight.fit()
    stopped = Trainer(tiny(tmp_path / "b", "train.steps=5"))
    stopped.prepare_run_dir()
    stopped.train_epoch()
    stopped.signals.signum = signal.SIGTERM  # as the handler sets it: the next step is the last one
    assert stopped.train_epoch() is None and (stopped.step, stopped.step_in_epoch) == (4, 1)
    stopped.save()
    del stopped
    resumed = Trainer(tiny(tmp_path / "b", "train.steps=5", "train.resume=auto"))
    assert resumed.fit()["steps"] == 5
    for a, b in zip(straight.encoder_q.state_dict().values(), resumed.encoder_q.state_dict().values()):
        assert torch.equal(a, b)
    assert torch.equal(straight.negatives.keys, resumed.negatives.keys)


def test_a_resume_whose_epochs_differ_is_refused(tmp_path):
    Trainer(tiny(tmp_path, "train.steps=4")).fit()
    resumed = Trainer(tiny(tmp_path, "train.steps=4", "train.steps_per_epoch=2", "train.resume=auto"))
    with pytest.raises(CheckpointError, match="written with 3 steps an epoch, and this run gives 2"):
        resumed.prepare_run_dir()
