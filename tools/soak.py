"""Soak benchmark for crash safety: a long tiny run interrupted again and again ends exactly where
an uninterrupted run ends.

1. A straight run of about ``--steps`` steps (tiny ResNet-18 on synthetic images, CPU).
2. The same run under fire, in parallel with the first (each process on ``--threads`` threads): after
   a random ``--interval`` (20–90 s) the process gets SIGTERM (it finishes the step,
   checkpoints and exits 143) and is restarted with ``train.resume=auto``; ``--kills`` of the
   cycles use SIGKILL instead (no warning: the run loses what it did since its last checkpoint
   and redoes it from there).
3. The two final checkpoints are compared tensor by tensor (query and key encoders, queue,
   optimizer state): on CPU they must be bit-identical.

    python tools/soak.py --steps 2000 --out /tmp/soak       # prints a summary table at the end
    nice -n 19 python tools/soak.py --steps 10000           # the BENCHMARKS.md run, on idle cycles

Not a test (it takes tens of minutes); BENCHMARKS.md records its figures.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from moco_engine.run.checkpoint import latest_checkpoint  # noqa: E402


def config(steps: int, out: Path) -> list[str]:
    batch, items = 8, 256
    epochs = max(1, round(steps / (items // batch)))
    return [
        "data.name=synthetic", f"data.synthetic_size={items}", "data.synthetic_classes=4", "data.image_size=16",
        "data.num_workers=0", "model.cifar_stem=false", "model.hidden_dim=32", "model.dim=16", "queue.size=100",
        f"optim.batch_size={batch}", f"train.epochs={epochs}", "train.save_every=10", "train.log_every=16",
        "eval.knn_every=0", "eval.knn_k=10", "track.progress=false", "train.device=cpu", f"train.out_dir={out}",
    ]


def start(args: list[str], threads: int) -> subprocess.Popen:
    """moco-train with ``args`` as a child process on ``threads`` intra-op threads."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    return subprocess.Popen([sys.executable, "-m", "moco_engine", *args], cwd=ROOT, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def run(args: list[str], threads: int, kill_after: float | None = None, sig: int = signal.SIGTERM,
        proc: subprocess.Popen | None = None) -> tuple[int, float]:
    """Run moco-train with ``args`` (or wait for ``proc``); send ``sig`` after ``kill_after`` seconds.

    Returns (exit code, seconds)."""
    started = time.perf_counter()
    proc = proc or start(args, threads)
    try:
        proc.wait(timeout=kill_after)
    except subprocess.TimeoutExpired:
        proc.send_signal(sig)
        proc.wait()
    stderr = proc.stderr.read() if proc.stderr else ""
    # 143: stopped cleanly by SIGTERM; -15: SIGTERM before the handler was up (start-up, a save
    # or an evaluation: the default action ends the process, which is one more crash to survive).
    if proc.returncode not in (0, 128 + signal.SIGTERM, -signal.SIGTERM, -signal.SIGKILL):
        raise SystemExit(f"run failed with exit code {proc.returncode}:\n{stderr[-2000:]}")
    return proc.returncode, time.perf_counter() - started


def compare(a: dict, b: dict, prefix: str = "") -> list[str]:
    """Names of the tensors that differ between two (nested) state dicts."""
    diffs = []
    for key in a.keys() | b.keys():
        x, y = a.get(key), b.get(key)
        name = f"{prefix}{key}"
        if isinstance(x, dict) and isinstance(y, dict):
            diffs += compare(x, y, name + ".")
        elif isinstance(x, torch.Tensor) and isinstance(y, torch.Tensor):
            if x.shape != y.shape or not torch.equal(x, y):
                diffs.append(name)
    return diffs


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=10_000)
    ap.add_argument("--kills", type=int, default=2, help="how many of the interruptions are SIGKILL")
    ap.add_argument("--out", default="/tmp/moco_soak")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1, help="threads of each of the two concurrent runs")
    ap.add_argument("--interval", type=float, nargs=2, default=(20.0, 90.0), metavar=("MIN", "MAX"),
                    help="seconds each interrupted process runs before its signal, drawn uniformly")
    args = ap.parse_args()
    out = Path(args.out)
    rng = random.Random(args.seed)

    straight_dir, soak_dir = out / "straight", out / "soak"
    # The straight run goes alongside the interrupted one: the two share nothing but the cores.
    straight_started = time.perf_counter()
    straight_proc = start([*config(args.steps, straight_dir), "train.overwrite=true"], args.threads)

    soak_args = [*config(args.steps, soak_dir), "train.resume=auto"]
    cycles, kills, total_s, sigterm_exits = 0, 0, 0.0, 0
    kill_cycles = set(rng.sample(range(2, 12), args.kills))
    while True:
        cycles += 1
        sig = signal.SIGKILL if cycles in kill_cycles else signal.SIGTERM
        code, seconds = run(soak_args, args.threads, kill_after=rng.uniform(*args.interval), sig=sig)
        total_s += seconds
        kills += code in (-signal.SIGKILL, -signal.SIGTERM)
        sigterm_exits += code == 128 + signal.SIGTERM
        if code == 0:
            break
    code, _ = run([], args.threads, proc=straight_proc)
    straight_s = time.perf_counter() - straight_started
    if code != 0:
        raise SystemExit(f"the straight run failed with exit code {code}")
    straight = latest_checkpoint(straight_dir)[1]
    soak = latest_checkpoint(soak_dir)[1]
    diffs = compare({k: straight[k] for k in ("encoder_q", "encoder_k", "negatives", "optimizer")},
                    {k: soak[k] for k in ("encoder_q", "encoder_k", "negatives", "optimizer")})
    summary = {
        "steps": straight["step"], "wall_s": round(straight_s, 1), "interrupted_processes_s": round(total_s, 1),
        "processes_started": cycles, "sigterm_stops": sigterm_exits, "killed_without_checkpoint": kills,
        "final_step_equal": soak["step"] == straight["step"], "tensors_differing": diffs,
    }
    print(json.dumps(summary, indent=1))
    # The straight run is waited for only after the interrupted one, so one wall time covers both.
    print("| steps | processes | clean SIGTERM stops | killed (SIGKILL, or SIGTERM outside a step) | final state bit-identical | wall time |")
    print("| --- | --- | --- | --- | --- | --- |")
    print(f"| {summary['steps']} | {cycles} | {sigterm_exits} | {kills} | {'yes' if not diffs and summary['final_step_equal'] else 'NO'} "
          f"| {straight_s:.0f} s |")


if __name__ == "__main__":
    main()
