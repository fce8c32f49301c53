"""The GPU proof kit: one prepared call that measures the engine on a GPU and writes what it found.

    tools/gpu_proof.sh quick OUT_DIR     # tests and moco-bench cases, at most 4 minutes on a GPU
    tools/gpu_proof.sh demo OUT_DIR      # the README's CIFAR-10 demo command and its compiled form, at most 9 minutes
    tools/gpu_proof.sh cpu OUT_DIR       # both, with tiny cases, on a CPU (the test suite runs it)

GPU time comes rarely and briefly, so the kit is built not to lose any of it:

- every job (a test run, one ``moco-bench`` case, the training run, the probe) runs in a process
  of its own, so a crash or a compiler failure costs that job alone;
- the mode has a time budget (``--budget``) and each job a cap: a job that would start with too
  little time left is listed as not run, and one that overruns is sent SIGTERM (a training run
  then saves and exits) and, 30 s later, SIGKILL;
- the report (``proof_<mode>.json`` and ``.md``, and one log of every job's output) is rewritten
  after each job, so a call cut short still brings back what finished;
- a SIGTERM or SIGINT to the kit (the device tool's timeout) is passed on to the running job,
  whose own session would otherwise outlive the kit, and no further job starts.

The jobs are ``moco-bench`` and ``moco-train`` themselves (one implementation for the kit and the
commands); this module only orders, times and reports them. The quick mode's jobs are data, the
checkout's ``tools/proof_jobs.yaml`` (each job: its command, its cap, what it needs), so the plan of
the day changes without the package; the demo's are the README's command. ``docs/benchmarking.md``
("Proving it on a GPU") says which wheels to bring and the one call to make.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from moco_engine.tools.proof_report import (
    bench_rows,
    demo_summary,
    environment,
    training_figures,
    write_report,
)

MODES = ("quick", "demo", "cpu")
#: The checkout the kit runs from: its configs/ and tests/ are the jobs' (jobs run in the work folder).
ROOT = Path(__file__).resolve().parents[2]
BUDGETS = {"quick": 240.0, "demo": 540.0, "cpu": 240.0}
#: The README's GPU demo, written once: README.md's command, ``moco-train``'s "Next:" line and
#: the kit's demo job are this (a test holds the three together). Eager: it trains from its first
#: seconds on any GPU; compilation is the kit's second demo job until it is measured to pay.
DEMO_FILES = ("configs/experiment/cifar10_demo.yaml", "configs/data/cifar10_full.yaml")
DEMO_OVERRIDES = ("train.save_every=20",)
DEMO_COMMAND = " ".join(("moco-train", *DEMO_FILES, *DEMO_OVERRIDES))
#: The demo's compiled form (the kit's "demo compiled" job): the same command and these.
COMPILED_OVERRIDES = ("train.compile=true",)
COMPILED_CAP_S = 150.0  # enough for its compilation, its first step and a few epochs
PROBE_CAP_S = 45.0
#: The quick mode's job lists (``quick``, and ``cpu`` for its tiny form), read by :func:`quick_jobs`.
JOBS_FILE = ROOT / "tools" / "proof_jobs.yaml"
#: SciFact in BEIR's layout (the shared data folder beside the checkout), for the text GPU recipe's job.
SCIFACT = ROOT.parent / "shared" / "data" / "scifact-beir.tar.xz"
#: Full-size JPEGs as shards (tools/make_imagenet_sample.py, then moco-shard; docs/scale.md, "Image
#: sets larger than memory"), for the input path at 224 px.
SHARDS = ROOT / ".data" / "imagenet-sample-shards"
#: What a job may need: CUDA, a Python package, or a path (named ``{name}`` in its command).
NEEDS = ("cuda", "transformers", "data", "shards", "scifact")
MIN_START_S = 10.0  # a job is not started with less time than this left
GRACE_S = 30.0  # from SIGTERM to SIGKILL: a training run's save


class Stopped:
    """A SIGTERM or SIGINT to the kit (the device tool's timeout, Ctrl-C): passed on to the
    running job's process group, whose own session would otherwise outlive the kit; no job
    starts after it, and the report says so."""

    signum: int | None = None
    child: subprocess.Popen | None = None

    @classmethod
    def handle(cls, signum: int, frame) -> None:
        cls.signum = signum
        if cls.child is not None and cls.child.poll() is None:
            os.killpg(cls.child.pid, signal.SIGTERM)


@dataclass
class Job:
    """One command of the kit and what it needs (:data:`NEEDS`): a job that needs CUDA is listed
    as skipped on a CPU, one whose data or package is missing wherever it is."""

    name: str
    argv: list[str]
    cap_s: float
    needs: tuple[str, ...] = ()
    json_out: Path | None = None  # where the command writes its figures (moco-bench --json)
    run_dir: Path | None = None  # a training job's run folder (its figures read from metrics.jsonl)
    status: str = "not run"
    seconds: float = 0.0
    returncode: int | None = None
    result: object = None
    notes: list[str] = field(default_factory=list)

    @property
    def needs_cuda(self) -> bool:
        return "cuda" in self.needs


def module(name: str, *args: str) -> list[str]:
    """The command line of ``python -m moco_engine.tools.<name> args``, with this interpreter."""
    return [sys.executable, "-m", f"moco_engine.tools.{name}", *args]


def entry(function: str, *args: str) -> list[str]:
    """The command line of one of the package's console scripts (``cli.eval_main``, ...)."""
    mod, fn = function.rsplit(".", 1)
    return [sys.executable, "-c", f"import sys; from moco_engine.tools.{mod} import {fn}; sys.exit({fn}(sys.argv[1:]))", *args]


# ======================================================================================= jobs
class PlanError(ValueError):
    """A job list the kit cannot read: one line naming the file and the job."""


def quick_jobs(out: Path, data: Path, cpu: bool, plan: Path = JOBS_FILE) -> list[Job]:
    """The quick mode's jobs (``plan``'s ``cpu`` list on a CPU, else its ``quick`` list), in its
    order, those whose needs are missing here marked as skipped."""
    import yaml

    try:
        lists = yaml.safe_load(plan.read_text())
    except (OSError, yaml.YAMLError) as e:
        raise PlanError(f"{plan}: cannot read the kit's job list ({e})".replace("\n", " ")) from None
    mode = "cpu" if cpu else "quick"
    if not isinstance(lists, dict) or not isinstance(lists.get(mode), list):
        raise PlanError(f"{plan}: no list of jobs under '{mode}:'")
    paths = {"data": data, "shards": SHARDS, "scifact": SCIFACT}
    jobs = [read_job(record, out, paths, f"{plan}, {mode} job {k + 1}") for k, record in enumerate(lists[mode])]
    text = importlib.util.find_spec("transformers") is not None
    for job in jobs:
        missing = [need for need in job.needs if need in paths and not paths[need].exists()]
        if missing:
            job.status = f"skipped: no data at {paths[missing[0]]}"
        if "transformers" in job.needs and not text:
            job.status = "skipped: transformers is not installed (docs/benchmarking.md, 'Proving it on a GPU')"
    return jobs


def read_job(record: dict, out: Path, paths: dict[str, Path], where: str) -> Job:
    """One record of the job list as a :class:`Job` (see ``tools/proof_jobs.yaml``'s head)."""
    if not isinstance(record, dict) or not isinstance(record.get("name"), str):
        raise PlanError(f"{where}: a job is a mapping with a name, not {record!r}")
    where = f"{where} ({record['name']})"
    unknown = set(record) - {"name", "bench", "tests", "train", "run", "repeats", "cap_s", "needs"}
    commands = [key for key in ("bench", "tests", "train") if key in record]
    needs = tuple(record.get("needs", ()))
    if unknown or len(commands) != 1 or set(needs) - set(NEEDS):
        raise PlanError(f"{where}: one of bench, tests, train; needs among {', '.join(NEEDS)}"
                        + (f"; unknown keys {', '.join(sorted(unknown))}" if unknown else ""))
    cap_s = float(record.get("cap_s", 60.0))
    if commands == ["tests"]:
        return Job(record["name"], [sys.executable, "-m", "pytest", "-q", "-m", "gpu", "-k", str(record["tests"]), "-o",
                                    "addopts=-ra", "-p", "no:cacheprovider", str(ROOT / "tests" / "test_gpu.py")],
                   cap_s, needs)
    try:
        args = [str(a).format_map(paths) for a in record[commands[0]]]
    except (KeyError, ValueError) as e:
        raise PlanError(f"{where}: {e} is no path a command may name ({', '.join(paths)})") from None
    if commands == ["train"]:
        run = out / str(record.get("run", record["name"]))
        files = [str(ROOT / a) if a.endswith(".yaml") and "=" not in a else a for a in args]
        return Job(record["name"], entry("cli.train_main", *files, f"train.out_dir={run}", "train.resume=auto",
                                         "track.progress=false", "track.wandb.mode=disabled"), cap_s, needs, run_dir=run)
    repeats = int(record.get("repeats", 20))
    json_out = out / f"bench_{record['name']}.json"
    argv = module("bench", args[0], "--repeats", str(repeats), "--warmup", str(min(5, repeats)), "--json", str(json_out),
                  *args[1:])
    return Job(record["name"], argv, cap_s, needs, json_out)


def demo_jobs(work: Path, data: Path, cpu: bool, budget_s: float) -> list[Job]:
    """The README's demo command (what the budget leaves after the others), its compiled form
    (capped: the compilation, the first step, a few epochs) and the eager run's cached probe."""
    if cpu:  # synthetic images, a few steps: the same jobs, probe and report
        recipe = ["data.name=synthetic", "data.synthetic_size=64", "data.pipeline=device", "model.cifar_stem=false",
                  "model.bn_splits=2", "optim.batch_size=16", "queue.size=64", "train.epochs=2", "eval.knn_every=1",
                  "train.device=cpu"]
        probe = ["linear.epochs=2", "linear.cached=true"]
    else:
        recipe = [f"data.root={data}", "train.log_every=20"]  # a step line every 20: a cut epoch shows its progress
        probe = ["linear.cached=true"]

    def train(name: str, folder: str, extra: tuple[str, ...], cap_s: float) -> Job:
        return Job(name, entry("cli.train_main", *(str(ROOT / f) for f in DEMO_FILES), *DEMO_OVERRIDES, *extra, *recipe,
                               f"train.out_dir={work / folder}", "train.resume=auto", "track.progress=false",
                               "track.preview=0", "track.wandb.mode=disabled"), cap_s)

    eager_cap = max(budget_s - COMPILED_CAP_S - PROBE_CAP_S, 30.0)
    compiled = train("demo compiled", "demo_compiled", COMPILED_OVERRIDES, COMPILED_CAP_S)
    compiled.needs = ("cuda",) if cpu else ()  # inductor's C++ compilation takes minutes on a CPU (tests/test_compile.py covers it)
    return [train("demo train", "demo", (), eager_cap), compiled,
            Job("demo probe", entry("cli.eval_main", "linear", str(work / "demo"), *probe), PROBE_CAP_S)]


# ===================================================================================== running
def run_job(job: Job, deadline: float, log, cwd: Path) -> None:
    """Run ``job`` in ``cwd`` within its cap and the mode's deadline; record its status and seconds."""
    left = deadline - time.monotonic()
    if Stopped.signum is not None:
        job.status = f"not run: the kit got signal {Stopped.signum}"
        return
    if left < MIN_START_S:
        job.status = "not run: time budget spent"
        return
    limit = min(job.cap_s, left)
    log.write(f"\n===== {job.name}: {' '.join(job.argv)}\n")
    log.flush()
    start = time.monotonic()
    # A session of its own: SIGTERM reaches the job and its workers, not the kit.
    path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)
    child = Stopped.child = subprocess.Popen(job.argv, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                                             cwd=cwd, env={**os.environ, "PYTHONPATH": path, "PYTHONUNBUFFERED": "1"})
    try:
        job.returncode = child.wait(timeout=limit)
        job.status = "ok" if job.returncode == 0 else f"failed (exit {job.returncode})"
        if Stopped.signum is not None:
            job.status = f"stopped by signal {Stopped.signum} to the kit (exit {job.returncode})"
    except subprocess.TimeoutExpired:
        os.killpg(child.pid, signal.SIGTERM)
        try:
            job.returncode = child.wait(timeout=GRACE_S)
        except subprocess.TimeoutExpired:
            os.killpg(child.pid, signal.SIGKILL)
            job.returncode = child.wait()
        job.status = f"stopped at its limit of {limit:.0f} s"
    job.seconds = time.monotonic() - start
    if job.json_out is not None and job.json_out.exists():
        job.result = json.loads(job.json_out.read_text())
    if job.run_dir is not None:
        job.result = training_figures(job.run_dir)


def run_jobs(jobs: list[Job], budget_s: float, out: Path, work: Path, mode: str, on_cuda: bool, finish) -> dict:
    """Run ``jobs`` in order, in ``work``, within ``budget_s``; after each, ``finish(jobs)``
    rewrites the report."""
    deadline = time.monotonic() + budget_s
    report: dict = {}
    with open(out / f"proof_{mode}.log", "a") as log:
        for job in jobs:
            if job.needs_cuda and not on_cuda:
                job.status = "skipped: needs CUDA"
            elif not job.status.startswith("skipped"):
                run_job(job, deadline, log, work)
            report = finish(jobs)
    return report


# ======================================================================================= main
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="tools/gpu_proof.sh", description=__doc__.splitlines()[0])
    parser.add_argument("mode", choices=MODES)
    parser.add_argument("out", help="the folder the reports go to ($OUT on the GPU machine: at most 8 files come back)")
    parser.add_argument("--data", default=str(ROOT / ".data" / "cifar10.tar.gz"),
                        help="CIFAR-10's full JPEG archive (the demo and --data bench; default: the checkout's .data/)")
    parser.add_argument("--work", default="", help="where the demo's run folder goes (default: a folder under /tmp)")
    parser.add_argument("--budget", type=float, default=0.0, help="seconds for the whole mode (default: quick 240, demo 540)")
    parser.add_argument("--only", default="", help="comma-separated job names: run only these")
    parser.add_argument("--jobs", default=str(JOBS_FILE), help="the quick mode's job lists (default: tools/proof_jobs.yaml)")
    args = parser.parse_args(argv)
    import torch

    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, Stopped.handle)
    if not (ROOT / "configs").is_dir():
        print(f"error: the kit runs from a checkout of moco_engine ({ROOT} has no configs/)", file=sys.stderr)
        return 2
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    data = Path(args.data).resolve()
    cpu = args.mode == "cpu"
    on_cuda = torch.cuda.is_available() and not cpu
    budget = args.budget or BUDGETS[args.mode]
    env = environment()
    work = Path(args.work or f"/tmp/moco_proof_{os.getpid()}").resolve()
    work.mkdir(parents=True, exist_ok=True)
    status = 0
    for part in (("quick", "demo") if cpu else (args.mode,)):
        start = time.monotonic()
        if part == "quick":
            try:
                jobs = quick_jobs(work, data, cpu, Path(args.jobs).resolve())
            except PlanError as e:
                print(f"error: {e}", file=sys.stderr)
                return 2
        else:
            if not cpu and not data.exists():
                print(f"error: --data {data}: no such archive (docs/benchmarking.md, 'Proving it on a GPU', says how to make it)",
                      file=sys.stderr)
                return 2
            jobs = demo_jobs(work, data, cpu, budget)
        if args.only:
            jobs = [j for j in jobs if j.name in args.only.split(",")]
        name = f"{part}_cpu" if cpu else part

        def finish(done: list[Job], part=part, name=name) -> dict:
            if part == "quick":
                return write_report(out, name, env, done, lines=bench_rows(done))
            figures, lines = demo_summary(work, done, out)
            return write_report(out, name, env, done, figures, lines)

        run_jobs(jobs, budget - (time.monotonic() - start), out, work, name, on_cuda, finish)
        failed = [j.name for j in jobs if j.status.startswith(("failed", "stopped"))]
        print(f"{name}: {sum(j.status == 'ok' for j in jobs)} of {len(jobs)} jobs ok"
              f"{'; failed or stopped: ' + ', '.join(failed) if failed else ''} ({out / f'proof_{name}.md'})", flush=True)
        status = status or (1 if failed else 0)
    return 128 + Stopped.signum if Stopped.signum is not None else status


if __name__ == "__main__":
    sys.exit(main())
