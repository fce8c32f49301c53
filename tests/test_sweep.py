"""moco-sweep: W&B sweep files expanded and run here, offline, resumable."""

from __future__ import annotations

import csv
import json
import os
import struct
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
from conftest import ROOT

from moco_engine.config.schema import ConfigError
from moco_engine.tools.sweep import read_sweep, run_sweep

SMOKE = str(ROOT / "configs" / "smoke.yaml")


def sweep_file(tmp_path, parameters: str, method: str = "grid", extra: str = "") -> str:
    path = tmp_path / "sweep.yaml"
    path.write_text(f"""name: test_sweep
method: {method}
metric: {{name: knn_top1, goal: maximize}}
parameters:
{parameters}
command: ["${{env}}", python, -m, moco_engine, {SMOKE}, train.steps_per_epoch=2, "${{args_no_hyphens}}"]
{extra}""")
    return str(path)


def test_grid_expands_to_every_combination_in_file_order(tmp_path):
    sweep = read_sweep(sweep_file(tmp_path, """  queue.size: {values: [16, 64, 256]}
  negatives.kind: {values: [queue, memory_bank]}
  loss.temperature: {value: 0.2}"""))
    assert len(sweep.runs) == 6 and sweep.swept == ["queue.size", "negatives.kind"] and sweep.files == [SMOKE]
    assert sweep.runs[1].overrides == [
        "train.steps_per_epoch=2", "queue.size=16", "negatives.kind=memory_bank", "loss.temperature=0.2",
    ]
    assert sweep.runs[1].params == {"queue.size": 16, "negatives.kind": "memory_bank"}
    assert len({r.name for r in sweep.runs}) == 6


def test_runs_that_differ_only_in_settings_their_choices_ignore_are_trained_once(tmp_path):
    # In-batch negatives read no queue.size: a grid over K holds the same in-batch run at every K
    # (the default K 1024 among them); it is trained once and its row repeated.
    sweep = read_sweep(sweep_file(tmp_path, """  queue.size: {values: [16, 1024, 256]}
  negatives.kind: {values: [queue, in_batch]}"""))
    same = {run.name: run.same_as for run in sweep.runs}
    assert [name for name, first in same.items() if not first] == ["000_size-16_kind-queue", "001_size-16_kind-in_batch",
                                                                   "002_size-1024_kind-queue", "004_size-256_kind-queue"]
    assert same["003_size-1024_kind-in_batch"] == same["005_size-256_kind-in_batch"] == "001_size-16_kind-in_batch"
    out = tmp_path / "out"
    (out / "001_size-16_kind-in_batch").mkdir(parents=True)
    (out / "001_size-16_kind-in_batch" / "metrics.jsonl").write_text(
        '{"kind": "final", "epoch": 0, "step": 2, "epochs": 1, "steps": 2, "knn_top1": 41.5}\n')
    run_sweep(replace(sweep, runs=[r for r in sweep.runs if "in_batch" in r.name]), out, ROOT)
    rows = (out / "results.csv").read_text().splitlines()
    assert len(rows) == 4 and all(row.endswith(",in_batch,41.5,1,2") for row in rows[1:]), rows


def test_random_draws_run_cap_distinct_runs(tmp_path):
    sweep = read_sweep(sweep_file(tmp_path, "  queue.size: {values: [16, 32, 64, 128, 256]}", "random", "run_cap: 3"))
    sizes = [r.params["queue.size"] for r in sweep.runs]
    assert len(sizes) == 3 and len(set(sizes)) == 3


@pytest.mark.parametrize("parameters,message", [
    ("  queue.sise: {values: [16, 64]}", "queue.size"),  # unknown key: the closest valid one is named
    ("  queue.size: {values: [0, 64]}", "K must be >= 1"),
    ("  queue.size: {min: 1, max: 5}", "values"),
])
def test_bad_parameters_are_errors_naming_them(tmp_path, parameters, message):
    with pytest.raises(ConfigError, match=message.replace(".", r"\.")):
        read_sweep(sweep_file(tmp_path, parameters))


@pytest.mark.slow  # a minute on 2 cores; the run-summary test keeps a sweep run in the default run
def test_smoke_sweep_runs_offline_with_wandb_and_skips_finished_runs(tmp_path):
    path = sweep_file(tmp_path, "  queue.size: {values: [16, 48]}")
    out = tmp_path / "out"
    env = {**os.environ, "WANDB_MODE": "offline", "WANDB_SILENT": "true"}
    cmd = [sys.executable, "-m", "moco_engine.tools.sweep", path, "--out", str(out)]
    first = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=tmp_path)
    assert first.returncode == 0, first.stderr[-2000:]
    runs = sorted(p for p in out.iterdir() if p.is_dir())
    assert len(runs) == 2
    for run in runs:  # one offline W&B run each, grouped under the sweep's name
        wandb_files = list((run / "wandb").glob("offline-run-*/*.wandb"))
        assert len(wandb_files) == 1
    rows = list(csv.DictReader(open(out / "results.csv")))
    assert [r["queue.size"] for r in rows] == ["16", "48"] and all(float(r["knn_top1"]) >= 0 for r in rows)
    assert (out / "knn_top1.png").stat().st_size > 1000 and "| run |" in (out / "results.md").read_text()
    again = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=tmp_path)
    assert again.returncode == 0 and again.stdout.count("finished earlier, skipped") == 2
    assert all(len(list((run / "wandb").glob("offline-run-*"))) == 1 for run in runs)  # nothing re-ran


@pytest.mark.fault("tools")
@pytest.mark.parametrize("parameters, extra, message", [
    ("  queue.size: {values: 5}", "", "'values' must be a list, not 5"),
    ("  queue.size: {values: [16, 64]}", "run_cap: many", "run_cap 'many' must be a whole number >= 1"),
    ("  queue.size: {values: [16, 64]}\n  queue.size: {values: [32]}", "", "line 6: duplicate key 'queue.size'"),
    ("  queue.size: {values: [16, 64]}", "run_cap: 0", "run_cap 0 must be a whole number >= 1"),
    ("  queue.size: {values: [16, 64]}", "bayes", "method 'bayes' is not run locally"),
    ("  queue.size: {values: [16, 64]}", "metric: {name: knn_top1}", "line 7: duplicate key 'metric'"),
])
def test_malformed_sweep_files_are_one_line_naming_the_field(tmp_path, parameters, extra, message):
    with pytest.raises(ConfigError) as e:
        method = "bayes" if extra == "bayes" else "random" if "run_cap" in extra else "grid"
        read_sweep(sweep_file(tmp_path, parameters, method, "" if extra == "bayes" else extra))
    assert message in str(e.value) and "\n" not in str(e.value)


@pytest.mark.fault("tools")
def test_a_command_word_the_sweep_would_drop_is_refused(tmp_path):
    path = tmp_path / "sweep.yaml"
    path.write_text(f"name: s\nparameters:\n  queue.size: {{values: [16]}}\n"
                    f"command: [python, train.py, --config, {SMOKE}]\n")
    with pytest.raises(ConfigError, match="command word 'train.py' is not understood here"):
        read_sweep(path)


def test_settings_go_to_wandb_in_one_form_the_dotted_keys_a_sweep_uses():
    from moco_engine.config.loading import load_config
    from moco_engine.run.folder import flat_settings

    flat = flat_settings(load_config([], ["queue.size=77"]))
    assert flat["queue.size"] == 77 and flat["track.wandb.project"] == "moco_engine"
    assert not [k for k, v in flat.items() if isinstance(v, dict)]  # no nested copy beside the dotted keys


def offline_records(run_dir: Path) -> list:
    """The records of the offline W&B run under ``run_dir``, as its ``.wandb`` file holds them: the
    file's LevelDB-log framing (W&B's format: 32 KiB blocks of checksum, length, type records)
    undone here, each record parsed by the wandb client's own protobuf ``Record``."""
    from wandb.proto import wandb_internal_pb2

    (path,) = run_dir.glob("wandb/offline-run-*/*.wandb")
    data = path.read_bytes()
    assert data[:4] == b":W&B"
    block, pos, chunks, pending = 32768, 7, [], b""
    while pos + 7 <= len(data):
        left = block - pos % block
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7]) if left >= 7 else (0, 0, 0)
        if kind == 0:  # the block's zero padding
            pos += left
            continue
        chunk, pos = data[pos + 7:pos + 7 + length], pos + 7 + length
        pending = chunk if kind in (1, 2) else pending + chunk  # full, first; middle, last
        if kind in (1, 4):
            chunks.append(pending)
    records = []
    for chunk in chunks:
        record = wandb_internal_pb2.Record()
        record.ParseFromString(chunk)
        records.append(record)
    return records


def offline_summary(run_dir: Path) -> dict:
    """The summary of the offline W&B run under ``run_dir`` (:func:`offline_records`)."""
    summary = {}
    for record in offline_records(run_dir):
        if record.WhichOneof("record_type") == "summary":
            for item in record.summary.update:
                summary[item.key or "/".join(item.nested_key)] = json.loads(item.value_json)
    return summary


def offline_history(run_dir: Path) -> list[dict]:
    """The rows the offline W&B run under ``run_dir`` logged (:func:`offline_records`), each
    ``{key: value}`` with its ``_step``."""
    return [{item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in record.history.item}
            for record in offline_records(run_dir) if record.WhichOneof("record_type") == "history"]


@pytest.mark.slow  # four offline W&B runs
def test_runs_started_as_wandb_agent_starts_them_get_folders_of_their_own_and_resume_them(tmp_path):
    import yaml
    from wandb.sdk.launch.sweeps.utils import create_sweep_command, create_sweep_command_args

    spec = yaml.safe_load((ROOT / "configs" / "sweeps" / "queue_size_smoke.yaml").read_text())
    base = tmp_path / "runs"

    def agent_run(run_id: str, params: dict) -> subprocess.CompletedProcess:
        # The words wandb agent runs: wandb's own helpers fill in the environment macros and the
        # arguments' forms; ${env} and python are the agent's own (this interpreter here).
        args = create_sweep_command_args({"args": {k: {"value": v} for k, v in params.items()}})["args_no_hyphens"]
        words = []
        for word in create_sweep_command(list(spec["command"])):
            words += {"${env}": [], "python": [sys.executable], "${args_no_hyphens}": args}.get(word, [word])
        env = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_")}
        env.update(WANDB_SWEEP_ID="sw1", WANDB_RUN_ID=run_id, WANDB_MODE="offline")
        return subprocess.run([*words, f"train.out_dir={base}", "eval.knn_every=1"], capture_output=True, text=True,
                              cwd=ROOT, env=env)

    for i, run_id in enumerate(["r1", "r2", "r3"]):
        r = agent_run(run_id, {"queue.size": 16 * (i + 1), "train.epochs": 2})
        assert r.returncode == 0, r.stderr
        assert f"run folder {base / 'sweep-sw1' / run_id}" in r.stdout
    assert sorted(p.name for p in (base / "sweep-sw1").iterdir()) == ["r1", "r2", "r3"]
    for run_id in ("r1", "r2", "r3"):
        run_dir = base / "sweep-sw1" / run_id
        records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
        evals = [r["knn_top1"] for r in records if r["kind"] == "eval" and r["epoch"] >= 0]
        # The sweep file's metric, in the summary W&B would rank the run by: the trained run's
        # best (the random network's baseline, epoch -1, is not a result).
        assert spec["metric"]["name"] == "eval/knn_top1" and len(evals) == 2
        assert offline_summary(run_dir)["eval/knn_top1"] == pytest.approx(max(evals))
    r = agent_run("r1", {"queue.size": 16, "train.epochs": 3})  # the agent starts r1 again
    assert r.returncode == 0 and "resumed from" in r.stdout, r.stderr


def test_the_sweep_metric_is_the_best_over_every_segment_of_a_run(tmp_path):
    from moco_engine.tools.sweep import metric_value

    lines = [{"kind": "eval", "knn_top1": 30.0}, {"kind": "step", "knn_top1": 99.0}, {"kind": "eval", "knn_top1": 41.5},
             {"kind": "stopped"}, {"kind": "eval", "knn_top1": 38.0}, {"kind": "final", "knn_top1": 38.0}]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    assert metric_value(tmp_path, "eval/knn_top1", "maximize") == 41.5  # a resumed run: all its segments
    assert metric_value(tmp_path, "eval/knn_top1", "minimize") == 30.0
    assert metric_value(tmp_path, "knn_top1", "maximize") == 38.0  # a bare key: the final record's


def test_the_run_summary_holds_the_best_knn_over_a_resumed_run(tmp_path, monkeypatch):
    from conftest import TINY

    from moco_engine.config.loading import load_config
    from moco_engine.run import folder as run_module
    from moco_engine.run.trainer import Trainer

    summaries = []

    class Recorder:
        def log(self, record):
            pass

        def summarize(self, values):
            summaries.append(dict(values))

        def close(self):
            pass

    def start_wandb(cfg, run_dir, run_id, tracker):
        tracker.add_backend(Recorder())
        return run_id

    monkeypatch.setattr(run_module, "start_wandb", start_wandb)
    out = tmp_path / "run"
    Trainer(load_config([], [*TINY, f"train.out_dir={out}", "train.epochs=1", "eval.knn_every=1"])).fit()
    resumed = Trainer(load_config([], [*TINY, f"train.out_dir={out}", "train.epochs=2", "train.resume=auto",
                                      "eval.knn_every=1"]))
    resumed.fit()
    evals = [json.loads(line)["knn_top1"] for line in (out / "metrics.jsonl").read_text().splitlines()
             if json.loads(line)["kind"] == "eval"]
    assert len(evals) == 2 and summaries[-1]["eval/knn_top1"] == max(evals)


def test_line_figures_carry_title_labels_legend_and_a_log2_axis_at_the_data():
    from moco_engine.run.plots import line_figure

    fig = line_figure({"queue": [(256, 60.0), (4096, 70.5)], "memory bank": [(256, 55.0), (4096, 58.0)]},
                      "sweep queue_size", "queue.size", "kNN top-1 accuracy (%)", log_x=True, references={"chance": 10.0})
    ax = fig.axes[0]
    assert ax.get_title() == "sweep queue_size" and ax.get_xlabel() == "queue.size"
    assert ax.get_ylabel() == "kNN top-1 accuracy (%)"
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["queue", "memory bank", "chance"]
    assert ax.get_xscale() == "log" and list(ax.get_xticks()) == [256, 4096]
