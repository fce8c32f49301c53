"""``moco-sweep``: run a W&B-syntax sweep file here, one run after another, with no network.

The file is W&B's sweep syntax, so the same file also works online with ``wandb sweep`` and
``wandb agent``::

    name: queue_size
    method: grid                      # grid | random (random: run_cap runs drawn from the grid)
    metric: {name: eval/knn_top1, goal: maximize}   # a key W&B receives; its best over the run
    parameters:
      negatives.kind: {values: [queue, memory_bank]}
      queue.size: {values: [256, 1024, 4096]}
      train.epochs: {value: 200}      # fixed for every run
    command: [${env}, python, -m, moco_engine, configs/experiment/cifar10_demo.yaml, ${args_no_hyphens}]

Here each run is the command's YAML files plus the run's ``key=value`` overrides, in its own
folder ``<out>/<run name>``, with ``track.wandb.group`` set to the sweep's name. A run whose
``metrics.jsonl`` already holds its ``final`` record is skipped, so an interrupted sweep resumes
where it stopped (an unfinished run continues from its checkpoint). A run that equals an earlier
one but for settings its choices ignore (an in-batch run of a grid over ``queue.size``) is not
run again: its row repeats that run's figures. After every run the sweep
writes ``results.csv``, ``results.md`` and ``<metric>.png`` (the metric against the first swept
parameter, one line per value of the others; a log x axis when the values span 16x or more).
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import itertools
import os
import random
import re
import signal
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from moco_engine.config.loading import load_config, split_args, to_dict, yaml_problem
from moco_engine.config.rules import ignored_settings
from moco_engine.config.schema import Config, ConfigError, UserError
from moco_engine.run.plots import line_plot
from moco_engine.run.tracking import METRICS_FILE, read_metrics
from moco_engine.tools.cli import with_version


@dataclass
class SweepRun:
    """One run of a sweep: its name and the overrides that make it."""

    name: str
    params: dict[str, Any]  # the swept parameters' values of this run
    overrides: list[str] = field(default_factory=list)  # params and fixed values as key=value
    same_as: str = ""  # an earlier run this one equals but for settings its choices ignore: not run again


@dataclass
class Sweep:
    name: str
    method: str
    metric: str
    goal: str
    files: list[str]  # the base YAML files, from the command
    swept: list[str]  # names of the parameters with several values, in file order
    runs: list[SweepRun]


class _UniqueKeyLoader(yaml.SafeLoader):
    """PyYAML's safe loader, except that a key given twice in one mapping is an error (plain
    PyYAML keeps the last one silently: a sweep would run other values than the file shows)."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(None, None, f"duplicate key {key!r}", key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


# The parts of a W&B sweep command that moco-sweep stands in for itself; anything else in it
# (an option, a script) would be dropped silently, so it is refused.
LAUNCH_TOKENS = {"${env}", "${interpreter}", "${program}", "${args}", "${args_no_hyphens}", "${args_no_boolean_flags}",
                 "python", "python3", "-m", "moco_engine", "moco-train", "env"}


def _value_list(name: str, spec: Any) -> list[Any]:
    if isinstance(spec, dict) and "values" in spec:
        if not isinstance(spec["values"], list):
            raise ConfigError(f"sweep parameter '{name}': 'values' must be a list, not {spec['values']!r}")
        values = list(spec["values"])
    elif isinstance(spec, dict) and "value" in spec:
        values = [spec["value"]]
    else:
        raise ConfigError(f"sweep parameter '{name}': give 'values: [...]' or 'value: x' (distributions are not supported)")
    if not values:
        raise ConfigError(f"sweep parameter '{name}': 'values' is empty")
    return values


def _slug(params: dict[str, Any]) -> str:
    parts = [f"{key.split('.')[-1]}-{value}" for key, value in params.items()]
    return re.sub(r"[^A-Za-z0-9._=-]", "_", "_".join(parts)) or "run"


def _fmt(value: Any) -> str:
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(_fmt(v) for v in value) + "]"
    return str(value).lower() if isinstance(value, bool) else str(value)


def read_sweep(path: str | Path, root: Path | None = None, count: int | None = None, seed: int = 0) -> Sweep:
    """Parse a sweep file and expand it into its runs, each checked against the config schema.

    Raises:
        ConfigError: a missing or malformed field, or a parameter that is no config key (the
            message names it and the closest valid key).
    """
    path = Path(path)
    try:
        spec = yaml.load(path.read_text(), Loader=_UniqueKeyLoader)
    except OSError as e:
        raise ConfigError(f"cannot read sweep file {path}: {e.strerror}") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"cannot parse sweep file {yaml_problem(e, path)}") from None
    if not isinstance(spec, dict) or not isinstance(spec.get("parameters"), dict) or not spec["parameters"]:
        raise ConfigError(f"sweep file {path} has no 'parameters' mapping")
    method = spec.get("method", "grid")
    if method not in ("grid", "random"):
        raise ConfigError(f"sweep file {path}: method {method!r} is not run locally (moco-sweep runs grid and random); "
                          f"W&B's own server runs it: wandb sweep {path} && wandb agent <sweep id>")
    metric = spec.get("metric") or {}
    if not isinstance(metric, dict):
        raise ConfigError(f"sweep file {path}: 'metric' must be a mapping like {{name: eval/knn_top1, goal: maximize}}")
    if metric.get("goal", "maximize") not in ("maximize", "minimize"):
        raise ConfigError(f"sweep file {path}: metric goal {metric['goal']!r} must be maximize or minimize")
    if not isinstance(spec.get("command", []), list):
        raise ConfigError(f"sweep file {path}: 'command' must be a list of words")
    command = [str(c) for c in spec.get("command", [])]
    root = root or Path.cwd()
    files, fixed, others = split_args(command)
    dropped = [c for c in others if c not in LAUNCH_TOKENS]
    if dropped:
        raise ConfigError(f"sweep file {path}: command word {dropped[0]!r} is not understood here (moco-sweep takes "
                          "the command's YAML files and key=value overrides) and would be dropped")
    for f in files:
        if not (root / f).is_file():
            raise ConfigError(f"sweep file {path}: the command's config {f} is not found (relative to {root})")

    names = list(spec["parameters"])
    values = [_value_list(n, spec["parameters"][n]) for n in names]
    swept = [n for n, v in zip(names, values) if len(v) > 1]
    combos = [dict(zip(names, combo)) for combo in itertools.product(*values)]
    run_cap = spec.get("run_cap")
    if run_cap is not None and (not isinstance(run_cap, int) or isinstance(run_cap, bool) or run_cap < 1):
        raise ConfigError(f"sweep file {path}: run_cap {run_cap!r} must be a whole number >= 1")
    if method == "random":
        cap = count or run_cap or len(combos)
        combos = random.Random(seed).sample(combos, min(int(cap), len(combos)))
    elif count:
        combos = combos[:count]

    runs = []
    seen: dict[str, str] = {}  # a run's config, the settings it ignores at their defaults -> the first run with it
    defaults = to_dict(Config())
    for i, combo in enumerate(combos):
        overrides = [*fixed, *(f"{k}={_fmt(v)}" for k, v in combo.items())]
        try:
            cfg = load_config([str(root / f) for f in files], overrides)
        except ConfigError as e:
            raise ConfigError(f"sweep file {path}, run {i}: {e}") from None
        params = {k: combo[k] for k in swept}
        run = SweepRun(f"{i:03d}_{_slug(params)}", params, overrides)
        # A grid over K and negatives.kind holds in-batch runs that differ in K alone, which they
        # ignore: the same run, trained once (its row is repeated under each value).
        effective = to_dict(cfg)
        for key in {k.split("=")[0] for k in ignored_settings(cfg)}:  # changed, and ignored: as the defaults
            parent, default = effective, defaults
            *groups, last = key.split(".")
            for g in groups:
                parent, default = parent[g], default[g]
            if last in default:
                parent[last] = default[last]
            else:  # a registered part's option the default config lacks
                parent.pop(last, None)
        run.same_as = seen.setdefault(yaml.safe_dump(effective, sort_keys=True), run.name)
        if run.same_as == run.name:
            run.same_as = ""
        runs.append(run)
    return Sweep(spec.get("name") or path.stem, method, metric.get("name", "eval/knn_top1"), metric.get("goal", "maximize"),
                 files, swept, runs)


def final_record(run_dir: Path) -> dict[str, Any] | None:
    """The ``final`` record of a finished run, or None."""
    finals = read_metrics(run_dir / METRICS_FILE, "final")
    return finals[-1] if finals else None


def metric_value(run_dir: Path, metric: str, goal: str) -> float | None:
    """A run's value of the sweep's metric as its W&B run summary holds it: for ``<kind>/<key>``
    (``eval/knn_top1``) the best, by ``goal``, of ``key`` over the run's records of that kind,
    every segment of a resumed run included; a bare key is read from the final record."""
    if "/" not in metric:
        final = final_record(run_dir)
        return None if final is None else final.get(metric)
    kind, key = metric.split("/", 1)
    values = [r[key] for r in read_metrics(run_dir / METRICS_FILE, kind) if isinstance(r.get(key), (int, float))]
    if not values:
        return None
    return max(values) if goal == "maximize" else min(values)


def run_command(sweep: Sweep, run: SweepRun, run_dir: Path, root: Path, nproc: int) -> list[str]:
    """The command line of one run: ``python -m moco_engine`` or ``torchrun`` of it."""
    launcher = [sys.executable, "-m", "moco_engine"]
    if nproc > 1:
        launcher = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", "-m", "moco_engine"]
    overrides = [*run.overrides, f"train.out_dir={run_dir}", f"track.wandb.group={sweep.name}",
                 f"track.wandb.name={sweep.name}-{run.name}", "train.resume=auto", "track.progress=false"]
    return [*launcher, *(str(root / f) for f in sweep.files), *overrides]


METRIC_LABELS = {"knn_top1": "kNN top-1 accuracy (%)", "knn_top5": "kNN top-5 accuracy (%)", "loss": "loss",
                 "ndcg@10": "nDCG@10 (the monitor's qrels)", "recall@100": "recall@100 (the monitor's qrels)",
                 "rsum": "rsum of image-text recall (the monitor's split)"}


def write_results(sweep: Sweep, out: Path, rows: list[dict[str, Any]]) -> None:
    """results.csv, results.md and the metric's PNG plot, from the finished runs' rows."""
    columns = ["run", *sweep.swept, sweep.metric, "epochs", "steps"]
    with open(out / "results.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    lines = [f"# Sweep {sweep.name}: {sweep.metric} ({sweep.goal})", "",
             "| " + " | ".join(columns) + " |", "|" + " --- |" * len(columns)]
    for row in rows:
        lines.append("| " + " | ".join(_cell(row.get(c)) for c in columns) + " |")
    (out / "results.md").write_text("\n".join(lines) + "\n")
    numeric = [row for row in rows if isinstance(row.get(sweep.metric), (int, float))]
    if not numeric:
        return
    x_key = sweep.swept[0] if sweep.swept else None
    series: dict[str, list[tuple[float, float]]] = {}
    for index, row in enumerate(numeric):
        x = row[x_key] if x_key and isinstance(row[x_key], (int, float)) else index
        label = ", ".join(f"{k}={row[k]}" for k in sweep.swept[1:]) or sweep.name
        series.setdefault(label, []).append((float(x), float(row[sweep.metric])))
    xs = [x for points in series.values() for x, _ in points]
    log_x = min(xs) > 0 and max(xs) / min(xs) >= 16
    ylabel = METRIC_LABELS.get(sweep.metric.split("/")[-1], sweep.metric)
    line_plot(series, out / f"{sweep.metric.replace('/', '_')}.png", f"sweep {sweep.name}", x_key or "run", ylabel, log_x=log_x)


def _cell(value: Any) -> str:
    return f"{value:.2f}" if isinstance(value, float) else ("" if value is None else str(value))


class SweepStopped(Exception):
    """SIGTERM/SIGINT reached moco-sweep: the running run was given the signal and has ended
    (saving its checkpoint); a rerun of the sweep goes on from there."""

    def __init__(self, signum: int, run: str, code: int):
        self.signum = signum
        super().__init__(f"stopped by {signal.Signals(signum).name} during run {run} (which exited with code {code}); "
                         "run the sweep again to go on from its checkpoint")


def run_child(command: list[str], run: str) -> int:
    """Run one run's process and return its exit code.

    SIGTERM and SIGINT sent to moco-sweep are passed on to the run, which saves and exits; the
    sweep waits for it and raises :class:`SweepStopped`. The run has a session of its own, so
    Ctrl-C at the terminal reaches it once, through here (twice would abort it unsaved).
    """
    child = subprocess.Popen(command, env=os.environ.copy(), start_new_session=True)
    received: list[int] = []

    def forward(signum: int, frame) -> None:
        received.append(signum)
        with contextlib.suppress(ProcessLookupError):
            child.send_signal(signum)

    previous = {s: signal.signal(s, forward) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        code = child.wait()  # resumed after each handler (PEP 475)
    finally:
        for s, h in previous.items():
            signal.signal(s, h)
    if received:
        raise SweepStopped(received[0], run, code)
    return code


def run_sweep(sweep: Sweep, out: Path, root: Path, nproc: int = 1, dry_run: bool = False) -> int:
    """Run every unfinished run in order, then write the results. Returns the number of runs that
    failed (their exit codes are printed; the sweep goes on with the next run).

    Raises:
        SweepStopped: a stop signal ended the sweep (the results so far are written first).
    """
    out.mkdir(parents=True, exist_ok=True)
    failed = 0
    stopped = None
    for i, run in enumerate(sweep.runs, 1):
        run_dir = out / run.name
        command = run_command(sweep, run, run_dir, root, nproc)
        if run.same_as:
            print(f"[{i}/{len(sweep.runs)}] {run.name}: the same run as {run.same_as} but for settings it ignores; "
                  "not run again", flush=True)
            continue
        if final_record(run_dir) is not None:
            print(f"[{i}/{len(sweep.runs)}] {run.name}: finished earlier, skipped", flush=True)
            continue
        print(f"[{i}/{len(sweep.runs)}] {run.name}: {' '.join(command[1:] if not dry_run else command)}", flush=True)
        if dry_run:
            continue
        try:
            code = run_child(command, run.name)
        except SweepStopped as e:
            stopped = e
            break
        if code != 0:
            failed += 1
            print(f"[{i}/{len(sweep.runs)}] {run.name}: exited with code {code}", flush=True)
    rows = []
    for run in sweep.runs:
        done = out / (run.same_as or run.name)
        final = final_record(done)
        if final is not None:
            rows.append({"run": run.name, **run.params, **final,
                         sweep.metric: metric_value(done, sweep.metric, sweep.goal)})
    if not dry_run:
        write_results(sweep, out, rows)
        print(f"{len(rows)}/{len(sweep.runs)} runs finished; results in {out / 'results.md'}", flush=True)
    if stopped is not None:
        raise stopped
    return failed


def _sweep(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="moco-sweep", description=__doc__.splitlines()[0])
    with_version(parser)
    parser.add_argument("sweep_file")
    parser.add_argument("--out", default="", help="folder of the sweep's runs (default: runs/sweeps/<name>)")
    parser.add_argument("--nproc", type=int, default=1, help="run each run under torchrun with this many processes")
    parser.add_argument("--count", type=int, default=0, help="run only the first N runs (random: draw N)")
    parser.add_argument("--root", default=".", help="folder the command's config paths are relative to")
    parser.add_argument("--dry-run", action="store_true", help="print the runs' commands, run nothing")
    args = parser.parse_args(argv)
    root = Path(args.root).resolve()
    sweep = read_sweep(args.sweep_file, root, count=args.count or None)
    out = Path(args.out or f"runs/sweeps/{sweep.name}").resolve()
    print(f"sweep {sweep.name}: {len(sweep.runs)} runs ({sweep.method}), metric {sweep.metric}, folder {out}", flush=True)
    if args.nproc < 1 or args.count < 0:
        raise UserError(f"moco-sweep: --nproc must be >= 1 and --count >= 0 (got {args.nproc}, {args.count})")
    try:
        failed = run_sweep(sweep, out, root, args.nproc, args.dry_run)
    except SweepStopped as e:
        print(f"moco-sweep: {e}", file=sys.stderr, flush=True)
        return 128 + e.signum
    if failed:
        raise UserError(f"{failed} of {len(sweep.runs)} runs failed (see their lines above); run the sweep again to retry them")
    return 0


def sweep_main(argv: Sequence[str] | None = None) -> int:
    """``moco-sweep SWEEP.yaml [--out DIR] [--nproc N] [--count N] [--dry-run]``"""
    from moco_engine.tools.cli import run_guarded

    return run_guarded(_sweep, argv)


if __name__ == "__main__":
    sys.exit(sweep_main())
