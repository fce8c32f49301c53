"""The GPU proof kit on a CPU: every job of its cpu mode, its reports, its time budget."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from moco_engine.tools import proof, proof_report

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow  # a minute or more on 2 cores; the shell script's test runs the kit in the default run
def test_cpu_mode_runs_the_kit_end_to_end_and_writes_both_reports(tmp_path):
    out, work = tmp_path / "out", tmp_path / "work"
    assert proof.main(["cpu", str(out), "--work", str(work)]) == 0
    # At most 8 files come back from the GPU machine: the kit writes exactly these.
    assert sorted(p.name for p in out.iterdir()) == [
        "demo_knn.png", "demo_metrics.jsonl", "proof_demo_cpu.json", "proof_demo_cpu.log", "proof_demo_cpu.md",
        "proof_quick_cpu.json", "proof_quick_cpu.log", "proof_quick_cpu.md"]

    quick = json.loads((out / "proof_quick_cpu.json").read_text())
    jobs = {j["name"]: j for j in quick["jobs"]}
    assert {name: j["status"] for name, j in jobs.items()} == {
        "gpu tests": "ok", "tiny-strided": "ok", "tiny-cuda-graphs": "skipped: needs CUDA", "tiny-ops": "ok"}
    (timed,) = jobs["tiny-strided"]["result"]
    assert timed["split_bn"] == "strided" and timed["moco_s"] > 0 and "data + step" in timed["data_s"]
    assert timed["ops"]["moco"]["compute"] > timed["ops"]["supervised"]["compute"]
    (counted,) = jobs["tiny-ops"]["result"]
    assert "MoCo, split-BN strided" in counted["ops_by_form"]
    tests_log = (out / "proof_quick_cpu.log").read_text().split("===== gpu tests")[1].split("===== tiny-strided")[0]
    assert " skipped" in tests_log and "passed" not in tests_log  # no CUDA here: every gpu test skips
    md = (out / "proof_quick_cpu.md").read_text()
    assert "| tiny-cuda-graphs | skipped: needs CUDA |" in md
    assert re.search(r"\| tiny-strided \| \d+\.\d\d \| [\d,]+ \|", md.split("MoCo / supervised")[1])  # ratio, images/s

    demo = json.loads((out / "proof_demo_cpu.json").read_text())
    assert [j["status"] for j in demo["jobs"]] == ["ok", "skipped: needs CUDA", "ok"]
    assert demo["epochs_done"] == 2 and set(demo["knn_curve"]) == {"0", "1", "2"}  # 0: the random network
    assert demo["first_step_s"] > 0 and demo["compiled"]["epochs_done"] == 0
    (train,) = [j for j in demo["jobs"] if j["name"] == "demo train"]
    assert proof.DEMO_COMMAND.split(" ", 1)[1].replace("configs/", f"{ROOT}/configs/") in train["command"]
    assert 0 <= demo["probe_top1"] <= 100 and demo["median_epoch_s"] > 0
    md = (out / "proof_demo_cpu.md").read_text()
    for epoch, ref in proof_report.REFERENCE.items():
        assert f"| {epoch} |  | {ref} |  |" in md  # the reference's points, beside this run's (none here)
    assert "| kNN top-1 >= 77.7 at epoch 200 |" in md and "not met" in md
    assert (out / "demo_knn.png").stat().st_size > 1000


def test_the_gpu_demo_is_one_command_in_the_readme_the_next_lines_and_the_kit(tmp_path):
    from moco_engine.tools.cli import closing_lines

    readme = (ROOT / "README.md").read_text()
    assert f"\n{proof.DEMO_COMMAND}\n" in readme  # a line of its own in a code block
    assert "train.compile" not in proof.DEMO_COMMAND  # it trains from its first seconds on any GPU
    assert any(proof.DEMO_COMMAND in line for line in closing_lines({"knn_top1": 50.0, "epochs": 1}, tmp_path))
    eager, compiled, _ = proof.demo_jobs(tmp_path, tmp_path / "cifar10.tar.gz", cpu=False, budget_s=540.0)
    command = [*(str(ROOT / f) for f in proof.DEMO_FILES), *proof.DEMO_OVERRIDES]  # after python -c CODE
    assert eager.argv[3:3 + len(command)] == command and not any("compile" in a for a in eager.argv[3:])
    assert compiled.argv[3:3 + len(command) + 1] == [*command, *proof.COMPILED_OVERRIDES]
    assert eager.cap_s + compiled.cap_s + proof.PROBE_CAP_S <= 540.0


def test_a_relative_out_dir_is_the_callers_not_the_checkouts(tmp_path):
    caller = tmp_path / "elsewhere"
    caller.mkdir()
    # --only a job no mode has: the kit writes its (empty) reports and runs nothing.
    done = subprocess.run(["bash", str(ROOT / "tools" / "gpu_proof.sh"), "cpu", "out", "--only", "none",
                           "--work", "work"], cwd=caller, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert (caller / "out" / "proof_quick_cpu.log").is_file() and (caller / "work").is_dir()
    assert not (ROOT / "out").exists() and not (ROOT / "work").exists()


def test_a_job_past_its_limit_gets_sigterm_and_the_budget_leaves_later_jobs_unstarted(tmp_path):
    marker = tmp_path / "terminated"
    # A stand-in for a training run: it saves (writes the marker) on SIGTERM and exits 143.
    code = ("import signal, sys, time, pathlib\n"
            f"def stop(*_): pathlib.Path({str(marker)!r}).write_text('saved'); sys.exit(143)\n"
            "signal.signal(signal.SIGTERM, stop)\n"
            "print('running', flush=True)\n"
            "time.sleep(60)\n")
    slow = proof.Job("slow", [sys.executable, "-c", code], cap_s=3.0)
    later = proof.Job("later", [sys.executable, "-c", "print('never')"], cap_s=5.0)
    needs = proof.Job("graphs", [sys.executable, "-c", "print('never')"], cap_s=5.0, needs=("cuda",))
    reports = []
    proof.run_jobs([needs, slow, later], proof.MIN_START_S + 2.5, tmp_path, tmp_path, "t", False,
                   lambda jobs: reports.append([j.status for j in jobs]) or {})
    assert needs.status == "skipped: needs CUDA"
    assert slow.status == "stopped at its limit of 3 s" and slow.returncode == 143 and marker.read_text() == "saved"
    assert later.status == "not run: time budget spent"
    assert len(reports) == 3  # the report is rewritten after every job
    assert "\nrunning\n" in (tmp_path / "proof_t.log").read_text()  # the job's own output, after the header


@pytest.mark.slow  # 12 s of the kit's own start-up
def test_the_shell_script_runs_the_kit_with_the_given_interpreter(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_")}
    env["PYTHON"] = sys.executable
    done = subprocess.run([str(ROOT / "tools" / "gpu_proof.sh"), "cpu", str(tmp_path / "out"), "--work",
                           str(tmp_path / "work"), "--only", "gpu tests"], env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr
    assert "quick_cpu: 1 of 1 jobs ok" in done.stdout
    quick = json.loads((tmp_path / "out" / "proof_quick_cpu.json").read_text())
    assert [j["name"] for j in quick["jobs"]] == ["gpu tests"] and quick["device"].startswith("cpu")


def test_the_demo_without_its_archive_is_a_one_line_error(tmp_path, capsys):
    assert proof.main(["demo", str(tmp_path / "out"), "--data", str(tmp_path / "missing.tar.gz")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: --data ") and "missing.tar.gz: no such archive" in err and "\n" not in err


def test_every_gpu_job_is_a_valid_command_line(tmp_path):
    """A typo would cost GPU minutes: each quick job's options parse and pass moco-bench's checks,
    and the demo's training command is a valid config."""
    from moco_engine.config.loading import load_config
    from moco_engine.tools.bench import CASES, bench_parser, check_arguments

    data = tmp_path / "cifar10.tar.gz"
    data.write_bytes(b"")
    jobs = proof.quick_jobs(tmp_path, data, cpu=False)
    tests = [j for j in jobs if j.argv[1:3] == ["-m", "pytest"]]
    assert jobs[0] is tests[0] and [j.name for j in tests] == ["gpu tests", "gpu tests, CUDA graphs"]
    assert all(j.needs_cuda for j in jobs if j not in tests)
    names = [j.name for j in jobs]
    # Issue 34's telling jobs, in this order, before the rest (Issue 36's shards beside ResNet-50's step).
    telling = ["gpu tests", "r18-plain-bn", "r18-grouped", "r18-grouped-cuda-graphs", "r18-plain-bn-cuda-graphs",
               "r18-strided", "r50-224", "r50-shards-gpu-decode", "r50-shards-cpu-decode", "vit-s-224", "vit-t-cifar", "bert-base", "bert-scifact", "scifact-gpu-epochs"]
    assert names[:len(telling)] == telling
    assert {"r18-one_pass", "r18-per_slice", "r18-strided-nchw", "r50-224-compiled", "r18-queue-65536", "r18-ops",
            "r18-data", "bert-scifact-buckets", "r18-grouped-compiled"} <= set(names)
    (scifact,) = [j for j in jobs if j.run_dir is not None]
    recipes = [a for a in scifact.argv if a.endswith(".yaml")]
    cfg = load_config(recipes, [a for a in scifact.argv[3:] if "=" in a and not a.endswith(".yaml")])
    assert cfg.train.cuda_graphs and cfg.model.params["length_buckets"] == 1 and cfg.train.steps == 186
    for job in (j for j in jobs if j not in tests and j.run_dir is None):
        # The shards jobs wait for their folder (tools/make_imagenet_sample.py, moco-shard), a data job for its archive.
        assert job.argv[1:3] == ["-m", "moco_engine.tools.bench"]
        assert job.status == "not run" or job.status == f"skipped: no data at {proof.SHARDS}" and "shards" in job.name
        args = bench_parser().parse_args(job.argv[3:])
        check_arguments(args)
        assert all(case in CASES for case in args.cases) and args.json == str(job.json_out)

    train, compiled, probe = proof.demo_jobs(tmp_path, data, cpu=False, budget_s=540)
    assert train.cap_s == 540 - proof.COMPILED_CAP_S - proof.PROBE_CAP_S and "linear.cached=true" in probe.argv
    for job in (compiled, train):
        files = [a for a in job.argv if a.endswith(".yaml")]
        overrides = [a for a in job.argv[3:] if "=" in a and not a.endswith(".yaml")]
        cfg = load_config(files, overrides)
        assert cfg.train.epochs == 200 and cfg.eval.knn_every == 10 and cfg.data.root == str(data)
        assert cfg.data.pipeline == "device" and cfg.model.bn_splits == 8 and cfg.track.wandb.mode == "disabled"
        assert cfg.train.compile == (job is compiled) and cfg.train.out_dir != str(tmp_path / "demo") or job is train


def test_the_job_list_is_data_of_the_checkout_and_a_bad_one_is_one_line(tmp_path, capsys):
    """The plan of the day is tools/proof_jobs.yaml's, not the installed package's: another list
    runs with --jobs, and a record the kit cannot read is named with its file and job."""
    import inspect

    assert "r18-cifar" not in inspect.getsource(proof) and proof.JOBS_FILE == ROOT / "tools" / "proof_jobs.yaml"
    plan = tmp_path / "jobs.yaml"
    plan.write_text("cpu:\n  - {name: mine, bench: [tiny, --ops], repeats: 2, needs: [cuda]}\n"
                    "  - {name: on data, train: [configs/smoke.yaml, 'data.root={data}'], run: r, needs: [data]}\n")
    mine, on_data = proof.quick_jobs(tmp_path, tmp_path / "none.tar.gz", cpu=True, plan=plan)
    assert mine.argv[3:] == ["tiny", "--repeats", "2", "--warmup", "2", "--json", str(tmp_path / "bench_mine.json"), "--ops"]
    assert mine.needs_cuda and mine.status == "not run"
    assert str(ROOT / "configs" / "smoke.yaml") in on_data.argv and f"data.root={tmp_path / 'none.tar.gz'}" in on_data.argv
    assert on_data.run_dir == tmp_path / "r" and on_data.status == f"skipped: no data at {tmp_path / 'none.tar.gz'}"
    plan.write_text("cpu:\n  - {name: typo, bench: [tiny], needs: [cudaa]}\n")
    assert proof.main(["cpu", str(tmp_path / "out"), "--work", str(tmp_path / "work"), "--jobs", str(plan)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"error: {plan}, cpu job 1 (typo): ") and "needs among cuda" in err and "\n" not in err


def test_a_quick_run_without_the_archive_lists_the_data_job_as_skipped(tmp_path):
    jobs = proof.quick_jobs(tmp_path, tmp_path / "missing.tar.gz", cpu=False)
    (data_job,) = [j for j in jobs if j.name == "r18-data"]
    assert data_job.status == f"skipped: no data at {tmp_path / 'missing.tar.gz'}"
    proof.run_jobs([data_job], 60.0, tmp_path, tmp_path, "t", True, lambda jobs: {})
    assert data_job.status.startswith("skipped") and data_job.returncode is None  # never started


def test_a_signal_to_the_kit_reaches_the_running_job_and_no_job_starts_after_it(tmp_path):
    marker = tmp_path / "terminated"
    job_code = ("import signal, sys, time, pathlib\n"
                f"def stop(*_): pathlib.Path({str(marker)!r}).write_text('saved'); sys.exit(143)\n"
                "signal.signal(signal.SIGTERM, stop)\n"
                "print('running', flush=True)\n"
                "time.sleep(60)\n")
    kit = ("import json, signal, sys\n"
           "from moco_engine.tools import proof\n"
           "signal.signal(signal.SIGTERM, proof.Stopped.handle)\n"
           f"jobs = [proof.Job('slow', [sys.executable, '-c', {job_code!r}], 50.0),"
           " proof.Job('later', [sys.executable, '-c', 'print(1)'], 5.0)]\n"
           f"proof.run_jobs(jobs, 100.0, proof.Path({str(tmp_path)!r}), proof.Path({str(tmp_path)!r}), 't', False,"
           " lambda done: {})\n"
           "print(json.dumps([j.status for j in jobs]))\n")
    kit_process = subprocess.Popen([sys.executable, "-c", kit], stdout=subprocess.PIPE, text=True)
    log = tmp_path / "proof_t.log"
    for _ in range(300):  # the job is running once it has printed (its own line: the header quotes the code)
        if log.exists() and "\nrunning\n" in log.read_text():
            break
        time.sleep(0.1)
    kit_process.send_signal(signal.SIGTERM)
    out, _ = kit_process.communicate(timeout=60)
    assert json.loads(out.splitlines()[-1]) == ["stopped by signal 15 to the kit (exit 143)", "not run: the kit got signal 15"]
    assert marker.read_text() == "saved"  # the job's own session got the signal: it saved and left
