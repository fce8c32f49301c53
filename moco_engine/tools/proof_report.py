"""The GPU proof kit's reports (``proof.py`` runs the jobs): a markdown row per ``moco-bench``
case, a training job's figures read from its ``metrics.jsonl``, the demo against the reference
run and the targets, and the two files each mode writes (``proof_<mode>.json`` and ``.md``)."""

from __future__ import annotations

import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

#: The reference run of issue 20: the MoCo authors' demo code on the same JPEG CIFAR-10, one H100
#: (kNN top-1 % after the epoch).
REFERENCE = {10: 47.2, 30: 67.4, 100: 75.4, 200: 77.7}
#: The targets of issue 20 that the demo checks.
DEMO_TARGETS = {"epoch_s": 1.6, "wall_s": 360.0, "knn_top1": 77.7}


def bench_rows(jobs: list[Any]) -> list[str]:
    """One markdown row per timed ``moco-bench`` case."""
    rows = ["| job | MoCo / supervised | MoCo images/s | supervised ms | MoCo ms | operators (sup / MoCo) | status |",
            "| --- | --- | --- | --- | --- | --- | --- |"]
    for job in jobs:
        if job.json_out is None:
            continue
        r = (job.result or [{}])[0]
        if "moco_s" in r:
            ops = r.get("ops") or {}
            counts = f"{ops['supervised']['compute']:,} / {ops['moco']['compute']:,}" if ops else "(compiled)"
            rows.append(f"| {job.name} | {r['ratio']:.2f} | {r['batch'] / r['moco_s']:,.0f} | {r['supervised_s'] * 1e3:.2f} "
                        f"| {r['moco_s'] * 1e3:.2f} | {counts} | {job.status} |")
        elif "ops_by_form" in r:
            forms = ", ".join(f"{k}: {v['compute']:,}" for k, v in r["ops_by_form"].items())
            rows.append(f"| {job.name} | | | | | {forms} | {job.status} |")
        else:
            rows.append(f"| {job.name} | | | | | | {job.status} |")
    for job in (j for j in jobs if j.run_dir is not None and j.result):
        f = job.result
        epochs = ", ".join(f"{s:.2f}" for s in f["epoch_s"])
        rows += ["", f"{job.name}: first step after {f['first_step_s']} s, epochs (s) {epochs or 'none'}, "
                     f"last evaluation {f['last_eval']} ({job.status})"]
    return rows


def environment() -> dict:
    import torch

    cuda = torch.cuda.is_available()
    return {"date": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "torch": torch.__version__, "python": sys.version.split()[0],
            "device": torch.cuda.get_device_name(0) if cuda else f"cpu ({os.cpu_count()} cores)", "cuda": cuda}


def write_report(out: Path, mode: str, env: dict, jobs: list[Any], extra: dict | None = None,
                 lines: list[str] | None = None) -> dict:
    report = {"mode": mode, **env, **(extra or {}),
              "jobs": [{"name": j.name, "command": " ".join(j.argv), "status": j.status, "seconds": round(j.seconds, 1),
                        "returncode": j.returncode, "result": j.result, "notes": j.notes} for j in jobs]}
    (out / f"proof_{mode}.json").write_text(json.dumps(report, indent=1) + "\n")
    md = [f"# moco_engine proof, mode {mode}", "", f"{env['date']}, {env['device']}, torch {env['torch']}, "
          f"Python {env['python']}", "", "| job | status | seconds |", "| --- | --- | --- |"]
    md += [f"| {j.name} | {j.status} | {j.seconds:.0f} |" for j in jobs]
    (out / f"proof_{mode}.md").write_text("\n".join(md + [""] + (lines or [])) + "\n")
    return report


def training_figures(run: Path) -> dict:
    """How far a training job came, from its ``metrics.jsonl``: the first step's time and its
    compilation, the epochs done, each one's time and their median, the recompilations after
    epoch 0, the kNN curve (by epochs completed) and the last evaluation."""
    from moco_engine.run.tracking import METRICS_FILE, knn_curve, read_metrics

    metrics = run / METRICS_FILE
    first = read_metrics(metrics, "first_step")
    epochs = read_metrics(metrics, "epoch")
    evals = read_metrics(metrics, "eval")
    epoch_s = [r["epoch_s"] for r in epochs]
    return {"first_step_s": first[0]["seconds"] if first else None, "compile_s": first[0]["compile_s"] if first else None,
            "epochs_done": len(epochs), "epoch_s": epoch_s, "median_epoch_s": statistics.median(epoch_s) if epoch_s else None,
            "recompiles_after_epoch_0": sum(r.get("compiles", 0) for r in epochs[1:]) if epochs else None,
            "knn_curve": dict(knn_curve(metrics)),
            "last_eval": {k: v for k, v in evals[-1].items() if k not in ("kind", "step", "time")} if evals else None}


def demo_summary(work: Path, jobs: list[Any], out: Path) -> tuple[dict, list[str]]:
    """The demo's figures (the README command's curve, wall, epoch time, probe; the compiled
    form's start) against the reference and the targets."""
    from moco_engine.run.plots import line_plot
    from moco_engine.run.tracking import METRICS_FILE

    run = work / "demo"
    metrics = run / METRICS_FILE
    eager, compiled = training_figures(run), training_figures(work / "demo_compiled")
    curve = eager["knn_curve"]
    probes = sorted(run.rglob("*.linear*.json"), key=lambda p: p.stat().st_mtime)
    probe = json.loads(probes[-1].read_text()) if probes else None
    train = jobs[0]
    last = max(curve) if curve else None
    figures = {"knn_curve": curve, "epochs_done": last, "wall_s": round(train.seconds, 1),
               "median_epoch_s": eager["median_epoch_s"], "first_step_s": eager["first_step_s"],
               "compiled": {k: v for k, v in compiled.items() if k != "knn_curve"},
               "probe_top1": probe.get("top1") if probe else None}
    met = lambda ok: "met" if ok else "not met"  # noqa: E731
    fmt = lambda v, unit="": "" if v is None else f"{v:.2f}{unit}" if isinstance(v, float) else f"{v}{unit}"  # noqa: E731
    lines = ["| demo job | first step after | compiling | epochs done | median epoch | recompilations after epoch 0 |",
             "| --- | --- | --- | --- | --- | --- |"]
    for name, f in (("the README's command", eager), ("compiled (train.compile=true)", compiled)):
        lines.append(f"| {name} | {fmt(f['first_step_s'], ' s')} | {fmt(f['compile_s'], ' s')} | {f['epochs_done']} | "
                     f"{fmt(f['median_epoch_s'], ' s')} | {fmt(f['recompiles_after_epoch_0'])} |")
    lines += ["", "| epoch | kNN top-1 % (this run) | reference | difference |", "| --- | --- | --- | --- |"]
    for epoch in sorted(set(curve) | set(REFERENCE)):
        ours, ref = curve.get(epoch), REFERENCE.get(epoch)
        diff = f"{ours - ref:+.2f}" if ours is not None and ref is not None else ""
        lines.append(f"| {epoch} | {'' if ours is None else f'{ours:.2f}'} | {'' if ref is None else ref} | {diff} |")
    lines += ["", "| target (issue 20) | measured | verdict |", "| --- | --- | --- |"]
    if figures["median_epoch_s"] is not None:
        lines.append(f"| an epoch (data and step) <= {DEMO_TARGETS['epoch_s']} s | {figures['median_epoch_s']:.2f} s (median) | "
                     f"{met(figures['median_epoch_s'] <= DEMO_TARGETS['epoch_s'])} |")
    whole = last == 200
    lines.append(f"| 200 epochs <= {DEMO_TARGETS['wall_s'] / 60:.0f} min wall | {train.seconds:.0f} s for {last or 0} epochs "
                 f"| {met(whole and train.seconds <= DEMO_TARGETS['wall_s'])} |")
    if last is not None:
        lines.append(f"| kNN top-1 >= {DEMO_TARGETS['knn_top1']} at epoch 200 | {curve[last]:.2f} at epoch {last} | "
                     f"{met(whole and curve[last] >= DEMO_TARGETS['knn_top1'])} |")
    if probe:
        lines += ["", f"Linear probe (cached features): top-1 {probe['top1']:.2f}%, top-5 {probe['top5']:.2f}%."]
    if curve:
        series = {"moco_engine (this run)": sorted(curve.items()), "reference (authors' demo code, H100)": sorted(REFERENCE.items())}
        line_plot(series, out / "demo_knn.png", "CIFAR-10 demo recipe: kNN top-1", "epochs", "kNN top-1 accuracy (%)")
        lines += ["", "![kNN curve](demo_knn.png)"]
    if metrics.exists():
        (out / "demo_metrics.jsonl").write_text(metrics.read_text())
    return figures, lines
