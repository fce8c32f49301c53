"""Methods in a registry (``method``): one registered from outside the package (tests/user_method.py,
SimSiam) gets the parts its entry asks for, trains, is stopped by SIGTERM mid-epoch and resumes
bit-identically, alone and under torchrun; the entry's rules (the settings it ignores, the kinds
of negatives it refuses) hold for it as for the built-in ones; an unknown name is one line
listing the registered ones."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import user_method  # noqa: F401  (registers method=simsiam)
from conftest import TINY

import moco_engine
from moco_engine import ConfigError, Trainer, load_config
from moco_engine.method.moco import moco_step
from moco_engine.run.checkpoint import latest_checkpoint
from moco_engine.run.signals import StopRequested

SIMSIAM = [*TINY, "method=simsiam", "loss.temperature=0.5"]
#: Everything a checkpoint holds that a resumed run must reproduce exactly.
SECTIONS = ("encoder_q", "encoder_k", "predictor", "negatives", "optimizer", "scaler", "ranks")


def assert_same_state(a: dict, b: dict) -> None:
    for section in SECTIONS:
        flat_a, flat_b = torch.utils._pytree.tree_leaves(a[section]), torch.utils._pytree.tree_leaves(b[section])
        assert len(flat_a) == len(flat_b), section
        for x, y in zip(flat_a, flat_b):
            assert torch.equal(x, y) if isinstance(x, torch.Tensor) else x == y, section


def test_a_method_registered_from_outside_trains_stops_mid_epoch_and_resumes_bit_identically(tmp_path, capsys):
    straight = Trainer(load_config([], [*SIMSIAM, f"train.out_dir={tmp_path / 'a'}"]))
    # The parts its entry asks for: a predictor, no f_k, no negatives.
    assert straight.predictor is not None and straight.encoder_k is None
    assert type(straight.negatives).__name__ == "NoNegatives"
    final = straight.fit()
    assert final["steps"] == 6 and 0 <= final["knn_top1"] <= 100
    # TINY's queue and the loss's temperature: ignored by a method without negatives or a loss, named once.
    assert "warning: method=simsiam ignores loss.temperature=0.5, queue.size=50\n" in capsys.readouterr().err

    stopped = Trainer(load_config([], [*SIMSIAM, f"train.out_dir={tmp_path / 'b'}"]))
    step = stopped.train_step

    def signalled_in_step_4(x_1, x_2, indices):
        if stopped.step + 1 == 4:
            os.kill(os.getpid(), signal.SIGTERM)  # caught by the run's handler: the step finishes, the run saves
        return step(x_1, x_2, indices)

    stopped.train_step = signalled_in_step_4
    with pytest.raises(StopRequested, match="stopped by SIGTERM after step 4"):
        stopped.fit()
    state = latest_checkpoint(tmp_path / "b")[1]
    assert state["step"] == 4 and state["step_in_epoch"] == 1 and state["config"]["method"] == "simsiam"

    resumed = Trainer(load_config([], [*SIMSIAM, f"train.out_dir={tmp_path / 'b'}", "train.resume=auto"]))
    assert resumed.fit()["steps"] == 6
    assert_same_state(straight.state_dict(), resumed.state_dict())


@pytest.mark.slow  # three launches of 2 processes
@pytest.mark.distributed
def test_the_method_from_outside_under_torchrun_stopped_and_resumed_is_bit_identical(tmp_path):
    from test_distributed import EXACT, assert_same_ranks, stopped_and_resumed, torchrun

    module = Path(user_method.__file__)
    straight, _ = torchrun(tmp_path / "straight", *EXACT, "method=simsiam", module=module)
    assert straight[0]["world"] == 2 and straight[0]["step"] == 6 and straight[0]["encoder_k"] is None
    assert_same_ranks(straight, stopped_and_resumed(tmp_path / "stopped", "method=simsiam", module=module))


def test_an_entry_s_rules_hold_for_a_method_from_outside():
    """What an entry declares is what the config is checked against (as MoCo v3's refusal of
    end-to-end negatives, and BYOL's ignored negatives, are)."""
    moco_engine.register_method("test_needs_f_k", moco_step, refuses={"in_batch": "needs f_k, the EMA of f_q"},
                                replace=True)
    with pytest.raises(ConfigError, match=r"^config key 'negatives.kind' = 'in_batch': method=test_needs_f_k needs f_k"):
        load_config([], ["method=test_needs_f_k", "negatives.kind=in_batch"])
    cfg = load_config([], ["method=test_needs_f_k", "negatives.kind=memory_bank", "loss.name=nce"])
    with pytest.raises(ConfigError, match=r"'loss.name' = 'nce': it needs negatives.kind=memory_bank, not queue"):
        load_config([], ["method=test_needs_f_k", "loss.name=nce"])  # it takes the loss: the loss's needs hold
    assert cfg.method == "test_needs_f_k"
    from moco_engine.config.rules import ignored_settings

    assert ignored_settings(load_config([], ["method=simsiam", "negatives.kind=memory_bank", "memory_bank.momentum=0.9",
                                             "model.momentum=0.9"])) == [
        "model.momentum=0.9", "negatives.kind=memory_bank", "memory_bank.momentum=0.9"]


def test_an_unknown_method_is_one_line_listing_the_registered_ones(tmp_path):
    with pytest.raises(ConfigError, match=r"^config key 'method' = 'simclr': no method of that name is registered "
                                          r"\(registered: [^)]*\)$") as refused:
        load_config([], ["method=simclr"])
    # In this process a method registered by another test may stand anywhere among them.
    listed = str(refused.value).split("(registered: ")[1].rstrip(")").split(", ")
    assert {"moco", "moco_v3", "byol", "itc"} <= set(listed)
    r = subprocess.run([sys.executable, "-m", "moco_engine", "method=simclr", f"train.out_dir={tmp_path}"],
                       capture_output=True, text=True, timeout=120)
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and len(lines) == 1 and "Traceback" not in r.stderr, r.stderr
    assert lines[0].endswith("config key 'method' = 'simclr': no method of that name is registered "
                             "(registered: moco, moco_v3, byol, itc)")
