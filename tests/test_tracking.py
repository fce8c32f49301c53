"""What a run reports: every metric in metrics.jsonl, the collapse warning, the augmentation
preview, and W&B (offline: these machines have no network)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from conftest import TINY

from moco_engine.config.loading import load_config
from moco_engine.config.schema import UserError
from moco_engine.run.checkpoint import latest_checkpoint
from moco_engine.run.folder import PREVIEW_FILE
from moco_engine.run.tracking import wandb_mode
from moco_engine.run.trainer import Trainer

STEP_METRICS = {
    "loss", "lr", "momentum", "top1", "top5", "logit_pos", "logit_neg", "embed_std", "qk_weight_dist",
    "samples_per_s", "img_per_s", "mem_peak_gib",
}


def records(run: Path, kind: str) -> list[dict]:
    return [r for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if r["kind"] == kind]


def run_tiny(tmp_path: Path, *extra: str) -> Path:
    out = tmp_path / "run"
    Trainer(load_config([], [*TINY, f"train.out_dir={out}", *extra])).fit()
    return out


@pytest.mark.parametrize("kind,source_metrics", [
    ("queue", {"queue_fill", "queue_age_mean", "queue_age_max", "queue_same_instance"}),
    ("memory_bank", {"bank_staleness_batch", "bank_staleness_mean"}),
])
def test_metrics_jsonl_holds_every_metric(tmp_path, kind, source_metrics, monkeypatch):
    monkeypatch.delenv("WANDB_MODE", raising=False)
    out = run_tiny(tmp_path, f"negatives.kind={kind}")
    step = records(out, "step")[0]
    missing = (STEP_METRICS | source_metrics) - set(step)
    assert not missing, f"step records lack {sorted(missing)}"
    assert 0 < step["embed_std"] < 1 and step["qk_weight_dist"] >= 0 and step["mem_peak_gib"] > 0
    assert {"knn_top1", "knn_top5"} <= set(records(out, "eval")[-1])
    assert {"epoch_s", "negatives_bytes"} <= set(records(out, "epoch")[0])


@pytest.mark.parametrize("pipeline", ["cpu", "device"])
def test_augmentation_preview_is_written_at_the_start(tmp_path, pipeline):
    from PIL import Image

    out = run_tiny(tmp_path, f"data.pipeline={pipeline}", "train.epochs=1", "track.preview=3")
    with Image.open(out / PREVIEW_FILE) as img:
        assert img.format == "PNG" and img.size[0] > img.size[1]  # one row of 3 pairs


def test_the_preview_labels_each_view_and_leaves_a_gap_between_pairs():
    import numpy as np

    from moco_engine.run.plots import preview_figure

    fig = preview_figure(np.random.default_rng(0).uniform(size=(10, 8, 8, 3)))  # 5 pairs: 2 rows
    titles = [ax.get_title() for ax in fig.axes]
    assert titles == ["query 1", "key 1", "query 2", "key 2", "query 3", "key 3", "query 4", "key 4", "query 5", "key 5"]
    fig.canvas.draw()
    boxes = [ax.get_position() for ax in fig.axes[:4]]
    within, between = boxes[1].x0 - boxes[0].x1, boxes[2].x0 - boxes[1].x1
    assert between > 2 * within  # the pairs stand apart


def test_collapse_warning_once_an_epoch(tmp_path, capsys):
    run_tiny(tmp_path, "track.collapse_threshold=100")  # any spread is below this: must warn
    err = capsys.readouterr().err
    assert err.count("embeddings collapsing") == 2  # 2 epochs, once each
    assert "track.collapse_threshold 100" in err


def test_wandb_mode_falls_back_to_offline_without_a_key(monkeypatch, tmp_path):
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.delenv("WANDB_SWEEP_ID", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.netrc
    mode, notice = wandb_mode("online")
    assert mode == "offline" and "no API key" in notice
    assert wandb_mode("disabled") == ("disabled", None) and wandb_mode("") == ("disabled", None)
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    assert wandb_mode("online") == ("online", None)
    monkeypatch.setenv("WANDB_SWEEP_ID", "abc")  # started by `wandb agent`: an unset mode logs online
    assert wandb_mode("") == ("online", None) and wandb_mode("disabled") == ("disabled", None)


def test_a_mode_in_the_config_wins_over_wandb_mode_and_an_unset_one_follows_it(monkeypatch):
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    monkeypatch.setenv("WANDB_MODE", "offline")
    assert wandb_mode("disabled") == ("disabled", None) and wandb_mode("online") == ("online", None)
    assert wandb_mode("") == ("offline", None)
    monkeypatch.setenv("WANDB_MODE", "dryrun")  # wandb's older name
    assert wandb_mode("") == ("offline", None)
    monkeypatch.setenv("WANDB_MODE", "sideways")
    with pytest.raises(UserError, match="WANDB_MODE='sideways' is not a W&B mode"):
        wandb_mode("")


def test_an_api_key_in_the_netrc_file_named_by_netrc_is_found(monkeypatch, tmp_path):
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.netrc
    assert wandb_mode("online")[0] == "offline"
    netrc_file = tmp_path / "elsewhere" / "netrc"
    netrc_file.parent.mkdir()
    netrc_file.write_text("machine api.wandb.ai\n  login user\n  password " + "k" * 40 + "\n")
    netrc_file.chmod(0o600)
    monkeypatch.setenv("NETRC", str(netrc_file))
    assert wandb_mode("online") == ("online", None)


def test_wandb_offline_run_is_continued_by_a_resumed_training(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    out = run_tiny(tmp_path, "train.epochs=1")
    run_id = latest_checkpoint(out)[1]["wandb_run_id"]
    assert run_id
    Trainer(load_config([], [*TINY, f"train.out_dir={out}", "train.resume=auto"])).fit()
    folders = sorted((out / "wandb").glob("offline-run-*"))
    assert len(folders) == 2 and all(f.name.endswith(run_id) for f in folders)
    assert all(list(f.glob("*.wandb")) for f in folders)


def test_progress_is_a_bar_on_a_terminal_and_plain_step_lines_in_a_log_file(tmp_path, capsys, monkeypatch):
    from moco_engine.run.tracking import Tracker

    (tmp_path / "log").mkdir()
    (tmp_path / "tty").mkdir()

    def one_step(tracker):
        tracker.start_epoch(0, 1, 2)
        tracker.advance()
        tracker.log("step", {"loss": 4.25, "lr": 0.06}, 0, 1)
        tracker.end_epoch()
        tracker.close()

    one_step(Tracker(tmp_path / "log", progress=True))  # capsys's stdout is no terminal
    out = capsys.readouterr().out
    assert out.splitlines() == ["[step] epoch 1  step 1  loss 4.25  lr 0.06"] and "\r" not in out
    monkeypatch.setattr(sys.stdout, "isatty", lambda: True)
    one_step(Tracker(tmp_path / "tty", progress=True))
    out = capsys.readouterr().out
    assert "[step]" not in out and "loss=4.25" in out.split("\r")[-1]  # the bar's last frame: this step's loss
